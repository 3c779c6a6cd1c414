"""Reading files a user may have downloaded: no code in them ever runs, every failure is named.

Data pickles, split `.npy` files and checkpoints are untrusted input. Pickles go through
`RestrictedUnpickler`, which admits only what a CIFAR-100 pickle holds (dicts, lists,
strings, numbers and numpy arrays); `.npy` files load with `allow_pickle=False`; PyTorch
files with `weights_only=True`. A file that cannot be opened is reported by its cause in
words (not found, is a directory, symlink loop, permission denied), never as "corrupt".
Each reader takes the caller's error class, so the message arrives as that module's error.
"""
from __future__ import annotations

import codecs
import errno
import os
import pickle
import re
import stat
from pathlib import Path
from typing import BinaryIO

import numpy as np

from harness.errors import HarnessError


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle asked for a global outside the allowed set (find_class refused it)."""

    def __init__(self, module: str, name: str):
        super().__init__(f"{module}.{name}")
        self.qualname = f"{module}.{name}"


def _latin1_encode(text: str, encoding: str = "latin1", errors: str = "strict") -> bytes:
    """`_codecs.encode` as protocol-2 pickles of bytes use it, limited to latin-1 (what they write)."""
    if codecs.lookup(encoding).name != "iso8859-1":
        raise RefusedGlobal("_codecs", f"encode(encoding={encoding!r})")
    return codecs.encode(text, "latin1", errors)


def _allowed_globals() -> dict[tuple[str, str], object]:
    from numpy._core import multiarray, numeric

    allowed: dict[tuple[str, str], object] = {("_codecs", "encode"): _latin1_encode}
    # numpy arrays and scalars pickle as calls to these reconstructors; the module moved from
    # numpy.core (numpy 1, and the official Python 2 CIFAR pickles) to numpy._core (numpy 2)
    for mod in ("numpy.core", "numpy._core"):
        allowed[(f"{mod}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{mod}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{mod}.numeric", "_frombuffer")] = numeric._frombuffer  # protocol 5
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """Builds only dicts, lists, tuples, str/bytes/int/float/bool/None and numpy arrays/dtypes.
    Any other global (os.system, builtins.eval, subprocess.Popen, ...) raises RefusedGlobal
    before it is imported, so a `__reduce__` payload never runs."""

    _allowed: dict[tuple[str, str], object] | None = None

    def find_class(self, module: str, name: str):
        if RestrictedUnpickler._allowed is None:
            RestrictedUnpickler._allowed = _allowed_globals()
        try:
            return RestrictedUnpickler._allowed[(module, name)]
        except KeyError:
            raise RefusedGlobal(module, name) from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not allowed")


# -- opening -------------------------------------------------------------------------------

_CAUSES = {
    errno.ENOENT: "not found",
    errno.EISDIR: "is a directory, not a file",
    errno.ELOOP: "is a symlink loop",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ENOTDIR: "not found (a part of the path is a file, not a folder)",
    errno.ENAMETOOLONG: "the file name is too long",
}


def open_cause(e: OSError) -> str:
    """The reason an open failed, in words."""
    return _CAUSES.get(e.errno, e.strerror or e.__class__.__name__)


def open_input(path: Path, error: type[HarnessError], hints: dict[int, str] | None = None) -> BinaryIO:
    """Open `path` for reading, or raise `error` naming the file and the cause in words.
    `hints` adds advice per errno (e.g. what to run when the file is missing)."""
    path = Path(path)
    try:
        st = os.stat(path)  # before open: opening a FIFO would block, a folder opens on some systems
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{path}: not a regular file")
        return open(path, "rb")
    except OSError as e:
        hint = (hints or {}).get(e.errno, "")
        raise error(f"{path}: {open_cause(e)}{hint}") from None


def check_readable(path: Path, error: type[HarnessError], hints: dict[int, str] | None = None) -> None:
    open_input(path, error, hints).close()


# -- loading -------------------------------------------------------------------------------

def refused_message(path: Path, qualname: str) -> str:
    return (f"{path}: refused to load: it asks for the global {qualname}, which a data file never holds "
            "(the file may be malicious; get it from a trusted source)")


def load_pickle(path: Path, error: type[HarnessError], hints: dict[int, str] | None = None,
                corrupt_hint: str = "") -> object:
    """Unpickle `path` with RestrictedUnpickler (latin-1 for Python 2 pickles such as CIFAR's)."""
    with open_input(path, error, hints) as f:
        try:
            return RestrictedUnpickler(f, encoding="latin1").load()
        except RefusedGlobal as e:
            raise error(refused_message(path, e.qualname)) from None
        except Exception as e:  # truncated or corrupt pickles raise many different types
            raise error(f"{path}: not a readable pickle ({e.__class__.__name__}: {_first_line(e)}); "
                        f"the file is truncated or corrupt{corrupt_hint}") from None


def load_npy(path: Path, error: type[HarnessError], hints: dict[int, str] | None = None) -> np.ndarray:
    """A `.npy` array without pickled objects (allow_pickle=False)."""
    with open_input(path, error, hints) as f:
        try:
            return np.load(f, allow_pickle=False)
        except ValueError as e:
            if "allow_pickle" in str(e):
                raise error(f"{path}: refused to load: it holds pickled Python objects, "
                            "an index file never does (the file may be malicious)") from None
            raise error(f"{path}: not a readable .npy file ({_first_line(e)}); truncated or corrupt") from None
        except Exception as e:
            raise error(f"{path}: not a readable .npy file ({e.__class__.__name__}: {_first_line(e)}); "
                        "truncated or corrupt") from None


_UNSUPPORTED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")  # torch names the refused global so


def load_torch(path: Path, error: type[HarnessError], what: str = "checkpoint",
               hints: dict[int, str] | None = None) -> object:
    """torch.load with weights_only=True: tensors, dicts, lists and plain values only."""
    import torch

    with open_input(path, error, hints) as f:
        try:
            return torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # not a torch file, truncated, or holding arbitrary objects
            m = _UNSUPPORTED_GLOBAL.search(str(e))
            if m:
                raise error(f"{path}: refused to load the {what}: it asks for the global {m.group(1)}, which "
                            "a checkpoint never holds (the file may be malicious)") from None
            raise error(f"{path}: cannot read as a PyTorch {what} ({e.__class__.__name__}: "
                        f"{_first_line(e)}); the file is truncated or corrupt") from None


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else ""


__all__ = ["RestrictedUnpickler", "RefusedGlobal", "check_readable", "load_npy", "load_pickle", "load_torch",
           "open_cause", "open_input"]
