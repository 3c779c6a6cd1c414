"""CIFAR loader: synthetic round trip, validation errors, atomic prepare, real digests."""
import pickle

import numpy as np
import pytest

from harness import data
from harness.safeio import load_pickle  # the harness's restricted loader, even for our own files
from tests.conftest import SHARED_CIFAR, has_real_cifar


@pytest.fixture()
def synthetic_root(tmp_path):
    data.make_synthetic(tmp_path, per_class=3, seed=1)
    return tmp_path


def test_synthetic_layout_matches_cifar(synthetic_root):
    d = data.load_cifar100(synthetic_root)
    assert d.train_images.shape == (300, 3, 32, 32) and d.train_images.dtype == np.uint8
    assert d.test_images.shape == (300, 3, 32, 32)
    assert d.train_labels.dtype == np.int64
    assert np.bincount(d.train_labels, minlength=100).tolist() == [3] * 100
    assert len(d.class_names) == 100
    raw = load_pickle(synthetic_root / "cifar-100-python" / "train", data.DataError)
    assert raw["data"].shape == (300, 3072) and set(raw) >= {"data", "fine_labels", "coarse_labels"}
    assert not d.is_real_cifar100()


def test_synthetic_is_deterministic(tmp_path):
    a = data.make_synthetic(tmp_path / "a", per_class=2, seed=5)
    b = data.make_synthetic(tmp_path / "b", per_class=2, seed=5)
    assert a.digests() == b.digests()


def _rewrite(root, part, **changes):
    path = root / "cifar-100-python" / part
    d = load_pickle(path, data.DataError)
    d.update(changes)
    pickle.dump(d, open(path, "wb"))
    return path


def test_truncated_pickle_is_a_clear_error(synthetic_root):
    path = synthetic_root / "cifar-100-python" / "train"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(data.DataError, match="train: not a readable pickle"):
        data.load_cifar100(synthetic_root)


@pytest.mark.parametrize("change, message", [
    (lambda d: {"data": d["data"][:, :100]}, "expected \\(N, 3072\\)"),
    (lambda d: {"data": d["data"].astype(np.float32)}, "expected uint8"),
    (lambda d: {"fine_labels": [100] + list(d["fine_labels"][1:])}, "labels out of range"),
    (lambda d: {"fine_labels": list(d["fine_labels"][:-1])}, "labels for"),
])
def test_bad_content_names_file_and_problem(synthetic_root, change, message):
    path = synthetic_root / "cifar-100-python" / "train"
    d = load_pickle(path, data.DataError)
    _rewrite(synthetic_root, "train", **change(d))
    with pytest.raises(data.DataError, match=message) as e:
        data.load_cifar100(synthetic_root)
    assert "train" in str(e.value)


def test_missing_folder(tmp_path):
    with pytest.raises(data.DataError, match="folder not found"):
        data.load_cifar100(tmp_path / "nothing")


def test_failed_import_leaves_nothing_behind(tmp_path, synthetic_root):
    dest = tmp_path / "dest"
    # a subset imports (issue 11); labels beyond CIFAR-100's 100 classes do not
    _rewrite(synthetic_root, "test", fine_labels=[100] * 300)
    with pytest.raises(data.DataError, match="labels out of range"):
        data.import_folder(synthetic_root / "cifar-100-python", dest)
    assert not (dest / "cifar-100-python").exists()
    assert not dest.exists() or not any(dest.iterdir())


def test_prepare_replaces_old_dataset_atomically(tmp_path):
    data.make_synthetic(tmp_path, per_class=2, seed=1)
    data.make_synthetic(tmp_path, per_class=3, seed=2)
    assert len(data.load_cifar100(tmp_path).train_labels) == 300
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar-100-python"]


@pytest.mark.skipif(not has_real_cifar(), reason="../shared/data not present")
def test_real_cifar_digests_and_import(tmp_path):
    d = data.import_folder(SHARED_CIFAR, tmp_path)
    assert d.is_real_cifar100()
    assert d.digests() == data.REAL_DIGESTS
    assert d.class_names[0] == "apple"
