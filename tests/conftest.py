"""Shared fixtures: real CIFAR-100 from ../shared when present, else synthetic data."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHARED_CIFAR = SHARED / "data" / "cifar-100-python"
SHARED_SPLITS = SHARED / "splits"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only contend on a busy 2-core box (10x slower).
    Modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def has_real_cifar() -> bool:
    return (SHARED_CIFAR / "train").is_file()


@pytest.fixture(scope="session")
def cifar_images() -> np.ndarray:
    """256 uint8 images (N, 3, 32, 32): real CIFAR-100 test images when available."""
    if has_real_cifar():
        from harness.data import DataError
        from harness.safeio import load_pickle
        d = load_pickle(SHARED_CIFAR / "test", DataError)  # the harness's restricted loader
        return np.asarray(d["data"][:256], dtype=np.uint8).reshape(-1, 3, 32, 32)
    rng = np.random.default_rng(0)
    # smooth random images: closer to natural statistics than white noise
    base = rng.integers(0, 256, size=(256, 3, 8, 8)).astype(np.float32)
    img = np.kron(base, np.ones((1, 1, 4, 4), np.float32))
    img += rng.normal(0, 12, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)
