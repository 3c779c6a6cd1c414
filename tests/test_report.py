"""Report tables from a seeded registry, compared with golden files (UPDATE_GOLDEN=1 rewrites them)."""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from harness.cli import app
from harness.registry import Registry
from harness.report import (
    FORMATS, TABLES, per_class_points, plot_per_class, render_report, run_scores, table1_frame,
    table2_frame,
)

GOLDEN = Path(__file__).parent / "golden"


def log(reg, run_id, kind, subset, top1, groups=True, **kw):
    g = dict(many=top1 + 10, medium=top1, few=top1 - 10, std=float(np.std([10, 0, -10]))) if groups else {}
    reg.log_probe(run_id, kind, subset, top1, top5=top1 + 20, per_class=[top1] * 100, **g, **kw)


def seed_registry(url: str) -> Registry:
    """Known rows; expected numbers are worked out in the comments."""
    reg = Registry(url)
    new = lambda method, split, status="done", tags=(): reg.create_run(method, split, 10, 2000, {}, tags=tags,
                                                                        status=status)
    # SimCLR: two done runs -> full (50+52)/2 = 51.00 ± 1.41; 100-shot 46 and 48 -> 47.00 ± 1.41;
    # 50-shot 40 and 42 -> 41.00 ± 1.41
    for run, full, k100, k50 in ((new("simclr", "split1"), 50.0, 46.0, 40.0),
                                 (new("simclr", "split2", tags=("paper",)), 52.0, 48.0, 42.0)):
        log(reg, run, "full", 0, full)
        for s, d in enumerate((-2, -1, 0, 1, 2), start=1):
            log(reg, run, "100", s, k100 + d)
            log(reg, run, "50", s, k50)
    # SDCLR: full 55.5 and 54.5 -> 55.00 ± 0.71; 100-shot only 3 subsets of run 4 (-> note)
    r3 = new("sdclr", "split1")
    log(reg, r3, "full", 0, 55.5)
    r4 = new("sdclr", "split2")
    log(reg, r4, "full", 0, 54.5)
    for s, v in ((1, 49.0), (2, 50.0), (3, 51.0)):  # probes of 100 epochs: a deviation footnote
        log(reg, r4, "100", s, v, config={"epochs": 100, "lr": 0.01, "batch_size": 1000})
    # BCL-I: only a running run -> excluded, "no done runs"; a failed SimCLR run -> excluded
    log(reg, new("bcl-i", "split1", "running"), "full", 0, 90.0)
    log(reg, new("simclr", "split3", "failed"), "full", 0, 10.0)
    # another method, done, no group scores; BCL-D has no runs at all
    log(reg, new("moco", "split1"), "full", 0, 40.0, groups=False)
    # a done BCL-D run that was never evaluated would say "not evaluated"; here BCL-D has none
    reg.log_epoch(1, 1, loss=5.0, weight_mean=0.5, weight_q10=0.1, weight_q25=0.3, weight_q50=0.5,
                  weight_q75=0.7, weight_q90=0.9, images_per_s=20000.0)
    reg.log_epoch(1, 2, loss=4.5, weight_mean=0.5, weight_q10=0.2, weight_q25=0.3, weight_q50=0.5,
                  weight_q75=0.6, weight_q90=0.8, images_per_s=24000.0)
    record_environments(reg, r3)
    return reg


H200 = {"python": "3.11.2", "torch": "2.14.1", "torchvision": "0.29.1", "cuda": "13.0", "cudnn": "9.10.2",
        "driver": "580.95.05", "precision": "bf16", "container_image": "bcl-harness (base pytorch:2.14.1-cuda13.0)"}


def record_environments(reg: Registry, sdclr_run: int) -> None:
    """What runs record at their start (schema 4 harness), beside an old run that recorded nothing:
    run 1 on an H200 in the container, resumed once on an H100 with another driver, at batch 256;
    run 2 old (no environment, no config: every field "not recorded"); the first SDCLR run on a CPU
    outside a container, width 16 on 200 images; failed run 6 on the H200."""
    from methods.base import default_config

    resume = {"at": "2026-01-02T03:04:05", "epoch": 700, "device": "NVIDIA H100", "git_rev": "0123456789abcdef",
              **H200, "driver": "570.86.15"}
    reg.update_run(1, device="NVIDIA H200", git_rev="0123456789abcdef0123", wall_time_s=7200.0,
                   versions={**H200, "resumes": [resume]},
                   config={"method": {**default_config("simclr").to_dict(), "batch_size": 256}, "precision": "auto",
                           "subset": None, "split_sha256": "ab" * 32})
    reg.update_run(2, wall_time_s=3600.0)
    reg.update_run(sdclr_run, device="cpu (x86_64)", git_rev="fedcba9876543210", wall_time_s=90.0,
                   versions={"python": "3.11.2", "torch": "2.14.1", "precision": "fp32", "container_image": None},
                   config={"method": {**default_config("sdclr").to_dict(), "width": 16}, "precision": "auto",
                           "subset": 200, "split_sha256": "cd" * 32})
    reg.update_run(6, device="NVIDIA H200", wall_time_s=100.0)


@pytest.fixture()
def reg(tmp_path):
    return seed_registry(f"sqlite:///{tmp_path / 'reg.db'}")


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.is_file(), f"{path} missing: run with UPDATE_GOLDEN=1 and inspect it"
    assert text == path.read_text()


def all_tables(reg, fmt, shot="full", tables=TABLES):
    runs = reg.runs_frame()
    return render_report(runs, reg.probe_frame(), fmt, shot, tables, epochs=reg.epoch_frame(list(runs["id"])))


@pytest.mark.parametrize("fmt", [f for f in FORMATS if f != "csv"])
def test_report_matches_golden(reg, fmt):
    text = all_tables(reg, fmt)
    ext = {"term": "txt", "markdown": "md", "latex": "tex", "html": "html"}[fmt]
    check_golden(f"report_full.{ext}", text)


@pytest.mark.parametrize("table", TABLES)
def test_csv_is_one_tidy_table_per_file(reg, table):
    text = all_tables(reg, "csv", tables=(table,))
    check_golden(f"report_full_table{table}.csv", text)
    frame = pd.read_csv(io.StringIO(text))  # what a user does with it
    assert frame.iloc[0].iloc[0] == ("device" if table == 4 else "simclr")
    assert not any(c.startswith("#") for c in frame.columns)


def test_csv_command_writes_one_file_per_table(reg, tmp_path):
    r = CliRunner().invoke(app, ["report", "--registry", reg.url, "--format", "csv"])
    assert r.exit_code == 1 and "one table per file" in r.output
    r = CliRunner().invoke(app, ["report", "--registry", reg.url, "--format", "csv", "--out", str(tmp_path / "r.csv")])
    assert r.exit_code == 0, r.output
    t1, t2, t3, t4 = (pd.read_csv(tmp_path / f"r_table{t}.csv") for t in TABLES)
    assert "full_mean" in t1.columns and "many_mean" in t2.columns
    assert "gpu_hours" in t3.columns and list(t4.columns) == ["field", "value", "runs"]


def test_table2_few_shot_golden(reg):
    check_golden("report_table2_100.txt", render_report(reg.runs_frame(), reg.probe_frame(), "term", "100", (2,)))


def test_table1_numbers(reg):
    # rows in the method registry's order (each base, then its BCL variant); unregistered ones last
    assert list(table1_frame(reg.runs_frame(), reg.probe_frame())["method"]) == ["simclr", "bcl-i", "sdclr", "moco"]
    t1 = table1_frame(reg.runs_frame(), reg.probe_frame(), paper_rows=True).set_index("method")
    assert list(t1.index) == ["simclr", "bcl-i", "sdclr", "bcl-d", "moco"]
    assert t1.loc["simclr", "full_mean"] == pytest.approx(51.0)
    assert t1.loc["simclr", "full_std"] == pytest.approx(np.sqrt(2))
    assert t1.loc["simclr", "full_n"] == 2  # the failed run is not averaged in
    assert t1.loc["simclr", "100_mean"] == pytest.approx(47.0)
    assert t1.loc["simclr", "full_diff"] == pytest.approx(51.0 - 50.7)
    assert t1.loc["sdclr", "100_n"] == 1 and t1.loc["sdclr", "50_note"] == "not evaluated"
    assert t1.loc["bcl-i", "full_note"] == "no done runs"
    assert t1.loc["bcl-d", "full_note"] == "no runs"
    assert np.isnan(t1.loc["moco", "full_paper"])


def test_table2_groups(reg):
    t2 = table2_frame(reg.runs_frame(), reg.probe_frame(), "full").set_index("method")
    assert t2.loc["simclr", "many_mean"] == pytest.approx(61.0)
    assert t2.loc["simclr", "few_mean"] == pytest.approx(41.0)
    assert t2.loc["simclr", "std_mean"] == pytest.approx(np.std([61, 51, 41]))
    assert t2.loc["moco", "note"] == "no class groups"


def test_run_scores_average_subsets_first(reg):
    sc = run_scores(reg.probe_frame(status="done"))
    r = sc[(sc["run_id"] == 1) & (sc["kind"] == "100")].iloc[0]
    assert r["top1"] == pytest.approx(46.0) and r["subsets"] == 5
    assert r["many"] == pytest.approx(56.0)


def test_filters_through_command(reg, tmp_path):
    out = tmp_path / "t.md"
    r = CliRunner().invoke(app, ["report", "--registry", reg.url, "--method", "simclr", "--table", "1",
                                 "--format", "markdown", "--out", str(out), "--paper-rows"])
    assert r.exit_code == 0, r.output
    text = out.read_text()
    assert "51.00 ± 1.41 (n=2)" in text and "55.00" not in text
    assert "| BCL-D | — (no runs) |" in text
    assert "Excluded 1 run(s) whose status is not 'done' (failed 1; ids 6)." in text
    r = CliRunner().invoke(app, ["report", "--registry", reg.url, "--tag", "paper", "--table", "1"])
    assert r.exit_code == 0 and "52.00 (n=1)" in r.output
    r = CliRunner().invoke(app, ["report", "--registry", reg.url, "--format", "xml"])
    assert r.exit_code == 1 and "unknown --format" in r.output


def test_plots(reg, tmp_path):
    folder = tmp_path / "plots"
    r = CliRunner().invoke(app, ["report", "--registry", reg.url, "--plots", str(folder), "--data-root",
                                 str(tmp_path / "nodata")])
    assert r.exit_code == 0, r.output
    assert "per-class plot skipped" in r.output  # no CIFAR labels here
    assert (folder / "groups_full.png").stat().st_size > 1000
    assert (folder / "training_curves.png").stat().st_size > 1000
    # with the class counts given, the per-class plot is drawn
    pts = per_class_points(reg.probe_frame(status="done"), {"split1": np.arange(100)}, "full")
    assert set(pts["method"]) == {"simclr", "sdclr", "moco"} and len(pts) == 300
    plot_per_class(pts, "full", tmp_path / "pc.png")
    assert (tmp_path / "pc.png").stat().st_size > 1000


def test_empty_registry(tmp_path):
    reg = Registry(f"sqlite:///{tmp_path / 'empty.db'}")
    text = render_report(reg.runs_frame(), reg.probe_frame(), "term")
    assert "no runs" not in text  # only methods with runs have rows
    text = render_report(reg.runs_frame(), reg.probe_frame(), "term", paper_rows=True)
    assert text.count("— (no runs)") == 4 * 3 + 4


def test_published_numbers_only_beside_paper_splits(tmp_path):
    reg = Registry(f"sqlite:///{tmp_path}/r.db")
    log(reg, reg.create_run("simclr", "split1", 10, 2000, {}, status="done"), "full", 0, 50.0)
    log(reg, reg.create_run("bcl-d", "mine", 10, 2000, {}, status="done"), "full", 0, 30.0)
    t1 = table1_frame(reg.runs_frame(), reg.probe_frame()).set_index("method")
    assert t1.loc["simclr", "full_paper"] == 50.7 and abs(t1.loc["simclr", "full_diff"] + 0.7) < 1e-9
    assert np.isnan(t1.loc["bcl-d", "full_paper"]) and np.isnan(t1.loc["bcl-d", "full_diff"])
    text = render_report(reg.runs_frame(), reg.probe_frame(), "term", tables=(1,))
    assert "splits other than the paper's (mine)" in text


def test_training_plot_of_a_one_epoch_run_without_bcl(tmp_path):
    """One panel (no blank BCL panel), markers for a single point, whole-number epoch ticks."""
    from PIL import Image

    from harness.report import plot_training

    runs = pd.DataFrame([{"id": 1, "method": "simclr", "split": "split1"}])
    epochs = pd.DataFrame([{"run_id": 1, "epoch": 1, "loss": 5.0, "weight_q50": None}])
    out = tmp_path / "t.png"
    plot_training(epochs, runs, out)
    assert Image.open(out).size[0] == 7 * 120  # one 7-inch panel at 120 dpi (two panels: 12 inches)
    epochs2 = pd.DataFrame([{"run_id": 1, "epoch": e, "loss": 5.0 - e, "weight_q10": 0.1, "weight_q25": 0.2,
                             "weight_q50": 0.3, "weight_q75": 0.4, "weight_q90": 0.5} for e in (1, 2)])
    plot_training(epochs2, runs, out)
    assert Image.open(out).size[0] == 12 * 120


def test_per_class_plot_message_names_the_missing_shot(tmp_path):
    from harness.report import write_plots

    reg = Registry(f"sqlite:///{tmp_path / 'r.db'}")
    rid = reg.create_run("simclr", "split1", 10, 2, {}, status="done")
    for k in range(1, 6):
        reg.log_probe(rid, "100", k, 40.0, per_class=[40.0] * 100)
    msgs = write_plots(reg, reg.runs_frame(), reg.probe_frame(), "full", tmp_path / "p", tmp_path / "nodata", None)
    assert any("no done run has full-shot probe scores" in m and "--shot 100" in m for m in msgs), msgs


def test_quick_try_runs_are_marked(tmp_path):
    reg = Registry(f"sqlite:///{tmp_path / 'r.db'}")
    for cfg in ({"method": {"width": 16}, "subset": 200}, {"method": {"width": 64}}):
        rid = reg.create_run("simclr", "split1", 10, 2, cfg, status="done")
        reg.log_probe(rid, "full", 0, 40.0)
    text = render_report(reg.runs_frame(), reg.probe_frame(), "term", "full", (1,))
    assert "Deviation from the authors' recipe: ResNet-18 width 16 instead of 64 (run #1)." in text
    assert "Deviation from the authors' recipe: trained on 200 images of the split (a seeded subset), " \
           "not all of it (run #1)." in text
    assert "run #2" not in text and "runs #1-#2" not in text  # run 2 (the paper's recipe) in no footnote


def test_mean_and_std_are_over_splits_with_the_seed_spread_apart(tmp_path):
    """Split 1 with seeds 10 and 11 (50, 54), split 2 with one seed (60): split means 52 and 60 ->
    56.00 ± 5.66 over splits, n=3 runs; seed spread within split 1: sample std of (50, 54) = 2.83."""
    reg = Registry(f"sqlite:///{tmp_path / 'r.db'}")
    for split, seed, top1 in (("split1", 10, 50.0), ("split1", 11, 54.0), ("split2", 10, 60.0)):
        log(reg, reg.create_run("simclr", split, seed, 2000, {}, status="done"), "full", 0, top1)
    t1 = table1_frame(reg.runs_frame(), reg.probe_frame()).set_index("method")
    assert t1.loc["simclr", "full_mean"] == pytest.approx(56.0)
    assert t1.loc["simclr", "full_std"] == pytest.approx(np.std([52.0, 60.0], ddof=1))
    assert t1.loc["simclr", "full_n"] == 3 and t1.loc["simclr", "full_splits"] == 2
    assert t1.loc["simclr", "full_seed_sd"] == pytest.approx(np.std([50.0, 54.0], ddof=1))
    text = render_report(reg.runs_frame(), reg.probe_frame(), "term", tables=(1,))
    assert "56.00 ± 5.66 (n=3; seeds ± 2.83)" in text and "#1-#3" in text
    t2 = table2_frame(reg.runs_frame(), reg.probe_frame()).set_index("method")
    assert t2.loc["simclr", "many_mean"] == pytest.approx(66.0) and t2.loc["simclr", "runs"] == "1 2 3"


def test_deviations_come_from_each_runs_config(tmp_path):
    """'auto' precision means bf16 on a GPU (an older run did not record it), fp32 on a CPU; changed
    epochs are named; a setting a method does not use (SimCLR's prune ratio) is not."""
    from methods.base import default_config

    reg = Registry(f"sqlite:///{tmp_path / 'r.db'}")
    simclr = {**default_config("simclr").to_dict(), "epochs": 500, "prune_ratio": 0.5}
    for device, cfg in (("NVIDIA H200", {"method": simclr, "precision": "auto"}),
                        ("cpu (x86_64)", {"method": default_config("bcl-d").to_dict(), "precision": "auto"}),
                        ("NVIDIA H200", {"method": default_config("bcl-i").to_dict(), "precision": "fp32"})):
        rid = reg.create_run(cfg["method"]["name"], "split1", 10, 2000, cfg, status="done", device=device)
        log(reg, rid, "full", 0, 50.0)
    notes = render_report(reg.runs_frame(), reg.probe_frame(), "term", tables=(1,)).splitlines()
    devs = [n for n in notes if n.startswith("Deviation")]
    assert devs == ["Deviation from the authors' recipe: 500 epochs instead of 2000 (run #1).",
                    "Deviation from the authors' recipe: bf16 autocast instead of fp32 (run #1)."]


def test_environment_table_marks_what_old_runs_did_not_record(tmp_path):
    reg = Registry(f"sqlite:///{tmp_path / 'r.db'}")
    new = reg.create_run("simclr", "split1", 10, 2, {"split_sha256": "ab" * 32}, status="done", device="NVIDIA H200",
                         versions={"driver": "580.95.05", "cuda": "13.0", "container_image": None}, git_rev="c0ffee")
    old = reg.create_run("simclr", "split1", 11, 2, {}, status="done")
    env = render_report(reg.runs_frame(), reg.probe_frame(), "csv", tables=(4,))
    frame = pd.read_csv(io.StringIO(env), dtype=str).set_index(["field", "value"])["runs"]
    assert frame[("driver", "580.95.05")] == str(new) and frame[("driver", "not recorded")] == str(old)
    assert frame[("container_image", "none")] == str(new) and frame[("commit", "c0ffee")] == str(new)
    assert frame[("split", "split1: " + "ab" * 8 + "…")] == str(new)
    assert frame[("split", "split1: not recorded")] == str(old)
