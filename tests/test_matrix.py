"""The run matrix: planning from the registry, resume of interrupted cells, failures isolated."""
import numpy as np
import pytest
from typer.testing import CliRunner

from harness import data, splits
from harness.cli import app
from harness.matrix import Cell, MatrixSettings, epochs_trained, parse_splits, plan_cell, run_matrix, summary_rows
from harness.registry import Registry
from harness.train import make_config, train


def test_parse_splits():
    assert parse_splits("1-3") == ("split1", "split2", "split3")
    assert parse_splits("1,5,mine") == ("split1", "split5", "mine")
    with pytest.raises(ValueError):
        parse_splits("3-1")


@pytest.fixture()
def world(tmp_path, monkeypatch):
    monkeypatch.setenv(splits.GENERATED_ENV_VAR, str(tmp_path / "gen"))
    d = data.make_synthetic(tmp_path / "data", per_class=4, test_per_class=2)
    idx = splits.make_long_tailed(d.train_labels, max_per_class=2, ratio=2, seed=0)[:40]
    splits.save_generated("tiny", idx, "pretrain", "test")
    splits.save_generated("tiny_full", np.arange(len(d.train_labels)), "probe-full", "test")
    s = MatrixSettings(methods=("simclr", "bcl-d"), splits=("tiny", "missing"), epochs=1, batch_size=16, width=8,
                       shots=("full",), probe_epochs=2, probe_family="tiny", data_root=str(tmp_path / "data"),
                       checkpoint_dir=str(tmp_path / "ck"), registry=f"sqlite:///{tmp_path}/r.db",
                       devices=("cpu", "cpu"))  # two workers at once share the registry
    return s


def test_matrix_resumes_skips_and_isolates_failures(world):
    s = world
    reg = Registry(s.registry)
    # an interrupted SimCLR run of the tiny cell, as a killed matrix would leave it
    cfg = make_config("simclr", "tiny", epochs=1, batch_size=16, width=8, data_root=s.data_root,
                      checkpoint_dir=s.checkpoint_dir, max_steps=1)
    part = train(cfg, reg, progress=False)
    assert part["status"] == "interrupted"
    assert plan_cell(reg, Cell("simclr", "tiny", 10), s) == ("resume", part["run_id"])
    assert plan_cell(reg, Cell("bcl-d", "tiny", 10), s) == ("train", None)

    cells = [Cell(m, sp, 10) for m in ("simclr", "bcl-d") for sp in ("tiny", "missing")]
    assert epochs_trained(reg, cells, s) == 0  # the interrupted run stopped inside its only epoch
    results = run_matrix(s, log=lambda m: None, progress=True, poll_s=0.1, registry_poll_s=0.2)
    assert epochs_trained(reg, cells, s) == 2  # one epoch in each tiny cell; the missing split has no run
    by = {r.cell.label(): r for r in results}
    assert by["simclr/tiny/seed10"].exit_code == 0 and by["bcl-d/tiny/seed10"].exit_code == 0
    assert by["simclr/missing/seed10"].exit_code != 0 and by["bcl-d/missing/seed10"].exit_code != 0
    resumed = reg.get_run(part["run_id"])
    assert resumed["status"] == "done"  # the same run was continued, not a new one
    assert len(reg.list_runs(method="simclr", split="tiny")) == 1
    for cell in ("simclr", "bcl-d"):
        run = reg.list_runs(method=cell, split="tiny")[0]
        assert [p["kind"] for p in reg.probes(run["id"])] == ["full"]
    rows = {r["cell"]: r for r in summary_rows(reg, results, s)}
    assert rows["bcl-d/tiny/seed10"]["full"] is not None and rows["simclr/missing/seed10"]["status"] == "-"

    # second pass: the done cells are skipped
    assert plan_cell(reg, Cell("simclr", "tiny", 10), s)[0] == "skip"
    res = CliRunner().invoke(app, ["run", "--dry-run", "--methods", "simclr,bcl-d", "--splits", "tiny",
                                   "--epochs", "1", "--batch-size", "16", "--width", "8", "--shots", "full",
                                   "--registry", s.registry])
    assert res.exit_code == 0 and res.output.count("skip") == 2
    # the paper's width is another experiment: nothing of it is done yet
    res = CliRunner().invoke(app, ["run", "--dry-run", "--methods", "simclr,bcl-d", "--splits", "tiny",
                                   "--epochs", "1", "--batch-size", "16", "--shots", "full", "--registry", s.registry])
    assert res.exit_code == 0 and res.output.count("  train  ") == 2


def test_cli_reports_failed_cells(world):
    s = world
    res = CliRunner().invoke(app, ["run", "--methods", "simclr", "--splits", "missing", "--epochs", "1",
                                   "--devices", "cpu", "--registry", s.registry, "--no-progress",
                                   "--data-root", s.data_root])
    assert res.exit_code == 1 and "1 of 1 cells failed: simclr/missing/seed10" in res.output
    res = CliRunner().invoke(app, ["run", "--methods", "byol", "--dry-run", "--registry", s.registry])
    assert res.exit_code == 1 and "unknown method" in res.output


def test_a_run_with_another_recipe_is_not_the_cells_done_run(tmp_path):
    """--width and --set change the experiment: a done run made with other values is not this matrix's
    cell (it would be skipped and reported as the paper's), while the matching one is."""
    reg = Registry(f"sqlite:///{tmp_path}/r.db")
    cell = Cell("bcl-d", "split1", 10)
    paper = make_config("bcl-d", "split1", epochs=3).method.to_dict()
    other = make_config("bcl-d", "split1", epochs=3, width=8, options=["bcl_beta=0.5"]).method.to_dict()
    rid = reg.create_run("bcl-d", "split1", 10, 3, {"method": other}, status="done")
    assert plan_cell(reg, cell, MatrixSettings(epochs=3, evaluate=False)) == ("train", None)
    assert plan_cell(reg, cell, MatrixSettings(epochs=3, width=8, evaluate=False)) == ("train", None)
    matching = MatrixSettings(epochs=3, width=8, options=("bcl_beta=0.5",), evaluate=False)
    assert plan_cell(reg, cell, matching) == ("skip", rid)
    # a run from before configs were per method: fields it lacks had the defaults, extra ones are ignored
    flat = {k: v for k, v in paper.items() if k != "bcl_beta"} | {"projection_dim": 2048}
    old = reg.create_run("bcl-d", "split1", 10, 3, {"method": flat}, status="done")
    assert plan_cell(reg, cell, MatrixSettings(epochs=3, evaluate=False)) == ("skip", old)
