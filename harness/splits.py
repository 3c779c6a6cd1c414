"""Index splits: the paper's files (listed with digests in splits/manifest.json, never
committed), verification, inspection, and generation of new long-tailed splits.

A split is a 1-D int64 .npy array of positions in a dataset's train set.
"""
from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from harness.data import PAPER_DATASET, sha256_file
from harness.errors import HarnessError
from harness.safeio import check_readable, load_npy

PROJECT = Path(__file__).resolve().parents[1]
MANIFEST = PROJECT / "splits" / "manifest.json"
GENERATED_ENV_VAR = "HARNESS_GENERATED_SPLITS"
DEFAULT_ROOT = Path("splits/paper")
ENV_VAR = "HARNESS_SPLITS"
ROLES = ("pretrain", "probe-full", "probe-100", "probe-50", "val")


class SplitError(HarnessError):
    """Unknown, missing, corrupt or invalid split; the message says what to do."""


@dataclass(frozen=True)
class SplitEntry:
    name: str
    file: str  # path relative to the splits root
    length: int
    sha256: str
    role: str
    url: str = ""
    description: str = ""
    dataset: str = PAPER_DATASET  # whose train set the indices point into (older manifests: CIFAR-100's)
    dataset_digest: str = ""      # Dataset.digest() of the data it was drawn from ("" for the paper's)


SPLIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")


def check_split_name(name: str) -> str:
    """A generated split's name is a file name in its folder: no separators, no `..`, no odd characters."""
    if not SPLIT_NAME.fullmatch(name) or ".." in name or name.endswith(".npy"):
        raise SplitError(f"split name {name!r}: use 1-64 letters, digits, '_', '-' or '.', starting with a "
                         "letter or digit (no path separators, no '..', no .npy suffix)")
    return name


def resolve_root(root: Path | None = None) -> Path:
    return Path(root or os.environ.get(ENV_VAR) or DEFAULT_ROOT)


def generated_dir() -> Path:
    """Where generated splits live: committed under splits/generated unless overridden."""
    return Path(os.environ.get(GENERATED_ENV_VAR) or PROJECT / "splits" / "generated")


def _read_manifest(path: Path) -> list[SplitEntry]:
    if not path.is_file():
        return []
    raw = json.loads(path.read_text())
    return [SplitEntry(e["name"], e["file"], int(e["length"]), e["sha256"], e["role"], e.get("url", ""),
                       e.get("description", ""), e.get("dataset") or PAPER_DATASET, e.get("dataset_digest", ""))
            for e in raw["splits"]]


def paper_entries() -> list[SplitEntry]:
    return _read_manifest(MANIFEST)


def generated_entries(folder: Path | None = None) -> list[SplitEntry]:
    return _read_manifest((folder or generated_dir()) / "manifest.json")


def entry(name: str) -> tuple[SplitEntry, bool]:
    """The manifest entry for `name` and whether it is a paper split (else generated)."""
    for e in paper_entries():
        if e.name == name:
            return e, True
    for e in generated_entries():
        if e.name == name:
            return e, False
    known = ", ".join(e.name for e in paper_entries() + generated_entries())
    raise SplitError(f"unknown split {name!r}; known: {known}")


def split_dataset(name: str) -> str | None:
    """The dataset a named split belongs to (None for a bare .npy file, which does not say)."""
    if name.endswith(".npy"):
        return None
    return entry(name)[0].dataset


def check_belongs(name: str, data) -> None:
    """Refuse split `name` for dataset `data` when it was drawn from another dataset (or from other
    contents under the same name); a bare .npy file is only range-checked."""
    if name.endswith(".npy"):
        return
    e, _ = entry(name)
    if e.dataset != data.name:
        raise SplitError(f"split {name!r} belongs to dataset {e.dataset!r}, not {data.name!r}: use a split made "
                         f"from {data.name!r} (`harness splits make NAME --dataset {data.name}`)")
    if e.dataset_digest and e.dataset_digest != data.digest():
        raise SplitError(f"split {name!r} was drawn from other contents of dataset {data.name!r} (sha256 "
                         f"{e.dataset_digest[:12]}…, the data now is {data.digest()[:12]}…): prepare the same "
                         "data again, or make the split again with --force")


def validate_indices(idx: np.ndarray, num_images: int | None, what: str) -> np.ndarray:
    if idx.ndim != 1:
        raise SplitError(f"{what}: expected a 1-D index array, found shape {idx.shape}")
    if not np.issubdtype(idx.dtype, np.integer):
        raise SplitError(f"{what}: expected integer indices, found dtype {idx.dtype}")
    if len(idx) and idx.min() < 0:
        raise SplitError(f"{what}: negative index {idx.min()}")
    if num_images is not None and len(idx) and idx.max() >= num_images:
        raise SplitError(f"{what}: index {idx.max()} out of range for a dataset of {num_images} images "
                         "(is this split for another dataset?)")
    uniq, counts = np.unique(idx, return_counts=True)
    if len(uniq) != len(idx):
        raise SplitError(f"{what}: {len(idx) - len(uniq)} duplicate indices (e.g. {uniq[counts > 1][:3].tolist()})")
    return idx.astype(np.int64)


def _load_npy(path: Path) -> np.ndarray:
    return load_npy(path, SplitError)  # allow_pickle=False: a split file never runs code


def load_split(name: str, root: Path | None = None, num_images: int | None = None) -> np.ndarray:
    """Indices of split `name` (a manifest name or a path to a .npy file), digest-verified."""
    if name.endswith(".npy"):
        path = Path(name)
        return validate_indices(_load_npy(path), num_images, str(path))
    e, is_paper = entry(name)
    path = (resolve_root(root) if is_paper else generated_dir()) / e.file
    check_readable(path, SplitError, hints={errno.ENOENT: "; run `harness splits import DIR` (e.g. "
                                            f"../shared/splits) or `harness splits fetch` to get split {name!r}"})
    digest = sha256_file(path)
    if digest != e.sha256:
        raise SplitError(f"split {name!r}: {path} has sha256 {digest[:12]}…, the manifest says "
                         f"{e.sha256[:12]}…; the file is corrupt or not the paper's, import it again")
    idx = validate_indices(_load_npy(path), num_images, f"split {name!r}")
    if len(idx) != e.length:
        raise SplitError(f"split {name!r}: {len(idx)} indices, manifest says {e.length}")
    return idx


def pretrain_names() -> list[str]:
    return [e.name for e in paper_entries() + generated_entries() if e.role == "pretrain"]


def probe_names(role: str) -> list[str]:
    """Paper probe lists of one role, in manifest order (split1_100shot..split5_100shot)."""
    return [e.name for e in paper_entries() if e.role == role]


# -- obtaining the paper's files -----------------------------------------------------------

def _install_file(src_bytes_path: Path, dest: Path, e: SplitEntry) -> None:
    digest = sha256_file(src_bytes_path)
    if digest != e.sha256:
        raise SplitError(f"{e.name}: {src_bytes_path} has sha256 {digest[:12]}…, expected {e.sha256[:12]}…")
    with open(src_bytes_path, "rb") as src:
        _write_atomically(dest, lambda f: shutil.copyfileobj(src, f))


def _write_atomically(dest: Path, write) -> None:
    """Write `dest` through a temporary file in its folder, then rename. The file is created
    like any other (mode 0666 & ~umask): tempfile.mkstemp would make it 0600."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".tmp-{os.getpid()}-{secrets.token_hex(4)}-{dest.name}")
    try:
        with open(tmp, "xb") as f:
            write(f)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _find_in(src: Path, e: SplitEntry) -> Path | None:
    direct = src / e.file
    if direct.is_file():
        return direct
    hits = sorted(src.rglob(Path(e.file).name))
    return hits[0] if hits else None


def import_dir(src: Path, root: Path | None = None) -> list[str]:
    """Copy every paper split found under `src` into the splits root, verifying digests.
    Fails before writing anything if a found file has the wrong digest."""
    src, root = Path(src), resolve_root(root)
    if not src.is_dir():
        raise SplitError(f"{src}: folder not found")
    found = {e.name: (e, _find_in(src, e)) for e in paper_entries()}
    missing = [n for n, (_, p) in found.items() if p is None]
    if len(missing) == len(found):
        raise SplitError(f"{src}: none of the {len(found)} paper split files is there")
    for name, (e, path) in found.items():
        if path is not None and sha256_file(path) != e.sha256:
            raise SplitError(f"{path}: sha256 does not match the manifest entry {name!r}; nothing imported")
    for name, (e, path) in found.items():
        if path is not None:
            _install_file(path, root / e.file, e)
    return missing


def fetch(root: Path | None = None, timeout: float = 30.0) -> None:  # pragma: no cover - network
    root = resolve_root(root)
    for e in paper_entries():
        dest = root / e.file
        if dest.is_file() and sha256_file(dest) == e.sha256:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            tmp_file = Path(tmp) / "download.npy"
            try:
                with urllib.request.urlopen(e.url, timeout=timeout) as r, open(tmp_file, "wb") as f:
                    shutil.copyfileobj(r, f)
            except OSError as err:
                raise SplitError(f"download of {e.url} failed ({err}); offline? use "
                                 "`harness splits import DIR` with a local copy") from None
            _install_file(tmp_file, dest, e)


def verify(root: Path | None = None) -> list[tuple[str, str]]:
    """(name, status) per paper split: ok, missing, or a mismatch description."""
    root = resolve_root(root)
    out = []
    for e in paper_entries():
        path = root / e.file
        if not path.is_file():
            out.append((e.name, "missing"))
        elif (d := sha256_file(path)) != e.sha256:
            out.append((e.name, f"sha256 mismatch ({d[:12]}…)"))
        else:
            out.append((e.name, "ok"))
    return out


# -- inspecting and generating -----------------------------------------------------------

def _classes(labels: np.ndarray, num_classes: int | None) -> int:
    """The dataset's class count when given (callers with a dataset always give it), else the labels'."""
    return int(num_classes) if num_classes is not None else int(labels.max()) + 1 if len(labels) else 0


def class_counts(idx: np.ndarray, labels: np.ndarray, num_classes: int | None = None) -> np.ndarray:
    return np.bincount(labels[idx], minlength=_classes(labels, num_classes))


def imbalance_ratio(counts: np.ndarray) -> float:
    present = counts[counts > 0]
    return float(present.max() / present.min()) if len(present) else float("nan")


def long_tail_profile(num_classes: int, max_per_class: int, ratio: float) -> np.ndarray:
    """Exponential profile n_i = floor(max * ratio^(-i/(C-1))): 450..4 for the paper's splits."""
    i = np.arange(num_classes)
    return np.floor(max_per_class * ratio ** (-i / (num_classes - 1)) + 1e-9).astype(np.int64)


def make_long_tailed(labels: np.ndarray, max_per_class: int = 450, ratio: float = 100.0, seed: int = 0,
                     exclude: np.ndarray | None = None, num_classes: int | None = None) -> np.ndarray:
    """Draw a long-tailed subset: a seeded random class order gets the exponential profile,
    and each class's images are drawn without replacement from those not excluded."""
    rng = np.random.default_rng(seed)
    num_classes = _classes(labels, num_classes)
    counts = long_tail_profile(num_classes, max_per_class, ratio)
    order = rng.permutation(num_classes)
    pool = np.ones(len(labels), bool)
    if exclude is not None:
        pool[exclude] = False
    picked = []
    for rank, c in enumerate(order):
        cand = np.flatnonzero(pool & (labels == c))
        if len(cand) < counts[rank]:
            raise SplitError(f"class {c} has {len(cand)} images available, the profile needs {counts[rank]}")
        picked.append(rng.choice(cand, size=counts[rank], replace=False))
    return np.sort(np.concatenate(picked)).astype(np.int64)


def make_k_shot(labels: np.ndarray, k: int, seed: int = 0, pool: np.ndarray | None = None,
                num_classes: int | None = None) -> np.ndarray:
    """k images per class drawn from `pool` (default: all images)."""
    rng = np.random.default_rng(seed)
    num_classes = _classes(labels, num_classes)
    pool = np.arange(len(labels)) if pool is None else pool
    picked = []
    for c in range(num_classes):
        cand = pool[labels[pool] == c]
        if len(cand) < k:
            raise SplitError(f"class {c} has {len(cand)} images in the pool, {k}-shot needs {k}")
        picked.append(rng.choice(cand, size=k, replace=False))
    return np.sort(np.concatenate(picked)).astype(np.int64)


def save_generated(name: str, idx: np.ndarray, role: str, description: str,
                   folder: Path | None = None, dataset: str = PAPER_DATASET, dataset_digest: str = "") -> SplitEntry:
    """Write a generated split and record it (name, length, sha256, role) in its manifest."""
    check_split_name(name)
    if role not in ROLES and not re.fullmatch(r"probe-\d+", role):
        raise SplitError(f"unknown role {role!r}; one of {ROLES}")
    if any(e.name == name for e in paper_entries()):
        raise SplitError(f"{name!r} is a paper split name; choose another")
    folder = Path(folder or generated_dir())
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.npy"
    _write_atomically(path, lambda f: np.save(f, idx.astype(np.int64)))
    e = SplitEntry(name, path.name, len(idx), sha256_file(path), role, "", description, dataset, dataset_digest)
    entries = [x for x in generated_entries(folder) if x.name != name] + [e]
    manifest = {"format": "1-D int64 .npy arrays of positions in a dataset's train set",
                "splits": [x.__dict__ for x in entries]}
    _write_atomically(folder / "manifest.json", lambda f: f.write((json.dumps(manifest, indent=2) + "\n").encode()))
    return e


def plot_histogram(counts: np.ndarray, title: str, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = np.argsort(-counts, kind="stable")
    fig, ax = plt.subplots(figsize=(9, 3.2))
    ax.bar(np.arange(len(counts)), counts[order], width=1.0, color="#4477aa")
    ax.set_yscale("log")
    ax.set_xlabel("class (sorted by count)")
    ax.set_ylabel("images")
    ax.set_title(f"{title}: {counts.sum()} images, imbalance ratio {imbalance_ratio(counts):.1f}")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
