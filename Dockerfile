# bcl-harness on a CUDA GPU: the image `make reproduce` runs (through compose.yaml).
#
#   docker compose build                 # HARNESS_UID=$(id -u) HARNESS_GID=$(id -g) to match the host user
#   docker compose run --rm harness      # default command: `make reproduce-inside` (the Makefile's target)
#   docker compose run --rm harness harness runs list    # any other command
#
# What is in it:
#   - BASE_IMAGE: the official PyTorch image with the same torch as constraints.txt
#     (torch 2.14.1, torchvision with it) built for CUDA 13.0, the CUDA of the torch wheels
#     that constraints.txt pins (nvidia-*-cu13) and that the GPU benchmarks ran with. It needs a host
#     driver for CUDA 13 (>= 580); on an older driver build with
#     --build-arg BASE_IMAGE=pytorch/pytorch:2.14.1-cuda12.6-cudnn9-runtime.
#   - /opt/venv: a virtual environment made with --system-site-packages, so it sees the base image's
#     CUDA torch and torchvision. The project is installed into it, editable (harness/splits.py
#     finds splits/manifest.json next to the source), with a container constraints file: constraints.txt
#     less torch, torchvision, triton, nvidia-* and cuda-* (those pins are the CPU machine's wheels and
#     would replace the image's CUDA build), plus torch==/torchvision== of the versions the image ships, so
#     a dependency that wanted another torch makes the build fail instead of swapping torch. The build
#     then checks that torch is still the image's own CUDA build.
#   - make: the Makefile is in WORKDIR /app and VENV=/opt/venv is exported, so the Makefile's
#     $(VENV)/bin/python and $(VENV)/bin/harness resolve inside the container.
#   - a non-root user `harness` (uid/gid from HARNESS_UID/HARNESS_GID, default 1000; a user or group of
#     the base image that already holds that id is removed first), owning the three volumes.
#   - VOLUMEs /app/data (CIFAR-100), /app/results (registry, tables, plots), /app/checkpoints.
#     The paper's split files are mounted by compose.yaml at /app/splits (splits/paper/).
ARG BASE_IMAGE=pytorch/pytorch:2.14.1-cuda13.0-cudnn9-runtime
FROM ${BASE_IMAGE}

# Recorded with every run (harness/train.py `environment()`): which image it ran in, and the commit
# (the build context has no .git; `make reproduce` passes `git rev-parse HEAD`).
ARG BASE_IMAGE
ARG HARNESS_GIT_REV=
ARG HARNESS_UID=1000
ARG HARNESS_GID=1000
# GNU make for `make reproduce-inside`; this version is the one of Ubuntu 24.04 (the base image's OS).
ARG MAKE_VERSION=4.3-4.1build2
# A C compiler for `--compile`: Triton builds its kernel launchers with one at run time. Runtime
# images since pytorch/pytorch#170235 ship gcc; an older base gets Ubuntu 24.04's gcc and the
# libc headers of exactly the libc it has.
ARG GCC_VERSION=4:13.2.0-7ubuntu1

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN apt-get update \
 && apt-get install -y --no-install-recommends "make=${MAKE_VERSION}" \
 && if ! command -v gcc >/dev/null; then \
        apt-get install -y --no-install-recommends "gcc=${GCC_VERSION}" \
            "libc6-dev=$(dpkg-query --showformat='${Version}' --show libc6)"; \
    fi \
 && gcc --version | head -n 1 \
 && rm -rf /var/lib/apt/lists/*

RUN if [ "${HARNESS_UID}" -eq 0 ] || [ "${HARNESS_GID}" -eq 0 ]; then \
        echo "HARNESS_UID/HARNESS_GID must not be 0: the container runs as a non-root user" >&2; exit 1; \
    fi \
 && if getent passwd "${HARNESS_UID}" >/dev/null; then \
        userdel --remove "$(getent passwd "${HARNESS_UID}" | cut -d: -f1)" 2>/dev/null || true; \
    fi \
 && if getent group "${HARNESS_GID}" >/dev/null; then \
        groupdel "$(getent group "${HARNESS_GID}" | cut -d: -f1)"; \
    fi \
 && groupadd --gid "${HARNESS_GID}" harness \
 && useradd --uid "${HARNESS_UID}" --gid "${HARNESS_GID}" --create-home --shell /bin/bash harness

WORKDIR /app

# Dependencies first, in their own layer: only pyproject.toml, constraints.txt and README.md (the
# package metadata) are copied, with empty stand-ins for the two packages, so that a change to the
# source does not reinstall numpy, pandas, matplotlib... The editable install points at /app/harness
# and /app/methods, which the full COPY below fills in.
# The base image's torch stays: see the header. torch.version.cuda is None for a CPU-only build.
COPY pyproject.toml constraints.txt README.md /app/
RUN python3 -m venv --system-site-packages --without-pip /opt/venv \
 && /opt/venv/bin/python -c 'import torch, torchvision; print(torch.__version__, torch.version.cuda)' \
        > /tmp/torch-before.txt \
 && grep -Ev '^(torch|torchvision|triton|nvidia-[A-Za-z0-9_.-]+|cuda-[A-Za-z0-9_.-]+)==' constraints.txt \
        > /tmp/constraints-container.txt \
 && /opt/venv/bin/python -c 'from importlib.metadata import version as v; print("torch==" + v("torch")); print("torchvision==" + v("torchvision"))' \
        >> /tmp/constraints-container.txt \
 && mkdir -p harness methods \
 && touch harness/__init__.py methods/__init__.py \
 && /opt/venv/bin/python -m pip install --no-cache-dir -c /tmp/constraints-container.txt -e . \
 && /opt/venv/bin/python -c 'import torch, torchvision; print(torch.__version__, torch.version.cuda)' \
        > /tmp/torch-after.txt \
 && cmp /tmp/torch-before.txt /tmp/torch-after.txt \
 && /opt/venv/bin/python -c 'import sys, torch; sys.exit(torch.version.cuda is None)' \
 && rm -f /tmp/torch-before.txt /tmp/torch-after.txt /tmp/constraints-container.txt

COPY . /app
RUN /opt/venv/bin/harness --help >/dev/null \
 && mkdir -p /app/data /app/results /app/checkpoints /app/splits/paper \
 && chown -R harness:harness /app/data /app/results /app/checkpoints /app/splits

ENV VIRTUAL_ENV=/opt/venv \
    VENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH} \
    HARNESS_REGISTRY=sqlite:////app/results/registry.db \
    HARNESS_SPLITS=/app/splits/paper \
    HARNESS_CONTAINER_IMAGE="bcl-harness (base ${BASE_IMAGE})" \
    HARNESS_GIT_REV=${HARNESS_GIT_REV}

USER ${HARNESS_UID}:${HARNESS_GID}
VOLUME ["/app/data", "/app/results", "/app/checkpoints"]

# No ENTRYPOINT, so that `docker compose run --rm harness <any command>` runs that command as is.
CMD ["make", "reproduce-inside"]
