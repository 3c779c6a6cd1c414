"""CIFAR-100 in its original python-pickle layout: load, validate, prepare.

Validation is by content (shapes, dtype, label range, per-class counts, sha256 of the
pixels and labels), never by file md5: copies without the `filenames` key are common.
"""
from __future__ import annotations

import errno
import hashlib
import os
import pickle
import re
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from harness.errors import HarnessError
from harness.safeio import load_pickle

DEFAULT_ROOT = Path("data")
FOLDER = "cifar-100-python"
NUM_CLASSES = 100
SIZES = {"train": 50_000, "test": 10_000}
# Content digests of the official CIFAR-100 (sha256 of raw bytes; labels as int64).
REAL_DIGESTS = {
    "train_images": "de64658905c6b161606e3649ddafce7cf86c7634a0cf9116d518e64ef46a33c5",
    "train_labels": "8bf4935e7c77a3096270043c6f3b221b6ecb9c63d1a08608e9af66cff17e977a",
    "test_images": "83c56492b2c11211ad1bb2dbd4f2eef4170a0441e41a41f3039c3144b1f5a511",
    "test_labels": "80031c23f8300724c6fbc588e4bccbe41c6392041782148727bb497b0132c4ad",
}
OFFICIAL_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
OFFICIAL_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"


class DataError(HarnessError):
    """Bad or missing data; the message names the file and what is wrong."""


@dataclass
class CifarData:
    train_images: np.ndarray  # uint8 (50000, 3, 32, 32)
    train_labels: np.ndarray  # int64 (50000,)
    test_images: np.ndarray   # uint8 (10000, 3, 32, 32)
    test_labels: np.ndarray   # int64 (10000,)
    class_names: list[str]

    def digests(self) -> dict[str, str]:
        return {"train_images": sha256_array(self.train_images), "train_labels": sha256_array(self.train_labels),
                "test_images": sha256_array(self.test_images), "test_labels": sha256_array(self.test_labels)}

    def is_real_cifar100(self) -> bool:
        return self.digests() == REAL_DIGESTS


def sha256_array(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def dataset_dir(root: Path) -> Path:
    """Accept either the folder holding `cifar-100-python/` or that folder itself."""
    root = Path(root)
    return root if (root / "train").exists() and root.name == FOLDER else root / FOLDER


def _read_pickle(path: Path) -> dict:
    """A data pickle through the restricted unpickler: a data folder is untrusted input."""
    d = load_pickle(path, DataError, hints={errno.ENOENT: " (run `harness data prepare --root DIR` first)"},
                    corrupt_hint=", prepare the data again")
    if not isinstance(d, dict):
        raise DataError(f"{path}: expected a dict, found {type(d).__name__}")
    return d


def _parse_part(path: Path, expected_n: int | None) -> tuple[np.ndarray, np.ndarray]:
    d = _read_pickle(path)
    for key in ("data", "fine_labels"):
        if key not in d:
            raise DataError(f"{path}: missing key {key!r} (is this CIFAR-100, python version?)")
    data = np.asarray(d["data"])
    labels = np.asarray(d["fine_labels"])
    if data.dtype != np.uint8:
        raise DataError(f"{path}: pixels have dtype {data.dtype}, expected uint8")
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: pixels have shape {data.shape}, expected (N, 3072)")
    if expected_n is not None and len(data) != expected_n:
        raise DataError(f"{path}: {len(data)} images, expected {expected_n}")
    if labels.shape != (len(data),):
        raise DataError(f"{path}: {labels.shape} labels for {len(data)} images")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: labels have dtype {labels.dtype}, expected integers")
    if len(labels) and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise DataError(f"{path}: labels out of range [0, {NUM_CLASSES - 1}]: "
                        f"min {labels.min()}, max {labels.max()}")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def load_cifar100(root: Path = DEFAULT_ROOT, strict_sizes: bool = False) -> CifarData:
    """Load and validate; `strict_sizes` demands the official 50,000/10,000 images.

    Smaller datasets in the same layout (synthetic ones) pass when every class is present
    with equal counts in train and in test, as in CIFAR-100.
    """
    folder = dataset_dir(root)
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found (run `harness data prepare --root {root}` "
                        "with --from, --download or --synthetic)")
    tr_x, tr_y = _parse_part(folder / "train", SIZES["train"] if strict_sizes else None)
    te_x, te_y = _parse_part(folder / "test", SIZES["test"] if strict_sizes else None)
    for name, y in (("train", tr_y), ("test", te_y)):
        counts = np.bincount(y, minlength=NUM_CLASSES)
        if counts.min() != counts.max():
            raise DataError(f"{folder / name}: per-class counts differ ({counts.min()} to {counts.max()}); "
                            "CIFAR-100 has equal counts per class")
    meta = folder / "meta"  # optional: absent means generic class names
    names = _read_pickle(meta).get("fine_label_names") if os.path.lexists(meta) else None
    if names is not None and len(names) != NUM_CLASSES:
        raise DataError(f"{meta}: {len(names)} fine_label_names, expected {NUM_CLASSES}")
    return CifarData(tr_x, tr_y, te_x, te_y, list(names) if names else [f"class_{i}" for i in range(NUM_CLASSES)])


# -- writing datasets ------------------------------------------------------------------

def _write_pickle(obj: dict, path: Path) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=4)


def _install_atomically(build_dir: Path, dest: Path) -> None:
    """Move a fully written and validated dataset folder into place, replacing any old one."""
    if dest.exists():
        old = dest.with_name(dest.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dest, old)
        os.replace(build_dir, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(build_dir, dest)


# A staging folder is named after its owner, .prepare-<pid>@<host>-<random>, so that a later
# prepare can tell one left by a killed process (removed) from one still being written (kept).
_STAGE_NAME = re.compile(r"\.prepare-(?P<pid>\d+)@(?P<host>.+)-[^-]+")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def remove_stale_staging(root: Path, log: Callable[[str], None] | None = None) -> list[Path]:
    """Remove the staging folders under `root` whose owning process (on this host) is gone."""
    host = socket.gethostname()
    stale = []
    for p in sorted(Path(root).glob(".prepare-*")):
        m = _STAGE_NAME.fullmatch(p.name)
        if m is None or m["host"] != host or int(m["pid"]) == os.getpid() or _pid_alive(int(m["pid"])):
            continue  # no owner recorded, another host's, or alive: never touch it
        shutil.rmtree(p, ignore_errors=True)
        stale.append(p)
    if stale and log is not None:
        log(f"removed {len(stale)} stale staging folder(s) left by interrupted prepares: "
            + ", ".join(str(p) for p in stale))
    return stale


def _staging_dir(root: Path, log: Callable[[str], None] | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(root, log)
    return Path(tempfile.mkdtemp(prefix=f".prepare-{os.getpid()}@{socket.gethostname()}-", dir=root))


def _finish(stage: Path, root: Path) -> CifarData:
    """Validate the staged folder, then install it as root/cifar-100-python."""
    try:
        data = load_cifar100(stage)
        _install_atomically(stage / FOLDER, root / FOLDER)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return data


def make_synthetic(root: Path, per_class: int = 10, test_per_class: int | None = None, seed: int = 0,
                   log: Callable[[str], None] | None = None) -> CifarData:
    """A small dataset in exactly the CIFAR-100 layout: class-dependent colours and
    stripes plus noise, so that features can tell classes apart in smoke tests."""
    rng = np.random.default_rng(seed)
    test_per_class = per_class if test_per_class is None else test_per_class
    stage = _staging_dir(Path(root), log)
    try:
        (stage / FOLDER).mkdir()
        protos = rng.integers(0, 256, size=(NUM_CLASSES, 3, 1, 1)).astype(np.float32)
        freq = rng.uniform(0.2, 1.5, size=NUM_CLASSES)
        grid = np.arange(32, dtype=np.float32)
        for split, n in (("train", per_class), ("test", test_per_class)):
            labels = np.repeat(np.arange(NUM_CLASSES), n)
            rng.shuffle(labels)
            stripes = 60 * np.sin(freq[labels, None, None] * (grid[None, :, None] + grid[None, None, :]))
            img = protos[labels] + stripes[:, None] + rng.normal(0, 20, size=(len(labels), 3, 32, 32))
            data = np.clip(img, 0, 255).astype(np.uint8).reshape(len(labels), -1)
            _write_pickle({"data": data, "fine_labels": labels.tolist(),
                           "coarse_labels": (labels // 5).tolist()}, stage / FOLDER / split)
        _write_pickle({"fine_label_names": [f"synthetic_{i:02d}" for i in range(NUM_CLASSES)],
                       "coarse_label_names": [f"synthetic_group_{i:02d}" for i in range(20)]},
                      stage / FOLDER / "meta")
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return _finish(stage, Path(root))


def import_folder(src: Path, root: Path, log: Callable[[str], None] | None = None) -> CifarData:
    """Copy a local `cifar-100-python` folder into root, validated by content."""
    src_dir = dataset_dir(Path(src))
    load_cifar100(src_dir, strict_sizes=True)  # fail before copying anything
    stage = _staging_dir(Path(root), log)
    try:
        shutil.copytree(src_dir, stage / FOLDER)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return _finish(stage, Path(root))


def download(root: Path, log: Callable[[str], None] | None = None) -> CifarData:  # pragma: no cover - network
    """Fetch the official archive via torchvision (which checks its md5), then validate."""
    from torchvision.datasets.utils import download_and_extract_archive

    stage = _staging_dir(Path(root), log)
    try:
        download_and_extract_archive(OFFICIAL_URL, download_root=str(stage), md5=OFFICIAL_MD5)
        (stage / "cifar-100-python.tar.gz").unlink(missing_ok=True)
    except BaseException as e:
        shutil.rmtree(stage, ignore_errors=True)
        if isinstance(e, Exception):
            raise DataError(f"download of {OFFICIAL_URL} failed: {e}. Offline? "
                            "Use `harness data prepare --from PATH/cifar-100-python`") from None
        raise
    return _finish(stage, Path(root))


def summary(data: CifarData) -> dict:
    digests = data.digests()
    return {
        "train_images": int(len(data.train_images)),
        "test_images": int(len(data.test_images)),
        "classes": int(len(np.unique(data.train_labels))),
        "train_per_class": int(np.bincount(data.train_labels, minlength=NUM_CLASSES).max()),
        "test_per_class": int(np.bincount(data.test_labels, minlength=NUM_CLASSES).max()),
        "digests": digests,
        "real_cifar100": digests == REAL_DIGESTS,
    }
