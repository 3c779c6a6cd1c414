"""Datasets other than CIFAR-100: importers on folders the tests write, and 10-, 100- and
1,000-class synthetic datasets of different image sizes through prepare -> splits make ->
train -> eval -> report, all through the CLI."""
from __future__ import annotations

import hashlib
import json
import pickle

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from harness import data, importers, splits
from harness.cli import app
from harness.registry import Registry

pytestmark = pytest.mark.usefixtures("one_thread")


def invoke(*args, ok=True):
    res = CliRunner().invoke(app, [str(a) for a in args])
    if ok:
        assert res.exit_code == 0, res.output
    return res


def one_error(res) -> str:
    lines = res.output.strip().splitlines()
    assert res.exit_code == 1 and lines[-1].startswith("error: ") and "Traceback" not in res.output, res.output
    return lines[-1]


# -- the end-to-end pipeline at 10, 100 and 1,000 classes ----------------------------------------

# name, classes, image size, train per class, pretraining split (max per class, ratio), k-shot lists,
# method, eval options
PIPELINES = [
    ("syn10", 10, 16, 120, (20, 10), "100,50", "bcl-d", []),
    ("syn100", 100, 24, 3, (3, 3), "", "simclr", ["--shots", "full"]),
    ("syn1000", 1000, 8, 2, (2, 2), "", "simclr", ["--shots", "full", "--test-limit", 500]),
]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("datasets")
    url = f"sqlite:///{tmp}/r.db"
    mp = pytest.MonkeyPatch()
    mp.setenv(splits.GENERATED_ENV_VAR, str(tmp / "gen"))
    out = {"tmp": tmp, "url": url, "runs": {}}
    try:
        for name, classes, size, per_class, (top, ratio), shots, method, eval_opts in PIPELINES:
            res = invoke("data", "prepare", "--root", tmp / "data", "--synthetic", "--classes", classes,
                         "--image-size", size, "--per-class", per_class, "--test-per-class", 1, "--name", name)
            assert f"{classes} classes, {size}x{size} px" in res.output
            invoke("splits", "make", f"{name}lt", "--dataset", name, "--data-root", tmp / "data",
                   "--max-per-class", top, "--ratio", ratio, "--shots", shots)
            res = invoke("train", method, "--split", f"{name}lt", "--data-root", tmp / "data", "--epochs", 1,
                         "--batch-size", 128, "--width", 4, "--warmup-epochs", 0, "--device", "cpu",
                         "--no-progress", "--checkpoint-dir", tmp / "ck", "--registry", url)
            run_id = int(res.output.split()[1].rstrip(":"))
            out["runs"][name] = run_id
            out[f"eval_{name}"] = invoke("eval", run_id, "--data-root", tmp / "data", "--epochs", 2, "--device",
                                         "cpu", "--registry", url, *eval_opts).output
        out["report"] = invoke("report", "--registry", url, "--data-root", tmp / "data",
                               "--plots", tmp / "plots").output
        yield out
    finally:
        mp.undo()


def test_every_dataset_reaches_the_report(pipeline):
    reg = Registry(pipeline["url"])
    for name, classes, size, *_ in PIPELINES:
        run = reg.get_run(pipeline["runs"][name])
        assert run["status"] == "done" and run["config"]["dataset"] == name
        assert run["config"]["dataset_info"]["classes"] == classes
        assert run["config"]["dataset_info"]["image_size"] == size
        probes = reg.probes(run["id"])
        assert probes and all(len(p["per_class"]) == classes for p in probes)
        assert all(p["config"]["dataset"] == name for p in probes)
    # the 10-class family's k-shot lists were found from the split itself (no --probe-family)
    kinds = {p["kind"] for p in reg.probes(pipeline["runs"]["syn10"])}
    assert kinds == {"full", "100", "50"}
    entry = {e.name: e for e in splits.generated_entries(pipeline["tmp"] / "gen")}
    assert entry["syn1000lt"].dataset == "syn1000" and len(entry["syn1000lt"].dataset_digest) == 64


def test_report_groups_and_labels_by_dataset(pipeline):
    text = pipeline["report"]
    for name in ("syn10", "syn100", "syn1000"):
        assert f"Table 1: linear-probe top-1 accuracy (%) on {name}-LT" in text
        assert f"Full-shot top-1 accuracy (%) on {name}-LT" in text
    assert "CIFAR-100" not in text.replace("the paper reports CIFAR-100-LT", "")
    assert "Many 4 / Medium 3 / Few 3 classes" in text
    assert "Many 34 / Medium 33 / Few 33 classes" in text
    assert "Many 334 / Medium 333 / Few 333 classes" in text
    for published in ("50.7", "58.7", "46.3", "48.7"):  # the paper's numbers beside none of them
        assert published not in text
    run = pipeline["runs"]["syn1000"]
    assert f"Scored on part of the test set (--test-limit), averaged in as they are: #{run} (500 of 1000" in text
    assert "scored on 500 of 1000 test images" in pipeline["eval_syn1000"]
    assert "many 334, medium 333, few 333 classes" in pipeline["eval_syn1000"]
    for name in ("syn10", "syn100", "syn1000"):
        assert (pipeline["tmp"] / "plots" / f"per_class_vs_count_full_{name}.png").stat().st_size > 1000


def test_report_filtered_to_one_dataset(pipeline):
    text = invoke("report", "--registry", pipeline["url"], "--dataset", "syn10", "--table", "2").output
    assert text.count("Table 2") == 1 and "syn10-LT" in text and "syn100" not in text


def test_runs_of_one_dataset_are_refused_another_datasets_split(pipeline):
    tmp = pipeline["tmp"]
    res = invoke("train", "simclr", "--split", "syn10lt", "--dataset", "syn100", "--data-root", tmp / "data",
                 "--registry", pipeline["url"], "--device", "cpu", ok=False)
    assert "split 'syn10lt' belongs to dataset 'syn10', not 'syn100'" in one_error(res)


# -- image folders ---------------------------------------------------------------------------------

def write_image_folder(root, corrupt=True):
    """3 classes (one more folder left empty), PNG and JPEG, non-square sizes, one corrupt file."""
    rng = np.random.default_rng(0)
    for part, n in (("train", 4), ("test", 2)):
        for c, name in enumerate(["cat", "ant", "bee"]):
            d = root / part / name
            d.mkdir(parents=True)
            for i in range(n):
                a = rng.integers(0, 256, size=(12, 12 + 4 * i, 3), dtype=np.uint8)
                Image.fromarray(a).save(d / f"{i}.png" if i % 2 == 0 else d / f"{i}.jpg", quality=95)
    (root / "train" / "zebra").mkdir()  # an empty class folder
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    if corrupt:
        (root / "train" / "bee" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return root


def test_image_folder_import(tmp_path):
    src = write_image_folder(tmp_path / "pics")
    res = invoke("data", "prepare", "--root", tmp_path / "data", "--from", src, "--image-size", 12, ok=False)
    assert f"{src / 'train' / 'bee' / 'broken.jpg'}: not a readable image" in one_error(res)
    assert "--skip-bad-images" in res.output and not (tmp_path / "data" / "pics").exists()
    res = invoke("data", "prepare", "--root", tmp_path / "data", "--from", src, "--image-size", 12,
                 "--resize-filter", "bilinear", "--skip-bad-images")
    assert "skipped 1 empty class folder(s): train/zebra" in res.output
    assert "skipped 1 unreadable image(s)" in res.output and "broken.jpg" in res.output
    assert "dataset 'pics'" in res.output and "12 train / 6 test images, 3 classes, 12x12 px" in res.output
    d = data.load_dataset(tmp_path / "data", "pics")
    assert d.class_names == ["ant", "bee", "cat"]  # sorted folder names, the empty one left out
    assert np.bincount(d.train_labels).tolist() == [4, 4, 4] and d.train_images.shape == (12, 3, 12, 12)
    # an image already 12 x 12 is kept as it is; a wider one is resized (shorter side 12) and centre-cropped
    first_ant = np.asarray(Image.open(src / "train" / "ant" / "0.png")).transpose(2, 0, 1)
    assert np.array_equal(d.train_images[0], first_ant)
    wide = Image.open(src / "train" / "ant" / "2.png").convert("RGB")  # 20 x 12
    expected = np.asarray(wide.crop((4, 0, 16, 12))).transpose(2, 0, 1)  # no resize needed: height is 12
    assert np.array_equal(d.train_images[2], expected)
    jpeg = Image.open(src / "train" / "ant" / "1.jpg").convert("RGB")  # 16 x 12, decoded from JPEG
    assert np.array_equal(d.train_images[1], np.asarray(jpeg.crop((2, 0, 14, 12))).transpose(2, 0, 1))
    info = invoke("data", "info", "--root", tmp_path / "data").output
    assert "dataset:      pics" in info and "image size:   12 x 12 px" in info
    assert "recognised:   not a known dataset" in info and "bilinear" in info
    meta = json.loads((tmp_path / "data" / "pics" / "dataset.json").read_text())
    assert meta["source"]["resize_filter"] == "bilinear" and meta["source"]["skipped_unreadable"]


def test_image_folder_resize_filter_is_applied(tmp_path):
    src = write_image_folder(tmp_path / "pics", corrupt=False)
    data_root = tmp_path / "data"
    for f in ("nearest", "lanczos"):
        invoke("data", "prepare", "--root", data_root, "--from", src, "--image-size", 6, "--resize-filter", f,
               "--name", f)
    near, lanc = data.load_dataset(data_root, "nearest"), data.load_dataset(data_root, "lanczos")
    im = Image.open(src / "train" / "ant" / "0.png").convert("RGB")  # 12 x 12 -> 6 x 6
    assert np.array_equal(near.train_images[0], np.asarray(im.resize((6, 6), Image.Resampling.NEAREST)).transpose(2, 0, 1))
    assert np.array_equal(lanc.train_images[0], np.asarray(im.resize((6, 6), Image.Resampling.LANCZOS)).transpose(2, 0, 1))
    assert not np.array_equal(near.train_images, lanc.train_images)


@pytest.mark.parametrize("breakage, message", [
    (lambda r: (r / "test" / "moth").mkdir() or Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(
        r / "test" / "moth" / "a.png"), "class 'moth' has test images but no train images"),
    (lambda r: __import__("shutil").rmtree(r / "test"), "test: folder not found"),
    (lambda r: [__import__("shutil").rmtree(r / "train" / c) for c in ("ant", "bee")], "a dataset needs at least two"),
])
def test_image_folder_layout_errors(tmp_path, breakage, message):
    src = write_image_folder(tmp_path / "pics", corrupt=False)
    breakage(src)
    res = invoke("data", "prepare", "--root", tmp_path / "data", "--from", src, ok=False)
    assert message in one_error(res)


def test_unknown_layout_and_bad_options(tmp_path):
    (tmp_path / "empty").mkdir()
    assert "not a dataset layout the harness knows" in one_error(
        invoke("data", "prepare", "--root", tmp_path / "d", "--from", tmp_path / "empty", ok=False))
    src = write_image_folder(tmp_path / "pics", corrupt=False)
    assert "unknown --resize-filter 'cubic'" in one_error(
        invoke("data", "prepare", "--root", tmp_path / "d", "--from", src, "--resize-filter", "cubic", ok=False))
    assert "holds images data, not cifar10" in one_error(
        invoke("data", "prepare", "--root", tmp_path / "d", "--from", src, "--format", "cifar10", ok=False))
    assert "'cifar100' names the CIFAR-100 pickle folder" in one_error(
        invoke("data", "prepare", "--root", tmp_path / "d", "--from", src, "--name", "cifar100", ok=False))
    assert "dataset name '../x'" in one_error(
        invoke("data", "prepare", "--root", tmp_path / "d", "--from", src, "--name", "../x", ok=False))


# -- CIFAR-10 python pickles -----------------------------------------------------------------------

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_cifar10(folder, batches=5, per_batch=20, bytes_keys=False):
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, batches + 1)] + ["test_batch"]:
        labels = (np.arange(per_batch) % 10).tolist()
        d = {"batch_label": name, "labels": labels, "filenames": [f"{i}.png" for i in range(per_batch)],
             "data": rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)}
        if bytes_keys and name == "data_batch_1":
            d = {k.encode(): v for k, v in d.items()}
        with open(folder / name, "wb") as f:
            pickle.dump(d, f, protocol=2)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CIFAR10_NAMES, "num_cases_per_batch": per_batch, "num_vis": 3072}, f, protocol=2)
    return folder


def test_cifar10_pickles_import_and_subsets(tmp_path):
    src = write_cifar10(tmp_path / "dl" / "cifar-10-batches-py", batches=2, bytes_keys=True)
    res = invoke("data", "prepare", "--root", tmp_path / "data", "--from", tmp_path / "dl")  # found inside
    assert "dataset 'cifar10'" in res.output and "40 train / 20 test images, 10 classes, 32x32 px" in res.output
    assert "not a known dataset" in res.output  # a subset: not the official files
    d = data.load_dataset(tmp_path / "data", "cifar10")
    assert d.class_names == CIFAR10_NAMES and d.num_classes == 10 and d.known is None
    raw = pickle.load(open(src / "data_batch_2", "rb"))
    assert np.array_equal(d.train_images[20:], raw["data"].reshape(-1, 3, 32, 32))
    assert d.train_labels[20:].tolist() == raw["labels"]


def test_cifar10_official_files_are_recognised_by_md5(tmp_path, monkeypatch):
    src = write_cifar10(tmp_path / "cifar-10-batches-py")
    md5 = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in src.iterdir()}
    monkeypatch.setattr(importers, "CIFAR10_MD5", md5)  # stand-ins for the published md5 of the real files
    res = invoke("data", "prepare", "--root", tmp_path / "data", "--from", src)
    assert "the real CIFAR-10" in res.output
    info = invoke("data", "info", "--root", tmp_path / "data", "--dataset", "cifar10").output
    assert "dataset:      cifar10 (CIFAR-10)" in info and "recognised:   the real CIFAR-10" in info
    assert json.loads(invoke("data", "info", "--root", tmp_path / "data", "--json").output)["known"] == "cifar10"


@pytest.mark.parametrize("breakage, message", [
    (lambda f: (f / "data_batch_2").rename(f / "data_batch_3"), "data_batch_3 follows a missing batch"),
    (lambda f: (f / "test_batch").unlink(), "no test_batch"),
    (lambda f: pickle.dump({"data": np.zeros((2, 3072), np.uint8)}, open(f / "data_batch_1", "wb")),
     "data_batch_1: missing key 'labels' (is this CIFAR-10"),
    (lambda f: pickle.dump({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 10]}, open(f / "test_batch", "wb")),
     "test_batch: labels out of range [0, 9]"),
    (lambda f: pickle.dump({"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]}, open(f / "data_batch_2", "wb")),
     "expected (N, 3072)"),
])
def test_cifar10_bad_content_is_one_line(tmp_path, breakage, message):
    src = write_cifar10(tmp_path / "c10", batches=2)
    breakage(src)
    res = invoke("data", "prepare", "--root", tmp_path / "data", "--from", src, "--format", "cifar10", ok=False)
    assert message in one_error(res)
    assert not (tmp_path / "data" / "cifar10").exists()


def test_cifar100_subset_imports_and_is_not_called_real(tmp_path):
    data.make_synthetic(tmp_path / "src", per_class=2)
    res = invoke("data", "prepare", "--root", tmp_path / "data", "--from", tmp_path / "src")
    assert "200 train / 200 test images, 100 classes" in res.output and "not the official CIFAR-100" in res.output
    # under another name the same pickles become a dataset of their own
    res = invoke("data", "prepare", "--root", tmp_path / "data", "--from", tmp_path / "src", "--name", "c100sub")
    assert data.load_dataset(tmp_path / "data", "c100sub").num_classes == 100
    info = invoke("data", "info", "--root", tmp_path / "data").output  # the CIFAR-100 folder by default
    assert "real CIFAR-100: no" in info and "other datasets in" in info and "c100sub" in info


def test_changed_dataset_files_are_refused(tmp_path):
    data.make_synthetic_dataset(tmp_path, "s", classes=3, image_size=4, per_class=2)
    imgs = np.load(tmp_path / "s" / "train_images.npy")
    imgs[0, 0, 0, 0] ^= 1
    np.save(tmp_path / "s" / "train_images.npy", imgs)
    with pytest.raises(data.DataError, match="changed since they were prepared"):
        data.load_dataset(tmp_path, "s")


# -- splits belong to their dataset ------------------------------------------------------------------

def test_splits_make_draws_from_the_dataset_and_exclude_must_belong(tmp_path, monkeypatch):
    monkeypatch.setenv(splits.GENERATED_ENV_VAR, str(tmp_path / "gen"))
    data.make_synthetic_dataset(tmp_path / "data", "ten", classes=10, image_size=8, per_class=30)
    res = invoke("splits", "make", "a", "--dataset", "ten", "--data-root", tmp_path / "data", "--max-per-class", 20,
                 "--ratio", 10, "--shots", "", "--exclude", "val", ok=False)
    assert "--exclude val: that split belongs to dataset 'cifar100', not 'ten'" in one_error(res)
    np.save(tmp_path / "ex.npy", np.arange(0, 300, 10))  # positions in ten's own train set
    invoke("splits", "make", "a", "--dataset", "ten", "--data-root", tmp_path / "data", "--max-per-class", 20,
           "--ratio", 10, "--shots", "5", "--exclude", tmp_path / "ex.npy")
    idx, labels = splits.load_split("a"), data.load_dataset(tmp_path / "data", "ten").train_labels
    assert sorted(np.bincount(labels[idx], minlength=10), reverse=True) == splits.long_tail_profile(10, 20, 10).tolist()
    assert not np.isin(idx, np.arange(0, 300, 10)).any()
    invoke("splits", "make", "b", "--dataset", "ten", "--data-root", tmp_path / "data", "--max-per-class", 8,
           "--ratio", 2, "--shots", "", "--exclude", "a")  # a split of the same dataset
    assert not np.isin(splits.load_split("b"), idx).any()
    # the data changes under the split: refused, saying why
    data.make_synthetic_dataset(tmp_path / "data", "ten", classes=10, image_size=8, per_class=30, seed=5)
    res = invoke("splits", "show", "a", "--data-root", tmp_path / "data", ok=False)
    assert "was drawn from other contents of dataset 'ten'" in one_error(res)


def test_cifar10_lt_profiles_match_the_literature():
    """CIFAR-10-LT as in the long-tailed literature: 5,000 images down to 50 (ratio 100) or 100 (ratio 50)."""
    r100 = splits.long_tail_profile(10, 5000, 100)
    assert r100.tolist() == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50] and r100.sum() == 12406
    r50 = splits.long_tail_profile(10, 5000, 50)
    assert r50[0] == 5000 and r50[-1] == 100 and r50.sum() == 13996


# -- evaluation that cannot run fails first; a failed one says so --------------------------------------

@pytest.fixture()
def trained(tmp_path, monkeypatch):
    """A one-epoch run on a 6-class dataset, with its probe family."""
    monkeypatch.setenv(splits.GENERATED_ENV_VAR, str(tmp_path / "gen"))
    data.make_synthetic_dataset(tmp_path / "data", "six", classes=6, image_size=8, per_class=6, test_per_class=2)
    invoke("splits", "make", "six_lt", "--dataset", "six", "--data-root", tmp_path / "data", "--max-per-class", 6,
           "--ratio", 3, "--shots", "")
    url = f"sqlite:///{tmp_path}/r.db"
    invoke("train", "simclr", "--split", "six_lt", "--data-root", tmp_path / "data", "--epochs", 1, "--width", 4,
           "--batch-size", 64, "--device", "cpu", "--no-progress", "--checkpoint-dir", tmp_path / "ck",
           "--registry", url)
    return tmp_path, url


def test_eval_that_cannot_run_fails_before_the_compute(trained, monkeypatch):
    import harness.probe

    tmp_path, url = trained
    monkeypatch.setattr(harness.probe, "extract_features", lambda *a, **k: pytest.fail("computed features"))
    ev = ("eval", 1, "--data-root", tmp_path / "data", "--registry", url, "--device", "cpu", "--shots", "full")
    assert "leave many, few empty" in one_error(invoke(*ev, "--groups", "counts:100,2", ok=False))
    assert "--groups 'thirds,2'" in one_error(invoke(*ev, "--groups", "thirds,2", ok=False))
    assert "--test-limit 0: must be at least 1" in one_error(invoke(*ev, "--test-limit", 0, ok=False))
    res = invoke("eval", 1, "--data-root", tmp_path / "data", "--registry", url, ok=False)  # 100-shot lists
    assert "the 100-shot probes need the list 'six_lt_100shot_1', which does not exist: leave 100 out of " \
           "--shots (e.g. --shots full)" in one_error(res)
    assert "--dataset is for --checkpoint files" in one_error(invoke(*ev, "--dataset", "six", ok=False))
    run = Registry(url).get_run(1)
    assert run["error"] is None and not Registry(url).probes(1)  # nothing was attempted, nothing recorded


def test_a_failed_eval_leaves_the_reason_and_no_scores(trained, monkeypatch):
    import harness.probe

    tmp_path, url = trained

    def boom(*a, **k):
        raise RuntimeError("out of memory (simulated)")
    monkeypatch.setattr(harness.probe, "run_probes", boom)
    ev = ("eval", 1, "--data-root", tmp_path / "data", "--registry", url, "--device", "cpu", "--shots", "full",
          "--epochs", 1)
    res = invoke(*ev, ok=False)
    assert res.exit_code != 0
    reg = Registry(url)
    assert reg.get_run(1)["error"].startswith("evaluation failed: RuntimeError: out of memory")
    assert not reg.probes(1)
    text = invoke("report", "--registry", url).output
    assert "Evaluation failed, no scores: #1 (RuntimeError: out of memory (simulated))" in text
    # an external checkpoint whose evaluation fails leaves no run row at all
    ck = tmp_path / "ck" / "run1" / "last.pt"
    assert invoke("eval", "--checkpoint", ck, "--data-root", tmp_path / "data", "--registry", url, "--device",
                  "cpu", "--shots", "full", "--epochs", 1, ok=False).exit_code != 0
    assert [r["id"] for r in reg.list_runs()] == [1]
    monkeypatch.undo()
    monkeypatch.setenv(splits.GENERATED_ENV_VAR, str(tmp_path / "gen"))
    invoke(*ev)  # a later good evaluation clears the failure
    assert reg.get_run(1)["error"] is None and len(reg.probes(1)) == 1
    out = invoke("eval", "--checkpoint", ck, "--data-root", tmp_path / "data", "--registry", url, "--device",
                 "cpu", "--shots", "full", "--epochs", 1).output
    ext = [r for r in reg.list_runs() if "external" in r["tags"]]
    assert len(ext) == 1 and ext[0]["status"] == "done" and ext[0]["config"]["dataset"] == "six"
    assert "dataset six" in out


# -- published numbers only beside the paper's dataset and splits ------------------------------------

def _runs(reg):
    return reg.runs_frame(), reg.probe_frame()


def _done(reg, method, split, dataset=None, known=None, classes=100, top1=40.0):
    cfg = {} if dataset is None else {"dataset": dataset, "dataset_info": {"classes": classes, "known": known}}
    rid = reg.create_run(method, split, 10, 2000, cfg, status="done")
    reg.log_probe(rid, "full", 0, top1, per_class=[top1] * classes, many=top1, medium=top1, few=top1, std=0.0)
    return rid


def test_empty_tables_of_other_datasets_carry_no_published_numbers(tmp_path):
    from harness.report import render_report

    reg = Registry(f"sqlite:///{tmp_path}/r.db")
    paper = render_report(*_runs(reg), "term", tables=(1,), paper_rows=True)
    assert "on CIFAR-100-LT" in paper and "58.7" in paper  # the paper's own (empty) table: its numbers
    for dataset, label in (("cifar10", "CIFAR-10"), ("mine", "mine")):
        text = render_report(*_runs(reg), "term", dataset=dataset, paper_rows=True)
        assert f"on {label}-LT" in text and "58.7" not in text and "50.7" not in text
    assert "58.7" not in render_report(*_runs(reg), "term", tables=(1,), split="mine", paper_rows=True)


def test_methods_without_runs_get_no_published_numbers_beside_other_splits(tmp_path):
    from harness.report import table1_frame

    reg = Registry(f"sqlite:///{tmp_path}/r.db")
    _done(reg, "simclr", "mine", "cifar100", "cifar100")
    t1 = table1_frame(*_runs(reg), paper_rows=True).set_index("method")
    assert "bcl-d" in t1.index
    assert t1[["full_paper", "100_paper"]].isna().all().all()  # BCL-D has no runs: none beside it either


def test_unofficial_cifar100_and_other_datasets_are_tables_of_their_own(tmp_path):
    import io

    import pandas as pd

    from harness.report import render_report

    reg = Registry(f"sqlite:///{tmp_path}/r.db")
    _done(reg, "simclr", "split1", top1=50.0)  # a run from before datasets were recorded: CIFAR-100
    _done(reg, "simclr", "split1", "cifar100", None, top1=30.0)  # synthetic data in CIFAR-100's layout
    _done(reg, "bcl-d", "syn10lt", "syn10", None, classes=10, top1=70.0)
    text = render_report(*_runs(reg), "term", tables=(1,))
    sections = text.split("Table 1: ")[1:]
    assert [s.split(",")[0] for s in sections] == [
        "linear-probe top-1 accuracy (%) on CIFAR-100-LT", "linear-probe top-1 accuracy (%) on "
        "cifar100-LT (not the official CIFAR-100)", "linear-probe top-1 accuracy (%) on syn10-LT"]
    assert "50.7" in sections[0] and "50.00 (n=1)" in sections[0] and "30.00" not in sections[0]
    assert "50.7" not in sections[1] + sections[2] and "70.00 (n=1)" in sections[2]
    csv = pd.read_csv(io.StringIO(render_report(*_runs(reg), "csv", tables=(1,))))
    assert csv.columns[0] == "dataset" and len(csv) == 3  # one row per dataset: its one method with runs
    assert list(csv["dataset"].unique()) == ["CIFAR-100", "cifar100 (not the official CIFAR-100)", "syn10"]
    full = csv.set_index(["dataset", "method"])["full_mean"]
    assert (full["CIFAR-100", "simclr"], full["cifar100 (not the official CIFAR-100)", "simclr"],
            full["syn10", "bcl-d"]) == (50.0, 30.0, 70.0)


# -- Many / Medium / Few at any class count ----------------------------------------------------------

@pytest.mark.parametrize("classes, few, medium, many", [(10, 3, 3, 4), (100, 33, 33, 34), (1000, 333, 333, 334)])
def test_thirds_at_any_class_count(classes, few, medium, many):
    from harness.groups import class_groups

    counts = np.arange(classes)[::-1] + 1  # class 0 largest
    g = class_groups(counts)
    assert [len(g[k]) for k in ("few", "medium", "many")] == [few, medium, many]
    assert set(g["many"]) == set(range(many)) and set(g["few"]) == set(range(classes - few, classes))


def test_count_thresholds_and_their_parsing():
    from harness.groups import class_groups, parse_groups
    from harness.probe import group_metrics

    rule = parse_groups("counts:100,20")
    counts = np.array([500, 101, 100, 20, 19, 3])
    g = class_groups(counts, rule)
    assert g["many"].tolist() == [0, 1] and g["medium"].tolist() == [2, 3] and g["few"].tolist() == [4, 5]
    m = group_metrics(np.array([90.0, 80, 60, 50, 20, 10]), counts, rule)
    assert (m["many"], m["medium"], m["few"]) == (85.0, 55.0, 15.0)
    assert parse_groups("none").kind == "none" and group_metrics(np.ones(6), counts, parse_groups("none"))["many"] is None
    for bad in ("counts:20,100", "counts:x", "thirds,1", "counts:5"):
        with pytest.raises(ValueError, match="counts:MANY,FEW"):
            parse_groups(bad)


def test_top5_with_fewer_than_five_classes():
    import torch

    from harness.probe import score_probe

    W, feats = torch.eye(3), torch.eye(3)
    r = score_probe(W, torch.zeros(3), feats, torch.tensor([0, 1, 1]), np.array([5, 3, 1]))
    assert r["top5"] == 100.0 and r["top1"] == pytest.approx(200 / 3) and len(r["per_class"]) == 3


# -- images of other sizes: the augmentation and the network ----------------------------------------

@pytest.mark.parametrize("size", [8, 16, 48])
def test_augmentation_and_network_at_other_image_sizes(size):
    import torch

    from methods import augment
    from methods.models import build_network

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (4, 3, size, size), dtype=torch.uint8, generator=g)
    v = augment.simclr_augment(x, g)
    assert v.shape == x.shape and v.dtype == torch.uint8 and not torch.equal(v, x)
    b = augment.boosted_randaugment(v, torch.ones(4), torch.full((4,), 30.0), 2, g)
    assert b.shape == x.shape and not torch.equal(b, v)
    net = build_network("bcl-d", width=4).eval()
    assert net.features(augment.to_unit_float(b)).shape == (4, 32)


# -- plots at 10 and 1,000 classes -------------------------------------------------------------------

def test_per_class_trend_follows_the_class_count(tmp_path):
    import pandas as pd

    from harness.report import plot_per_class, trend_window

    assert (trend_window(10), trend_window(100), trend_window(1000)) == (2, 20, 200)  # 20 at CIFAR-100, as before
    for classes in (10, 1000):
        acc = np.linspace(10, 90, classes)  # accuracy rising with class size
        trend = pd.Series(acc).rolling(trend_window(classes), min_periods=1, center=True).mean()
        assert trend.iloc[-1] - trend.iloc[0] > 60  # the trend shows the rise (20 classes would flatten 10)
        pts = pd.DataFrame({"method": "simclr", "run_id": 1, "class": np.arange(classes),
                            "count": np.arange(classes) + 1, "acc": acc})
        plot_per_class(pts, "full", tmp_path / f"pc{classes}.png", f"syn{classes}")
        assert (tmp_path / f"pc{classes}.png").stat().st_size > 1000
