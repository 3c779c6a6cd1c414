"""The `harness` CLI through typer's runner: help texts, happy paths, error paths."""
import ast
import json
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from harness.cli import app
from tests.conftest import REPO, SHARED_SPLITS

runner = CliRunner()


def run(*args, ok=True):
    res = runner.invoke(app, [str(a) for a in args])
    if ok:
        assert res.exit_code == 0, res.output
    return res


GROUPS = {"data": ["prepare", "info"], "splits": ["import", "fetch", "verify", "show", "make"],
          "runs": ["list", "show", "delete"], "export": ["tensorboard", "mlflow"]}
TOP_COMMANDS = ["train", "eval", "report", "run", "bench"]


@pytest.mark.parametrize("cmd", [[]] + [[g] for g in GROUPS] + [[c] for c in TOP_COMMANDS]
                         + [[g, c] for g, cs in GROUPS.items() for c in cs])
def test_help(cmd):
    res = run(*cmd, "--help")
    assert "Usage" in res.output


def test_top_level_help_lists_every_group_and_command():
    out = run("--help").output
    for name in [*GROUPS, *TOP_COMMANDS]:
        assert re.search(rf"^\W*{name}\s", out, re.M), f"{name} missing from --help:\n{out}"
    for group, commands in GROUPS.items():
        out = run(group, "--help").output
        for name in commands:
            assert re.search(rf"^\W*{name}\s", out, re.M), f"{group} {name} missing from --help:\n{out}"


def _commands(group, prefix=()):
    for name, cmd in group.commands.items():
        yield (*prefix, name), cmd
        if hasattr(cmd, "commands"):
            yield from _commands(cmd, (*prefix, name))


def test_short_help_is_one_line():
    """Typer shows a command's first docstring paragraph in the command list: one line, no ragged breaks."""
    for path, cmd in _commands(typer.main.get_command(app)):
        first = (cmd.help or "").strip().split("\n\n")[0]
        assert first and "\n" not in first and len(first) <= 100, f"{' '.join(path)}: {first!r}"


def test_cli_import_stays_light():
    """`harness --help` must not pay for torch or pandas: they load inside the commands that need them."""
    code = ("import harness.cli, sys; "
            "print(sorted(m for m in ('torch','pandas','torchvision','sqlalchemy.orm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    loaded = ast.literal_eval(out.stdout.strip().splitlines()[-1])
    assert not {"torch", "pandas", "torchvision"} & set(loaded), loaded


def test_prepare_info_and_errors(tmp_path):
    res = run("data", "prepare", "--root", tmp_path, "--synthetic", "--per-class", 2)
    assert "200 train / 200 test" in res.output
    res = run("data", "info", "--root", tmp_path, "--json")
    assert json.loads(res.output)["real_cifar100"] is False
    res = run("data", "prepare", "--root", tmp_path, ok=False)
    assert res.exit_code == 1 and "choose exactly one source" in res.output
    res = run("data", "info", "--root", tmp_path / "missing", ok=False)
    assert res.exit_code == 1 and "folder not found" in res.output
    (tmp_path / "cifar-100-python" / "test").write_bytes(b"\x80\x04junk")
    res = run("data", "info", "--root", tmp_path, ok=False)
    assert res.exit_code == 1 and "error:" in res.output and "test: not a readable pickle" in res.output
    assert "Traceback" not in res.output


def test_import_from_bad_folder_keeps_old_data(tmp_path):
    run("data", "prepare", "--root", tmp_path, "--synthetic", "--per-class", 1)
    bad = tmp_path / "bad" / "cifar-100-python"
    bad.mkdir(parents=True)
    pickle.dump({"data": [1, 2, 3]}, open(bad / "train", "wb"))
    res = run("data", "prepare", "--root", tmp_path, "--from", bad, ok=False)
    assert res.exit_code == 1 and "fine_labels" in res.output
    assert "100 train" in run("data", "info", "--root", tmp_path).output.replace("train images: 100", "100 train")


def test_splits_make_and_show(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_GENERATED_SPLITS", str(tmp_path / "gen"))
    run("data", "prepare", "--root", tmp_path, "--synthetic", "--per-class", 30)
    res = run("splits", "make", "tiny", "--data-root", tmp_path, "--max-per-class", 20, "--ratio", 10,
              "--shots", "5,2", "--subsets", 3)
    assert "tiny_5shot_3" in res.output and "tiny_2shot_1" in res.output and "wrote 8 files" in res.output
    from harness import splits
    full = splits.load_split("tiny_full")
    assert len(full) == 3000  # every image: 30 per class
    assert np.isin(splits.load_split("tiny_5shot_2"), full).all()
    res = run("splits", "show", "tiny", "--data-root", tmp_path, "--plot", tmp_path / "h.png")
    assert "imbalance ratio 10.0" in res.output and (tmp_path / "h.png").stat().st_size > 1000
    res = run("splits", "show", "nope", "--data-root", tmp_path, ok=False)
    assert "unknown split 'nope'" in res.output


@pytest.mark.skipif(not SHARED_SPLITS.exists(), reason="../shared/splits not present")
def test_splits_import_verify(tmp_path):
    res = run("splits", "import", SHARED_SPLITS, "--splits-root", tmp_path)
    assert "imported 17" in res.output
    assert "17 ok, 0 missing, 0 corrupt" in run("splits", "verify", "--splits-root", tmp_path).output
    f = next(tmp_path.rglob("cifar100_split3_D_i.npy"))
    f.write_bytes(f.read_bytes()[:-8] + b"\0" * 8)
    res = run("splits", "verify", "--splits-root", tmp_path, ok=False)
    assert res.exit_code == 1 and "digest mismatch: split3" in res.output


def test_runs_commands(tmp_path):
    url = f"sqlite:///{tmp_path}/r.db"
    assert "no runs" in run("runs", "list", "--registry", url).output
    from harness.registry import Registry
    r = Registry(url)
    rid = r.create_run("sdclr", "split2", 10, 5, {"lr": 0.5}, tags=["smoke"])
    r.log_epoch(rid, 1, loss=6.0)
    out = run("runs", "list", "--registry", url, "--method", "sdclr").output
    assert "sdclr" in out and "split2" in out
    assert json.loads(run("runs", "list", "--registry", url, "--json").output)[0]["id"] == rid
    shown = json.loads(run("runs", "show", rid, "--registry", url, "--json").output)
    assert shown["run"]["config"] == {"lr": 0.5} and shown["epochs"][0]["loss"] == 6.0
    assert "config" in run("runs", "show", rid, "--registry", url).output
    res = run("runs", "show", 42, "--registry", url, ok=False)
    assert res.exit_code == 1 and "no run with id 42" in res.output
    run("runs", "delete", rid, "--yes", "--registry", url)
    assert "no runs" in run("runs", "list", "--registry", url).output
    res = run("runs", "list", "--registry", "bogus://", ok=False)
    assert res.exit_code == 1 and "error:" in res.output


def test_train_command_errors(tmp_path):
    url = f"sqlite:///{tmp_path}/r.db"
    res = run("train", "byol", "--registry", url, ok=False)
    assert res.exit_code == 1 and "unknown method 'byol'" in res.output
    res = run("train", "simclr", "--resume", 7, "--registry", url, ok=False)
    assert res.exit_code == 1 and "no run with id 7" in res.output
    res = run("train", "simclr", "--split", "9", "--data-root", tmp_path, "--registry", url, ok=False)
    assert res.exit_code == 1 and "folder not found" in res.output
    res = run("train", "simclr", "--precision", "fp8", "--registry", url, "--device", "cpu", ok=False)
    assert res.exit_code == 1 and "choose auto, bf16 or fp32" in res.output
