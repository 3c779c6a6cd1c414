"""Small things that add up: comma tags, stale staging folders, split file modes, and why a
file could not be read, in words."""
from __future__ import annotations

import errno
import os
import socket
import stat
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from harness import data, safeio, splits
from harness.cli import app
from harness.registry import Registry, RegistryError
from harness.train import TrainError, load_checkpoint, make_config


def one_error_line(res) -> str:
    lines = res.output.strip().splitlines()
    assert res.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: "), res.output
    return lines[0]


# -- tags ----------------------------------------------------------------------------------------

def test_tag_with_a_comma_is_refused_where_given(tmp_path):
    url = f"sqlite:///{tmp_path / 'r.db'}"
    res = CliRunner().invoke(app, ["train", "simclr", "--tag", "a,b", "--registry", url, "--no-progress"])
    line = one_error_line(res)
    assert "'a,b'" in line and "comma" in line
    assert Registry(url).list_runs() == []
    with pytest.raises(TrainError, match="comma"):
        make_config("simclr", tags=["ok", "x,y"])
    with pytest.raises(RegistryError, match="comma"):
        Registry(url).create_run("simclr", "split1", 10, 2, {}, tags=["x,y"])
    with pytest.raises(RegistryError, match="empty"):
        Registry(url).create_run("simclr", "split1", 10, 2, {}, tags=[""])


def test_tags_without_commas_round_trip(tmp_path):
    reg = Registry(f"sqlite:///{tmp_path / 'r.db'}")
    tags = ["a b", "<x>", "ü;|\"'"]
    rid = reg.create_run("simclr", "split1", 10, 2, {}, tags=tags)
    assert reg.get_run(rid)["tags"] == tags


# -- stale staging folders -------------------------------------------------------------------------

def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_prepare_removes_stale_staging_folders_only(tmp_path):
    root = tmp_path / "root"
    host = socket.gethostname()
    stale = root / f".prepare-{dead_pid()}@{host}-abcd1234"
    live = root / f".prepare-{os.getpid()}@{host}-live5678"
    other_host = root / f".prepare-{dead_pid()}@not-{host}-zzzz0000"
    for d in (stale, live, other_host):
        (d / data.FOLDER).mkdir(parents=True)
        (d / data.FOLDER / "train").write_bytes(b"\0" * 4096)
    res = CliRunner().invoke(app, ["data", "prepare", "--root", str(root), "--synthetic", "--per-class", "1"])
    assert res.exit_code == 0, res.output
    assert not stale.exists() and live.exists() and other_host.exists()
    said = [line for line in res.output.splitlines() if line.startswith("removed")]
    assert len(said) == 1 and stale.name in said[0] and live.name not in said[0]
    # the staging folder this prepare used is gone too, and the next prepare finds nothing to remove
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".prepare-")) == sorted(
        [live.name, other_host.name])
    res = CliRunner().invoke(app, ["data", "prepare", "--root", str(root), "--synthetic", "--per-class", "1"])
    assert "removed" not in res.output


def test_staging_folder_names_its_owner(tmp_path):
    stage = data._staging_dir(tmp_path)
    assert stage.name.startswith(f".prepare-{os.getpid()}@")


# -- split file modes -------------------------------------------------------------------------------

def test_split_files_respect_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        e = splits.save_generated("mine", np.arange(5), "pretrain", "d", tmp_path)
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)
    assert mode(tmp_path / e.file) == 0o644 == mode(tmp_path / "manifest.json")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


# -- why a file cannot be read ------------------------------------------------------------------------

@pytest.fixture()
def dataset(tmp_path):
    data.make_synthetic(tmp_path / "d", per_class=1)
    return tmp_path / "d"


def info_error(root) -> str:
    return one_error_line(CliRunner().invoke(app, ["data", "info", "--root", str(root)]))


def test_directory_in_place_of_a_data_file(dataset):
    train = dataset / data.FOLDER / "train"
    train.unlink()
    train.mkdir()
    line = info_error(dataset)
    assert f"{train}: is a directory" in line and "not found" not in line


def test_symlink_loop_in_place_of_a_data_file(dataset):
    test = dataset / data.FOLDER / "test"
    test.unlink()
    os.symlink(test, test)
    line = info_error(dataset)
    assert f"{test}: is a symlink loop" in line and "not found" not in line


def test_permission_denied_is_not_corrupt(dataset, monkeypatch):
    real_open = open

    def deny(path, *a, **k):
        if str(path).endswith("/train"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(safeio, "open", deny, raising=False)  # root ignores chmod 000
    line = info_error(dataset)
    assert "train: permission denied" in line and "corrupt" not in line


def test_missing_and_truncated_data_files(dataset):
    train = dataset / data.FOLDER / "train"
    train.write_bytes(train.read_bytes()[:100])
    assert "train: not a readable pickle" in info_error(dataset) and "truncated or corrupt" in info_error(dataset)
    train.unlink()
    assert f"{train}: not found" in info_error(dataset)


def test_split_and_checkpoint_causes(tmp_path):
    (tmp_path / "dir.npy").mkdir()
    with pytest.raises(splits.SplitError, match="dir.npy: is a directory"):
        splits.load_split(str(tmp_path / "dir.npy"))
    with pytest.raises(splits.SplitError, match="none.npy: not found"):
        splits.load_split(str(tmp_path / "none.npy"))
    (tmp_path / "ck.pt").mkdir()
    with pytest.raises(TrainError, match="ck.pt: is a directory"):
        load_checkpoint(tmp_path / "ck.pt")
    os.symlink(tmp_path / "loop.pt", tmp_path / "loop.pt")
    with pytest.raises(TrainError, match="loop.pt: is a symlink loop"):
        load_checkpoint(tmp_path / "loop.pt")
