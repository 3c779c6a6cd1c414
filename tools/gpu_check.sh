#!/usr/bin/env bash
# The GPU checks that fit one device call (an H100/H200, about 8 minutes), most urgent first:
#   0. the CUDA-only tests (augmentation on CUDA == CPU bit for bit, graphed probes == eager,
#      views augmented ahead on the side stream == augmented in turn);
#   1. `harness bench --profile` (eager): speed per method, compute limits, time per phase; then
#      SimCLR and BCL-D again with --no-overlap (what augmenting ahead on a side stream gains);
#   2. `harness run` of SimCLR and BCL-D on split 1 for 50 epochs, evaluated, then the report:
#      the whole pipeline on CUDA with real data (not a paper-length run);
#   3. `harness bench --compile` for SimCLR and BCL-D (compilation counts in the warm-up epochs).
#
# Usage, from the repository root on the GPU machine:
#   tools/gpu_check.sh DATA_ROOT SPLITS_ROOT OUT
# DATA_ROOT holds cifar-100-python/ (the real pickles), SPLITS_ROOT the paper's 17 .npy files,
# OUT receives device.txt, cuda_tests.log, bench_eager.{json,log}, bench_no_overlap.{json,log},
# run.log, registry.db, report.md, bench_compile.{json,log}. A step that fails or runs out of time
# does not stop the next one.
#
# The GPU image may lack SQLAlchemy and pytest and cannot reach PyPI: carry wheels for its
# Python in .whl/ (here: `pip download sqlalchemy pytest pluggy iniconfig packaging pygments
# --only-binary :all: --no-deps --python-version 3.12 -d .whl`).
set -uo pipefail
if [ $# -ne 3 ]; then
  echo "usage: tools/gpu_check.sh DATA_ROOT SPLITS_ROOT OUT" >&2
  exit 2
fi
data=$1 splits=$2 out=$3
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
  harness data info --root "$data"; } 2>&1 | tee "$out/device.txt"

timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_augment.py tests/test_probe.py tests/test_train.py \
  -k cuda 2>&1 \
  | tail -5 | tee "$out/cuda_tests.log"

timeout 150 python3 -m harness.cli bench "${common[@]}" --profile --json "$out/bench_eager.json" 2>&1 \
  | tee "$out/bench_eager.log"

timeout 90 python3 -m harness.cli bench "${common[@]}" --methods simclr,bcl-d --no-overlap --probe-epochs 1 \
  --json "$out/bench_no_overlap.json" 2>&1 | tee "$out/bench_no_overlap.log"

reg="sqlite:///$out/registry.db"
timeout 170 python3 -m harness.cli run --methods simclr,bcl-d --splits 1 --epochs 50 "${common[@]}" \
  --checkpoint-dir /tmp/gpu_check_ck --registry "$reg" --no-progress 2>&1 | tee "$out/run.log"
harness report --registry "$reg" --format markdown --out "$out/report.md" 2>&1 | tail -3

timeout 300 python3 -m harness.cli bench "${common[@]}" --methods simclr,bcl-d --compile \
  --json "$out/bench_compile.json" 2>&1 | tee "$out/bench_compile.log"
