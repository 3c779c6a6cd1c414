"""Datasets: a name, class names, an image size and uint8 train/test arrays; load, validate, prepare.

Two layouts on disk, both validated by content (shapes, dtype, label range, sha256 of the
pixels and labels), never by file md5 (copies without the `filenames` key are common):

- CIFAR-100's own python pickles under ROOT/cifar-100-python/ (the paper's dataset, name
  `cifar100`, kept as the official archive unpacks);
- every other dataset under ROOT/NAME/: dataset.json (name, class names, image size, how it
  was made, digests) and four .npy arrays, written by the importers (harness/importers.py:
  CIFAR-10 pickles, folders of images) or by `make_synthetic_dataset`.

A dataset is recognised as a known one (the official CIFAR-100 or CIFAR-10) by digest; only
the CIFAR-100 loader knows that CIFAR-100 has 100 classes of 32 x 32 images.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import re
import shutil
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from harness.errors import HarnessError
from harness.safeio import load_npy, load_pickle, open_input

DEFAULT_ROOT = Path("data")
PAPER_DATASET = "cifar100"       # the paper's dataset: the name of ROOT/cifar-100-python
FOLDER = "cifar-100-python"
CIFAR100_CLASSES = 100
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
# How known datasets are shown in reports; CIFAR-10 is recognised at import by the md5 of its
# official pickles (harness/importers.py), CIFAR-100 by the content digests above.
KNOWN_LABELS = {"cifar100": "CIFAR-100", "cifar10": "CIFAR-10"}
DATASET_FILE = "dataset.json"
DATASET_FORMAT = "harness-dataset-1"
ARRAYS = ("train_images", "train_labels", "test_images", "test_labels")
DATASET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")


class DataError(HarnessError):
    """Bad or missing data; the message names the file and what is wrong."""


@dataclass
class Dataset:
    train_images: np.ndarray  # uint8 (N, 3, S, S)
    train_labels: np.ndarray  # int64 (N,) in [0, classes)
    test_images: np.ndarray   # uint8 (M, 3, S, S)
    test_labels: np.ndarray   # int64 (M,)
    class_names: list[str]
    name: str = PAPER_DATASET
    known_as: str | None = None   # recorded at import (CIFAR-10 by its files' md5); CIFAR-100 by digest
    source: dict = field(default_factory=dict)  # how it was made: format, path, resize rule, skipped files
    _digests: dict | None = field(default=None, repr=False, compare=False)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_size(self) -> int:
        return int(self.train_images.shape[-1])

    def digests(self) -> dict[str, str]:
        if self._digests is None:
            self._digests = {k: sha256_array(getattr(self, k)) for k in ARRAYS}
        return dict(self._digests)

    def digest(self) -> str:
        """One sha256 over the four content digests: what a split or a run records of its data."""
        return hashlib.sha256("".join(self.digests()[k] for k in ARRAYS).encode()).hexdigest()

    def is_real_cifar100(self) -> bool:
        return self.digests() == REAL_DIGESTS

    @property
    def known(self) -> str | None:
        """The known dataset this one is (cifar100, cifar10), or None."""
        if self.name == PAPER_DATASET:
            return PAPER_DATASET if self.is_real_cifar100() else None
        return self.known_as

    def identity(self) -> dict:
        """What a run stores of its data: enough to group, label and check it later."""
        return {"name": self.name, "classes": self.num_classes, "image_size": self.image_size,
                "digest": self.digest(), "known": self.known}


CifarData = Dataset  # the name the CIFAR-100 code used


def dataset_label(name: str, known: str | None) -> str:
    """How reports name a dataset: a known one by its usual name, any other by its own name
    (saying so when it carries a known name without being that data)."""
    if known in KNOWN_LABELS:
        return KNOWN_LABELS[known]
    if name in KNOWN_LABELS:
        return f"{name} (not the official {KNOWN_LABELS[name]})"
    return name


def check_dataset_name(name: str) -> str:
    if not DATASET_NAME.fullmatch(name) or ".." in name or name == FOLDER:
        raise DataError(f"dataset name {name!r}: use 1-64 letters, digits, '_', '-' or '.', starting with a "
                        "letter or digit (it is a folder name under the data root)")
    return name


def sha256_array(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def sha256_file(path: Path) -> str:
    return file_digest(path, "sha256")


def file_digest(path: Path, algorithm: str) -> str:
    """Hex digest of a file, read in 1 MiB chunks (CIFAR's parts are 30-160 MB)."""
    h = hashlib.new(algorithm)
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
    # Python 2 pickles read with encoding="bytes" elsewhere have bytes keys: accept both
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in d.items()}


def parse_pickle_part(path: Path, label_key: str, num_classes: int, layout: str,
                      expected_n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Pixels (N, 3, 32, 32) and int64 labels of one CIFAR python pickle (`data` N x 3072 uint8)."""
    d = _read_pickle(path)
    for key in ("data", label_key):
        if key not in d:
            raise DataError(f"{path}: missing key {key!r} (is this {layout}, python version?)")
    data = np.asarray(d["data"])
    labels = np.asarray(d[label_key])
    if data.dtype != np.uint8:
        raise DataError(f"{path}: pixels have dtype {data.dtype}, expected uint8")
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: pixels have shape {data.shape}, expected (N, 3072)")
    if expected_n is not None and len(data) != expected_n:
        raise DataError(f"{path}: {len(data)} images, expected {expected_n}")
    if labels.shape != (len(data),):
        raise DataError(f"{path}: {labels.shape} labels for {len(data)} images")
    if len(labels) and not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: labels have dtype {labels.dtype}, expected integers")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{path}: labels out of range [0, {num_classes - 1}]: "
                        f"min {labels.min()}, max {labels.max()}")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _parse_part(path: Path, expected_n: int | None) -> tuple[np.ndarray, np.ndarray]:
    return parse_pickle_part(path, "fine_labels", CIFAR100_CLASSES, "CIFAR-100", expected_n)


def check_every_class_trains(labels: np.ndarray, class_names: list[str], where: Path) -> None:
    """A class without a single train image cannot be pretrained on or probed: refuse it."""
    counts = np.bincount(labels, minlength=len(class_names))
    empty = np.flatnonzero(counts == 0)
    if len(empty):
        shown = ", ".join(repr(class_names[c]) for c in empty[:5]) + (", ..." if len(empty) > 5 else "")
        raise DataError(f"{where}: {len(empty)} of {len(class_names)} classes have no train images ({shown}); "
                        "every class needs at least one")


def load_cifar100(root: Path = DEFAULT_ROOT, strict_sizes: bool = False) -> Dataset:
    """Load and validate; `strict_sizes` demands the official 50,000/10,000 images.

    Subsets and other datasets in the same layout (synthetic ones) pass when every one of
    the 100 classes has train images; counts per class may differ.
    """
    folder = dataset_dir(root)
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found (run `harness data prepare --root {root}` "
                        "with --from, --download or --synthetic)")
    tr_x, tr_y = _parse_part(folder / "train", SIZES["train"] if strict_sizes else None)
    te_x, te_y = _parse_part(folder / "test", SIZES["test"] if strict_sizes else None)
    meta = folder / "meta"  # optional: absent means generic class names
    names = _read_pickle(meta).get("fine_label_names") if os.path.lexists(meta) else None
    if names is not None and len(names) != CIFAR100_CLASSES:
        raise DataError(f"{meta}: {len(names)} fine_label_names, expected {CIFAR100_CLASSES}")
    names = [str(n) for n in names] if names else [f"class_{i}" for i in range(CIFAR100_CLASSES)]
    check_every_class_trains(tr_y, names, folder / "train")
    return Dataset(tr_x, tr_y, te_x, te_y, names, name=PAPER_DATASET,
                   source={"format": "cifar100", "path": str(folder)})


# -- the general layout: ROOT/NAME/dataset.json + four .npy arrays ---------------------------------

def available_datasets(root: Path) -> list[str]:
    """Names of the datasets under `root` (cifar100 for a cifar-100-python folder)."""
    root = Path(root)
    names = [PAPER_DATASET] if (root / FOLDER).is_dir() or dataset_dir(root) == root else []
    if root.is_dir():
        names += sorted(p.name for p in root.iterdir() if (p / DATASET_FILE).is_file())
    if (root / DATASET_FILE).is_file():
        names.append(_read_json(root / DATASET_FILE).get("name", root.name))
    return names


def _read_json(path: Path) -> dict:
    with open_input(path, DataError) as f:
        try:
            d = json.loads(f.read().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{path}: not readable JSON ({e}); prepare the dataset again") from None
    if not isinstance(d, dict):
        raise DataError(f"{path}: expected a JSON object")
    return d


def dataset_folder(root: Path, name: str) -> Path:
    """Where dataset `name` lives: ROOT/NAME, or ROOT itself when it is that dataset's folder."""
    root = Path(root)
    if (root / DATASET_FILE).is_file() and root.name == name:
        return root
    return root / check_dataset_name(name)


def load_dataset(root: Path = DEFAULT_ROOT, name: str | None = None) -> Dataset:
    """Dataset `name` under `root` (default: the CIFAR-100 folder, or the one dataset there)."""
    root = Path(root)
    if name is None:
        if (root / DATASET_FILE).is_file():  # ROOT is a dataset folder itself
            return load_folder(root)
        name = PAPER_DATASET
    if name == PAPER_DATASET:
        return load_cifar100(root)
    folder = dataset_folder(root, name)
    if not (folder / DATASET_FILE).is_file():
        have = available_datasets(root)
        raise DataError(f"dataset {name!r} not found: no {folder / DATASET_FILE} (prepare it with "
                        f"`harness data prepare --root {root} --from DIR --name {name}`"
                        + (f"; datasets in {root}: {', '.join(have)})" if have else ")"))
    data = load_folder(folder)
    if data.name != name:
        raise DataError(f"{folder / DATASET_FILE}: names the dataset {data.name!r}, not {name!r} (its folder's name); "
                        "prepare it again")
    return data


def load_folder(folder: Path) -> Dataset:
    """A dataset in the general layout, validated by content against its dataset.json."""
    folder = Path(folder)
    meta_path = folder / DATASET_FILE
    meta = _read_json(meta_path)
    if meta.get("format") != DATASET_FORMAT:
        raise DataError(f"{meta_path}: format {meta.get('format')!r}, expected {DATASET_FORMAT!r}")
    names, size, name = meta.get("classes"), meta.get("image_size"), meta.get("name")
    if not isinstance(name, str) or not DATASET_NAME.fullmatch(name):
        raise DataError(f"{meta_path}: missing or bad dataset name {name!r}")
    if not (isinstance(names, list) and len(names) >= 2 and all(isinstance(n, str) for n in names)):
        raise DataError(f"{meta_path}: 'classes' must list at least two class names")
    if not (isinstance(size, int) and size >= 1):
        raise DataError(f"{meta_path}: 'image_size' must be a positive integer, found {size!r}")
    arrays = {k: load_npy(folder / f"{k}.npy", DataError, hints={errno.ENOENT: "; prepare the dataset again"})
              for k in ARRAYS}
    for part in ("train", "test"):
        x, y = arrays[f"{part}_images"], arrays[f"{part}_labels"]
        where = folder / f"{part}_images.npy"
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (3, size, size):
            raise DataError(f"{where}: {x.dtype} {x.shape}, expected uint8 (N, 3, {size}, {size})")
        if y.dtype != np.int64 or y.shape != (len(x),):
            raise DataError(f"{folder / f'{part}_labels.npy'}: {y.dtype} {y.shape}, expected int64 ({len(x)},)")
        if len(y) and (y.min() < 0 or y.max() >= len(names)):
            raise DataError(f"{folder / f'{part}_labels.npy'}: labels out of range [0, {len(names) - 1}]: "
                            f"min {y.min()}, max {y.max()}")
    data = Dataset(*(arrays[k] for k in ARRAYS), class_names=list(names), name=name,
                   known_as=meta.get("known") if isinstance(meta.get("known"), str) else None,
                   source=meta.get("source") if isinstance(meta.get("source"), dict) else {})
    recorded = meta.get("digests")
    if recorded != data.digests():
        raise DataError(f"{folder}: the arrays' sha256 differ from those recorded in {DATASET_FILE}: the files "
                        "changed since they were prepared; prepare the dataset again")
    check_every_class_trains(data.train_labels, data.class_names, folder / "train_labels.npy")
    return data


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


def _finish(stage: Path, root: Path) -> Dataset:
    """Validate the staged folder, then install it as root/cifar-100-python."""
    try:
        data = load_cifar100(stage)
        _install_atomically(stage / FOLDER, root / FOLDER)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return data


def synthetic_arrays(rng: np.random.Generator, classes: int, size: int, per_class: int,
                     test_per_class: int) -> dict[str, np.ndarray]:
    """Class-dependent colours and stripes plus noise, so that features can tell classes apart."""
    protos = rng.integers(0, 256, size=(classes, 3, 1, 1)).astype(np.float32)
    freq = rng.uniform(0.2, 1.5, size=classes)
    grid = np.arange(size, dtype=np.float32)
    out = {}
    for split, n in (("train", per_class), ("test", test_per_class)):
        labels = np.repeat(np.arange(classes), n)
        rng.shuffle(labels)
        stripes = 60 * np.sin(freq[labels, None, None] * (grid[None, :, None] + grid[None, None, :]))
        img = protos[labels] + stripes[:, None] + rng.normal(0, 20, size=(len(labels), 3, size, size))
        out[f"{split}_images"] = np.clip(img, 0, 255).astype(np.uint8)
        out[f"{split}_labels"] = labels.astype(np.int64)
    return out


def make_synthetic(root: Path, per_class: int = 10, test_per_class: int | None = None, seed: int = 0,
                   log: Callable[[str], None] | None = None) -> Dataset:
    """A small dataset in exactly the CIFAR-100 layout (100 classes, 32 x 32, under
    cifar-100-python/), for smoke tests; `make_synthetic_dataset` makes any other shape."""
    rng = np.random.default_rng(seed)
    test_per_class = per_class if test_per_class is None else test_per_class
    stage = _staging_dir(Path(root), log)
    try:
        (stage / FOLDER).mkdir()
        a = synthetic_arrays(rng, CIFAR100_CLASSES, 32, per_class, test_per_class)
        for split in ("train", "test"):
            labels = a[f"{split}_labels"]
            _write_pickle({"data": a[f"{split}_images"].reshape(len(labels), -1), "fine_labels": labels.tolist(),
                           "coarse_labels": (labels // 5).tolist()}, stage / FOLDER / split)
        _write_pickle({"fine_label_names": [f"synthetic_{i:02d}" for i in range(CIFAR100_CLASSES)],
                       "coarse_label_names": [f"synthetic_group_{i:02d}" for i in range(20)]},
                      stage / FOLDER / "meta")
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return _finish(stage, Path(root))


def make_synthetic_dataset(root: Path, name: str, classes: int, image_size: int = 32, per_class: int = 10,
                           test_per_class: int | None = None, seed: int = 0,
                           log: Callable[[str], None] | None = None) -> Dataset:
    """A synthetic dataset of any class count and image size, in the general layout under ROOT/NAME."""
    if classes < 2 or image_size < 1 or per_class < 1:
        raise DataError(f"a synthetic dataset needs at least 2 classes, 1 image per class and 1 px "
                        f"(got {classes} classes, {per_class} per class, {image_size} px)")
    test_per_class = per_class if test_per_class is None else test_per_class
    a = synthetic_arrays(np.random.default_rng(seed), classes, image_size, per_class, test_per_class)
    width = len(str(classes - 1))
    return write_dataset(root, name, a, [f"synthetic_{i:0{width}d}" for i in range(classes)],
                         source={"format": "synthetic", "seed": seed, "per_class": per_class,
                                 "test_per_class": test_per_class}, log=log)


def write_dataset(root: Path, name: str, arrays: dict[str, np.ndarray], class_names: list[str],
                  source: dict, known: str | None = None, log: Callable[[str], None] | None = None) -> Dataset:
    """Write a dataset in the general layout under ROOT/NAME, validate it, then install it atomically."""
    check_dataset_name(name)
    if name == PAPER_DATASET:
        raise DataError(f"{PAPER_DATASET!r} is the name of the CIFAR-100 pickle folder ({FOLDER}); "
                        "choose another --name")
    size = int(arrays["train_images"].shape[-1])
    stage = _staging_dir(Path(root), log)
    try:
        folder = stage / name
        folder.mkdir()
        for k in ARRAYS:
            np.save(folder / f"{k}.npy", np.ascontiguousarray(arrays[k]), allow_pickle=False)
        meta = {"format": DATASET_FORMAT, "name": name, "classes": [str(c) for c in class_names],
                "image_size": size, "train_images": int(len(arrays["train_labels"])),
                "test_images": int(len(arrays["test_labels"])), "known": known, "source": source,
                "digests": {k: sha256_array(arrays[k]) for k in ARRAYS}}
        (folder / DATASET_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        data = load_folder(folder)
        _install_atomically(folder, Path(root) / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return data


def import_folder(src: Path, root: Path, log: Callable[[str], None] | None = None) -> Dataset:
    """Copy a local `cifar-100-python` folder (the whole dataset or a subset) into root, validated
    by content."""
    src_dir = dataset_dir(Path(src))
    load_cifar100(src_dir)  # fail before copying anything
    stage = _staging_dir(Path(root), log)
    try:
        shutil.copytree(src_dir, stage / FOLDER)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return _finish(stage, Path(root))


def download(root: Path, log: Callable[[str], None] | None = None) -> Dataset:  # pragma: no cover - network
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


def per_class_text(counts: np.ndarray) -> str:
    return f"{counts.max()} per class" if counts.min() == counts.max() else \
        f"{counts.min()} to {counts.max()} per class"


def summary(data: Dataset) -> dict:
    digests = data.digests()
    train = np.bincount(data.train_labels, minlength=data.num_classes)
    test = np.bincount(data.test_labels, minlength=data.num_classes)
    return {
        "name": data.name,
        "label": dataset_label(data.name, data.known),
        "known": data.known,
        "train_images": int(len(data.train_images)),
        "test_images": int(len(data.test_images)),
        "classes": int(data.num_classes),
        "image_size": data.image_size,
        "train_per_class": int(train.max()),
        "test_per_class": int(test.max()),
        "train_per_class_min": int(train.min()),
        "test_per_class_min": int(test.min()),
        "digest": data.digest(),
        "digests": digests,
        "real_cifar100": digests == REAL_DIGESTS,
        "source": data.source,
    }
