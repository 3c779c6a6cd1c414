"""Split manifest, import/verify against ../shared/splits, validation, generation."""
import json

import numpy as np
import pytest

from harness import splits
from tests.conftest import SHARED_SPLITS


def test_manifest_lists_every_paper_file():
    entries = splits.paper_entries()
    names = {e.name for e in entries}
    assert len(entries) == 17
    assert {"full_shot", "val"} | {f"split{k}" for k in range(1, 6)} <= names
    assert {f"split{k}_{s}shot" for k in range(1, 6) for s in (100, 50)} <= names
    lengths = {e.role: e.length for e in entries}
    assert lengths == {"probe-full": 40000, "val": 5000, "pretrain": 9754, "probe-100": 10000, "probe-50": 5000}
    assert all(len(e.sha256) == 64 and e.url.startswith("https://") for e in entries)


@pytest.mark.skipif(not (SHARED_SPLITS / "SHA256SUMS").exists(), reason="../shared/splits not present")
def test_manifest_digests_match_shared_sums():
    sums = {line.split()[1].lstrip("./"): line.split()[0] for line in open(SHARED_SPLITS / "SHA256SUMS")}
    assert {e.file: e.sha256 for e in splits.paper_entries()} == sums


@pytest.mark.skipif(not SHARED_SPLITS.exists(), reason="../shared/splits not present")
def test_import_verify_load(tmp_path):
    assert splits.import_dir(SHARED_SPLITS, tmp_path) == []
    assert all(st == "ok" for _, st in splits.verify(tmp_path))
    idx = splits.load_split("split1", tmp_path, num_images=50000)
    assert idx.shape == (9754,) and idx.dtype == np.int64
    # corrupt one file: verify and load both say so
    path = tmp_path / splits.entry("split2")[0].file
    arr = np.load(path, allow_pickle=False)
    arr[0] = arr[1]
    np.save(path, arr)
    assert dict(splits.verify(tmp_path))["split2"].startswith("sha256 mismatch")
    with pytest.raises(splits.SplitError, match="corrupt or not the paper's"):
        splits.load_split("split2", tmp_path)


def test_import_rejects_wrong_digest_and_writes_nothing(tmp_path):
    src = tmp_path / "src" / "cifar100"
    src.mkdir(parents=True)
    np.save(src / "cifar100_trainIdxList.npy", np.arange(40000))
    with pytest.raises(splits.SplitError, match="does not match"):
        splits.import_dir(tmp_path / "src", tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


def test_missing_and_unknown(tmp_path):
    with pytest.raises(splits.SplitError, match="unknown split 'split9'"):
        splits.load_split("split9", tmp_path)
    with pytest.raises(splits.SplitError, match="not found; run `harness splits import"):
        splits.load_split("split1", tmp_path)


@pytest.mark.parametrize("idx, message", [
    (np.array([0, 1, 1]), "1 duplicate"),
    (np.array([0, 99]), "out of range"),
    (np.array([-1, 3]), "negative"),
    (np.zeros((2, 2), np.int64), "1-D"),
    (np.array([0.5]), "integer"),
])
def test_index_validation(tmp_path, idx, message):
    p = tmp_path / "x.npy"
    np.save(p, idx)
    with pytest.raises(splits.SplitError, match=message):
        splits.load_split(str(p), num_images=50)


def test_long_tail_profile_matches_paper():
    prof = splits.long_tail_profile(100, 450, 100.0)
    assert prof[0] == 450 and prof[-1] == 4 and prof.sum() == 9754
    assert np.all(np.diff(prof) <= 0)


def test_make_long_tailed_and_k_shot(tmp_path):
    labels = np.repeat(np.arange(100), 30)
    exclude = np.arange(0, len(labels), 10)
    idx = splits.make_long_tailed(labels, max_per_class=20, ratio=10, seed=3, exclude=exclude)
    counts = np.bincount(labels[idx], minlength=100)
    assert sorted(counts, reverse=True) == splits.long_tail_profile(100, 20, 10).tolist()
    assert not np.isin(idx, exclude).any()
    assert len(np.unique(idx)) == len(idx)
    again = splits.make_long_tailed(labels, max_per_class=20, ratio=10, seed=3, exclude=exclude)
    assert np.array_equal(idx, again)
    k = splits.make_k_shot(labels, 5, seed=1)
    assert np.bincount(labels[k], minlength=100).tolist() == [5] * 100
    with pytest.raises(splits.SplitError, match="needs 40"):
        splits.make_k_shot(labels, 40)
    e = splits.save_generated("lt_test", idx, "pretrain", "test", tmp_path)
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert m["splits"][0]["name"] == "lt_test" and m["splits"][0]["sha256"] == e.sha256


def test_generated_split_loads_by_name(tmp_path, monkeypatch):
    monkeypatch.setenv(splits.GENERATED_ENV_VAR, str(tmp_path))
    splits.save_generated("mine", np.array([3, 1, 2]), "pretrain", "t")
    assert splits.load_split("mine").tolist() == [3, 1, 2]
    (tmp_path / "mine.npy").write_bytes(b"garbage")
    with pytest.raises(splits.SplitError, match="sha256"):
        splits.load_split("mine")
