#!/usr/bin/env bash
# The GPU checks for a borrowed H100/H200, in steps that each fit a short device call:
#   tests    the CUDA-only tests (augmentation on CUDA == CPU bit for bit, graphed probes ==
#            eager, views augmented ahead on the side stream == augmented in turn)      ~1 min
#   bench    `harness bench --profile` (eager): speed per method, compute limits, time per
#            phase, the targets; SimCLR and BCL-D again with --no-overlap               ~2 min
#   run      `harness run` of SimCLR and BCL-D on split 1 for 50 epochs, evaluated, and the
#            report: the whole pipeline on CUDA with real data (not a paper-length run) ~2 min
#   compile  `harness bench --compile` for SimCLR and BCL-D (compilation is in the warm-up
#            epochs) and the compiled compute limit                                      ~4 min
#
# Usage, from the repository root on the GPU machine:
#   tools/gpu_check.sh DATA_ROOT SPLITS_ROOT OUT [STEP ...]      (default: all four, in order)
# DATA_ROOT holds cifar-100-python/ (the real pickles), SPLITS_ROOT the paper's 17 .npy files.
# OUT receives device.txt and, per step: cuda_tests.log; bench_eager.{json,log} and
# bench_no_overlap.{json,log}; run.log, registry.db, report.md, report.html; bench_compile.{json,log}.
# A step that fails or runs out of time does not stop the next one.
#
# The GPU image may lack SQLAlchemy and pytest and cannot reach PyPI: carry wheels for its
# Python in .whl/ (here: `pip download sqlalchemy pytest pluggy iniconfig packaging pygments
# --only-binary :all: --no-deps --python-version 3.12 -d .whl`).
set -uo pipefail
if [ $# -lt 3 ]; then
  echo "usage: tools/gpu_check.sh DATA_ROOT SPLITS_ROOT OUT [tests|bench|run|compile ...]" >&2
  exit 2
fi
data=$1 splits=$2 out=$3
shift 3
steps=${*:-tests bench run compile}
mkdir -p "$out"
if ! python3 -c "import sqlalchemy, pytest" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
harness() { python3 -m harness.cli "$@"; }
common=(--data-root "$data" --splits-root "$splits")

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, platform; print('torch', torch.__version__, 'cuda', torch.version.cuda,
              'python', platform.python_version())"
  date -u +%FT%TZ; git rev-parse HEAD 2>/dev/null
  harness data info --root "$data"; } 2>&1 | tee -a "$out/device.txt"

for step in $steps; do
  case $step in
    tests)
      timeout 120 python3 -m pytest -q -p no:cacheprovider -k cuda \
        tests/test_augment.py tests/test_probe.py tests/test_train.py 2>&1 | tail -5 | tee "$out/cuda_tests.log" ;;
    bench)
      timeout 110 python3 -m harness.cli bench "${common[@]}" --profile --json "$out/bench_eager.json" 2>&1 \
        | tee "$out/bench_eager.log"
      timeout 60 python3 -m harness.cli bench "${common[@]}" --methods simclr,bcl-d --no-overlap \
        --probe-epochs 1 --json "$out/bench_no_overlap.json" 2>&1 | tee "$out/bench_no_overlap.log" ;;
    run)
      reg="sqlite:///$out/registry.db"
      timeout 150 python3 -m harness.cli run --methods simclr,bcl-d --splits 1 --epochs 50 "${common[@]}" \
        --checkpoint-dir /tmp/gpu_check_ck --registry "$reg" --no-progress 2>&1 | tee "$out/run.log"
      harness report --registry "$reg" --format markdown --out "$out/report.md" 2>&1 | tail -3
      # Table 4 of the page shows what the runs read on the GPU: driver, CUDA, cuDNN, bf16
      python3 -m harness.cli report --registry "$reg" --format html --out "$out/report.html" 2>&1 | tail -3 ;;
    compile)
      timeout 270 python3 -m harness.cli bench "${common[@]}" --methods simclr,bcl-d --compile \
        --timed-epochs 2 --json "$out/bench_compile.json" 2>&1 | tee "$out/bench_compile.log" ;;
    *)
      echo "unknown step $step (tests, bench, run, compile)" >&2 ;;
  esac
done
