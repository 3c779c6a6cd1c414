"""Hostile input files: data pickles, split .npy files and checkpoints never run code.

Every payload here would create a marker file if it ran; each test checks the marker is
absent, that the harness refuses the file with one `error:` line naming the file and the
refused global, and that honest files in the same layouts still load.
"""
from __future__ import annotations

import builtins
import os
import pickle
import subprocess

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from harness import data, splits
from harness.cli import app
from harness.registry import Registry
from harness.safeio import RestrictedUnpickler, load_pickle
from harness.data import DataError, sha256_file


class OsSystem:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class BuiltinsOpen:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return builtins.open, (str(self.marker), "w")


class Popen:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return subprocess.Popen, (["touch", str(self.marker)],)


PAYLOADS = {"os.system": (OsSystem, ".system"), "builtins.open": (BuiltinsOpen, ".open"),
            "subprocess.Popen": (Popen, ".Popen")}  # pickled as posix.system, io.open, (commands|subprocess).Popen


def one_error_line(res) -> str:
    lines = res.output.strip().splitlines()
    assert res.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: "), res.output
    assert "Traceback" not in res.output
    return lines[0]


@pytest.fixture()
def dataset(tmp_path):
    data.make_synthetic(tmp_path / "good", per_class=1)
    return tmp_path / "good"


def poison(folder, part, payload):
    """Put `payload` inside an otherwise valid pickle of `part` (train or meta)."""
    path = folder / data.FOLDER / part
    with open(path, "rb") as f:
        d = pickle.load(f)
    d["extra"] = payload
    with open(path, "wb") as f:
        pickle.dump(d, f, protocol=2 if part == "meta" else 4)
    return path


@pytest.mark.parametrize("part", ["train", "meta"])
@pytest.mark.parametrize("kind", sorted(PAYLOADS))
def test_data_info_refuses_pickle_payloads(dataset, tmp_path, part, kind):
    cls, refused = PAYLOADS[kind]
    marker = tmp_path / "marker"
    path = poison(dataset, part, cls(marker))
    res = CliRunner().invoke(app, ["data", "info", "--root", str(dataset)])
    line = one_error_line(res)
    assert not marker.exists(), "the pickle's payload ran"
    assert str(path) in line and "refused" in line and refused in line


def test_data_prepare_from_refuses_payload_and_keeps_old_data(dataset, tmp_path):
    marker = tmp_path / "marker"
    poison(dataset, "train", OsSystem(marker))
    root = tmp_path / "root"
    data.make_synthetic(root, per_class=2)
    # import_folder demands the official sizes only after the pickle loaded: the payload comes first
    res = CliRunner().invoke(app, ["data", "prepare", "--root", str(root), "--from", str(dataset)])
    line = one_error_line(res)
    assert not marker.exists() and "refused" in line
    assert len(data.load_cifar100(root).train_labels) == 200


def test_restricted_unpickler_loads_every_numpy_layout(tmp_path):
    """CIFAR's own pickles (Python 2, numpy.core names), protocol 2 from Python 3 (bytes via
    _codecs.encode), protocol 4 and 5 (numpy._core, _frombuffer), numpy scalars."""
    obj = {"data": np.arange(12, dtype=np.uint8).reshape(2, 6), "fine_labels": [1, 2], "b": b"\x00\xff",
           "batch_label": "training batch 1 of 1", "n": np.int64(7), "f": 1.5, "none": None, "t": (1, "x")}
    blobs = {p: pickle.dumps(obj, protocol=p) for p in (2, 4, 5)}
    old = blobs[2].replace(b"numpy._core.multiarray", b"numpy.core.multiarray")  # numpy 1 / Python 2 names
    assert old != blobs[2]
    for name, blob in {**{str(k): v for k, v in blobs.items()}, "numpy.core": old}.items():
        path = tmp_path / f"p{name}"
        path.write_bytes(blob)
        d = load_pickle(path, DataError)
        assert d.keys() == obj.keys(), name
        assert np.array_equal(d["data"], obj["data"]) and d["data"].dtype == np.uint8
        assert d["b"] == b"\x00\xff" and d["n"] == 7 and d["t"] == (1, "x") and d["none"] is None


def test_real_layout_pickle_loads(tmp_path):
    """make_synthetic writes CIFAR's layout (uint8 arrays, int lists, names): it loads."""
    d = data.make_synthetic(tmp_path, per_class=2)
    assert d.train_images.shape == (200, 3, 32, 32) and d.class_names[0] == "synthetic_00"


def test_codecs_encode_is_limited_to_latin1(tmp_path):
    # protocol-2 bytes are `_codecs.encode(text, 'latin1')`: any other codec is refused
    blob = pickle.dumps(b"abc", protocol=2).replace(b"latin1", b"rot_13")
    path = tmp_path / "p"
    path.write_bytes(blob)
    with pytest.raises(DataError, match="refused"):
        load_pickle(path, DataError)


def test_unpickler_refuses_before_importing():
    class Evil:
        def __reduce__(self):
            return (eval, ("1 + 1",))
    import io
    with pytest.raises(pickle.UnpicklingError, match="builtins.eval"):
        RestrictedUnpickler(io.BytesIO(pickle.dumps(Evil()))).load()


# -- split files -------------------------------------------------------------------------------

def test_split_npy_with_pickled_objects_is_refused(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.npy"
    np.save(path, np.array([OsSystem(marker)], dtype=object), allow_pickle=True)
    with pytest.raises(splits.SplitError, match="refused.*pickled"):
        splits.load_split(str(path))
    assert not marker.exists()
    res = CliRunner().invoke(app, ["splits", "show", str(path), "--data-root", str(tmp_path / "nodata")])
    one_error_line(res)


# -- checkpoints -------------------------------------------------------------------------------

def evil_checkpoint(path, marker):
    torch.save({"format": 1, "run_id": 1, "method": "simclr", "model": {}, "x": OsSystem(marker)}, path)
    return path


def test_train_resume_refuses_malicious_checkpoint(tmp_path):
    marker = tmp_path / "marker"
    ck = evil_checkpoint(tmp_path / "last.pt", marker)
    url = f"sqlite:///{tmp_path / 'r.db'}"
    reg = Registry(url)
    rid = reg.create_run("simclr", "split1", 10, 2, {}, status="interrupted")
    reg.add_artifact(rid, "checkpoint", str(ck), sha256_file(ck), epoch=1)
    res = CliRunner().invoke(app, ["train", "simclr", "--resume", str(rid), "--registry", url,
                                   "--no-progress", "--device", "cpu"])
    line = one_error_line(res)
    assert not marker.exists(), "the checkpoint's payload ran"
    assert str(ck) in line and "refused" in line and "system" in line


def test_eval_checkpoint_refuses_malicious_checkpoint(tmp_path):
    marker = tmp_path / "marker"
    ck = evil_checkpoint(tmp_path / "evil.pt", marker)
    for extra in ([], ["--format", "reference", "--method", "simclr"]):
        res = CliRunner().invoke(app, ["eval", "--checkpoint", str(ck), "--registry",
                                       f"sqlite:///{tmp_path / 'r.db'}", *extra])
        line = one_error_line(res)
        assert not marker.exists() and "refused" in line and "system" in line


def test_load_reference_refuses_malicious_checkpoint(tmp_path):
    from harness.reference import load_reference
    from harness.errors import HarnessError
    marker = tmp_path / "marker"
    with pytest.raises(HarnessError, match="refused"):
        load_reference(evil_checkpoint(tmp_path / "evil.pt", marker), "simclr")
    assert not marker.exists()


def test_no_unrestricted_loaders_left():
    """Every loader of user files in the harness and tools goes through harness.safeio."""
    import re
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    bad = []
    for p in [*root.glob("harness/*.py"), *root.glob("methods/*.py"), *root.glob("tools/**/*.py")]:
        if p.name == "safeio.py":
            continue
        for n, line in enumerate(p.read_text().splitlines(), 1):
            if re.search(r"pickle\.loads?\(|torch\.load\(|np\.load\(|weights_only\s*=\s*False|allow_pickle\s*=\s*True",
                         line):
                bad.append(f"{p.relative_to(root)}:{n}: {line.strip()}")
    assert not bad, "\n".join(bad)
