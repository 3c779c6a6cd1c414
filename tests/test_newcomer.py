"""A newcomer's rough edges: what a first session with the CLI ran into, each pinned down."""
import numpy as np
import pytest
from typer.testing import CliRunner

from harness import data, splits
from harness.cli import app
from harness.registry import Registry
from harness.train import Trainer, make_config, train

pytestmark = pytest.mark.usefixtures("one_thread")


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_splits_verify_fails_when_files_are_missing(tmp_path):
    r = invoke("splits", "verify", "--splits-root", tmp_path / "empty")
    assert r.exit_code == 1 and "0 ok, 17 missing" in r.output and "harness splits import" in r.output


def test_splits_show_accepts_a_split_number_like_train(tmp_path, monkeypatch):
    r = invoke("splits", "show", "1", "--data-root", tmp_path / "none", "--splits-root", tmp_path)
    assert "unknown split '1'" not in r.output  # read as split1, like `harness train --split 1`
    assert r.exit_code == 1 and "folder not found" in r.output


def test_unknown_method_is_listed_in_words(tmp_path):
    r = invoke("train", "byol", "--registry", f"sqlite:///{tmp_path}/r.db")
    from methods.registry import names
    assert r.exit_code == 1 and f"choose one of {', '.join(names())}" in r.output and "(" not in r.output


def test_eval_without_arguments_says_what_to_give(tmp_path):
    r = invoke("eval", "--registry", f"sqlite:///{tmp_path}/r.db")
    assert r.exit_code == 1 and "RUN_ID" in r.output and "not both" not in r.output


def test_runs_list_refuses_an_unknown_status(tmp_path):
    r = invoke("runs", "list", "--status", "bogus", "--registry", f"sqlite:///{tmp_path}/r.db")
    assert r.exit_code == 1 and "unknown --status 'bogus'" in r.output


@pytest.mark.parametrize("fragment", ["SPEC 7", "SPEC 9", "make NAME --probe-family"])
def test_help_texts_point_at_nothing_missing(fragment):
    for cmd in (["eval", "--help"], ["bench", "--help"], ["splits", "make", "--help"], ["run", "--help"]):
        assert fragment not in invoke(*cmd).output


@pytest.fixture()
def tiny(tmp_path):
    d = data.make_synthetic(tmp_path / "data", per_class=1)
    np.save(tmp_path / "s.npy", np.arange(40))
    return make_config("simclr", str(tmp_path / "s.npy"), epochs=2, batch_size=16, width=4, warmup_epochs=1,
                       lr=0.0025, data_root=str(tmp_path / "data"), checkpoint_dir=str(tmp_path / "ck"),
                       checkpoint_every=1), d


def test_runs_show_keeps_small_numbers_and_one_checkpoint_row(tiny, tmp_path):
    cfg, _ = tiny
    url = f"sqlite:///{tmp_path}/r.db"
    out = train(cfg, Registry(url), progress=False)
    r = invoke("runs", "show", out["run_id"], "--registry", url)
    assert "0.0025" in r.output or "0.001" in r.output  # an lr is not printed as 0.0
    arts = Registry(url).artifacts(out["run_id"])
    assert len(arts) == 1 and arts[0]["epoch"] == 2  # last.pt rewritten in place: one row, current digest


def test_a_resumed_epoch_counts_its_time_before_the_stop(tiny, tmp_path):
    cfg, _ = tiny
    reg = Registry(f"sqlite:///{tmp_path}/r.db")
    tr = Trainer(cfg, reg, progress=False)
    tr.cfg.max_steps = 2
    tr.fit()  # two of the epoch's three steps, then a stop
    before = tr.epoch_elapsed
    assert before > 0
    rest = Trainer(None, reg, resume=tr.run_id, progress=False, asked={})
    rest.run_epoch()
    e = reg.epochs(tr.run_id)[0]
    assert e["epoch_time_s"] > before and e["images_per_s"] == pytest.approx(40 / e["epoch_time_s"])


def test_smoke_probe_family_cannot_have_k_shot_lists_equal_to_the_full_list(tmp_path, monkeypatch):
    """Why the smoke's 100-shot score differed from its full-shot one with the same digest: with 100
    images per class, every 100-shot list was the full list, and only the probes' seeds differed."""
    monkeypatch.setenv(splits.GENERATED_ENV_VAR, str(tmp_path / "gen"))
    data.make_synthetic(tmp_path / "data", per_class=100, test_per_class=1)
    r = invoke("splits", "make", "s", "--data-root", tmp_path / "data", "--max-per-class", 4, "--ratio", 2,
               "--full-per-class", 100)
    assert r.exit_code == 1 and "100-shot lists need fewer than the 100 images per class" in r.output
    assert not (tmp_path / "gen" / "manifest.json").exists()


def test_splits_make_refuses_path_names_and_silent_overwrites(tmp_path, monkeypatch):
    monkeypatch.setenv(splits.GENERATED_ENV_VAR, str(tmp_path / "gen"))
    data.make_synthetic(tmp_path / "data", per_class=8, test_per_class=1)
    for bad in ("../evil", "a/b", "..", ".hidden", "x.npy"):
        r = invoke("splits", "make", bad, "--data-root", tmp_path / "data", "--max-per-class", 4, "--shots", "")
        assert r.exit_code == 1 and "split name" in r.output, bad
    args = ("splits", "make", "ok", "--data-root", tmp_path / "data", "--max-per-class", 4, "--ratio", 2,
            "--shots", "")
    assert invoke(*args).exit_code == 0
    r = invoke(*args)
    assert r.exit_code == 1 and "already exists" in r.output and "--force" in r.output
    assert invoke(*args, "--force").exit_code == 0
    assert not (tmp_path / "evil.npy").exists() and not (tmp_path.parent / "evil.npy").exists()
