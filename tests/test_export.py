"""`harness export tensorboard` and `harness export mlflow`, read back with each tool's own reader
(TensorBoard's EventAccumulator, MLflow's client on a SQLite tracking store)."""
from __future__ import annotations

import importlib.util
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from typer.testing import CliRunner

from harness.cli import app
from harness.export import ExportError, export_tensorboard, parse_run_ids, run_folder
from harness.registry import Registry

T0 = datetime(2026, 3, 1, 12, 0, 0)  # naive UTC, as the registry stores times
HOSTILE_SPLIT = "../../etc/x y\n"


def ts(dt: datetime) -> float:
    return dt.replace(tzinfo=timezone.utc).timestamp()


def make_registry(url: str) -> Registry:
    """Run 1: BCL-D, done, three epochs logged at known times, a kNN monitor value, full and five
    100-shot probes, a checkpoint. Run 2: SimCLR on a hostile split name, failed, one epoch row from
    before schema 4 (no logged_at: its time is the start plus the epoch's duration)."""
    reg = Registry(url)
    cfg = {"method": {"name": "bcl-d", "lr": 0.5, "batch_size": 512, "epochs": 3}, "precision": "auto",
           "class_counts": list(range(1, 101)), "split_sha256": "ab" * 32}
    r1 = reg.create_run("bcl-d", "split1", 10, 3, cfg, status="done", device="NVIDIA H200",
                        versions={"torch": "2.14.1", "cuda": "13.0", "precision": "bf16"}, git_rev="0123abcd")
    reg.update_run(r1, started_at=T0, finished_at=T0 + timedelta(minutes=3), epochs_done=3, wall_time_s=180.0)
    for ep in (1, 2, 3):
        extra = {"knn_top1": 30.0 + ep} if ep == 3 else {}
        reg.log_epoch(r1, ep, loss=6.0 - ep, lr=0.1 * ep, images_per_s=1000.0 * ep, epoch_time_s=60.0,
                      weight_mean=0.5, weight_q10=0.1, weight_q25=0.25, weight_q50=0.5 + 0.01 * ep, weight_q75=0.75,
                      weight_q90=0.9, logged_at=T0 + timedelta(minutes=ep), **extra)
    reg.log_probe(r1, "full", 0, 58.0, top5=80.0, many=65.0, medium=58.0, few=50.0, std=6.1)
    for k in range(1, 6):
        reg.log_probe(r1, "100", k, 50.0 + k)
    reg.add_artifact(r1, "checkpoint", "/ckpt/run1/last.pt", sha256="cd" * 32, epoch=3)
    r2 = reg.create_run("simclr", HOSTILE_SPLIT, 11, 5, {"method": {"name": "simclr", "lr": 0.25}}, status="failed")
    reg.update_run(r2, started_at=T0, error="diverged")
    reg.log_epoch(r2, 1, loss=7.0, epoch_time_s=42.0)
    with reg.engine.begin() as c:  # as a schema-3 registry migrated to 4 holds it
        c.exec_driver_sql(f"UPDATE epoch_metrics SET logged_at = NULL WHERE run_id = {r2}")
    return reg


@pytest.fixture()
def reg(tmp_path):
    return make_registry(f"sqlite:///{tmp_path / 'r.db'}")


def test_parse_run_ids():
    assert parse_run_ids("1,3, 5-7") == [1, 3, 5, 6, 7] and parse_run_ids(None) is None
    for bad in ("x", "7-5", "1,,2", "-3"):
        with pytest.raises(ExportError, match="not a run id"):
            parse_run_ids(bad)


# -- TensorBoard -----------------------------------------------------------------------------

def accumulate(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def scalars(acc, tag) -> list[tuple[int, float, float]]:
    return [(e.step, round(e.value, 6), e.wall_time) for e in acc.Scalars(tag)]


def test_tensorboard_export_reads_back(reg, tmp_path):
    from tensorboard.plugins.hparams import plugin_data_pb2

    out = tmp_path / "tb"
    folders = export_tensorboard(reg, out)
    assert [f.name for f in folders] == [run_folder(reg.get_run(1)), run_folder(reg.get_run(2))]
    assert all(f.parent == out for f in folders)  # the hostile split name stays inside
    acc = accumulate(folders[0])
    minute = lambda k: ts(T0 + timedelta(minutes=k))
    assert scalars(acc, "train/loss") == [(1, 5.0, minute(1)), (2, 4.0, minute(2)), (3, 3.0, minute(3))]
    assert [v for _, v, _ in scalars(acc, "bcl/weight_q50")] == [0.51, 0.52, 0.53]
    assert scalars(acc, "monitor/knn_top1") == [(3, 33.0, minute(3))]
    assert [v for _, v, _ in scalars(acc, "train/images_per_s")] == [1000.0, 2000.0, 3000.0]
    # probe scores at the run's last epoch: 100-shot averaged over its five subsets
    assert scalars(acc, "probe/100/top1")[0][:2] == (3, 53.0)
    assert scalars(acc, "probe/full/many")[0][:2] == (3, 65.0)
    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["method"].string_value == "bcl-d"
    assert start.hparams["method.lr"].number_value == 0.5 and start.hparams["seed"].number_value == 10
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert {m.name.tag for m in experiment.metric_infos} >= {"probe/full/top1", "probe/100/top1"}
    # an old row (no logged_at): the run's start plus its epoch's 42 s
    old = accumulate(folders[1])
    assert scalars(old, "train/loss") == [(1, 7.0, ts(T0) + 42.0)]


def test_tensorboard_export_twice_rewrites_and_never_touches_other_folders(reg, tmp_path):
    out = tmp_path / "tb"
    first = export_tensorboard(reg, out, [1])
    export_tensorboard(reg, out, [1])
    events = list(first[0].glob("events.out.tfevents.*"))
    assert len(events) == 1 and len(scalars(accumulate(first[0]), "train/loss")) == 3
    assert sorted(p.name for p in out.iterdir()) == [first[0].name]  # no temp folder left
    foreign = out / run_folder(reg.get_run(2))
    foreign.mkdir()
    (foreign / "mine.txt").write_text("keep")
    r = CliRunner().invoke(app, ["export", "tensorboard", str(out), "--registry", reg.url, "--runs", "2"])
    assert r.exit_code == 1 and "was not written by `harness export`" in r.output
    assert (foreign / "mine.txt").read_text() == "keep"
    r = CliRunner().invoke(app, ["export", "tensorboard", str(out), "--registry", reg.url, "--runs", "9"])
    assert r.exit_code == 1 and "no run with id 9" in r.output


# -- MLflow ----------------------------------------------------------------------------------

needs_mlflow = pytest.mark.skipif(importlib.util.find_spec("mlflow") is None,
                                  reason="mlflow is not installed (optional extra: pip install '.[mlflow]')")


@needs_mlflow
def test_mlflow_export_reads_back_and_never_duplicates(reg, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anything MLflow might write beside it lands here
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    r = CliRunner().invoke(app, ["export", "mlflow", "--tracking-uri", uri, "--registry", reg.url])
    assert r.exit_code == 0, r.output
    assert "run 1: created MLflow run" in r.output and "run 2: created" in r.output

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("bcl-harness")

    def exported():
        return {int(x.data.tags["harness.run_id"]): x for x in client.search_runs([exp.experiment_id])}

    runs = exported()
    assert sorted(runs) == [1, 2]
    one = runs[1]
    assert one.info.status == "FINISHED" and runs[2].info.status == "FAILED"
    assert one.info.start_time == int(ts(T0) * 1000) and one.info.end_time == int(ts(T0 + timedelta(minutes=3)) * 1000)
    assert one.data.params["method.lr"] == "0.5" and one.data.params["precision"] == "auto"
    assert one.data.tags["harness.checkpoint.path"] == "/ckpt/run1/last.pt"
    assert one.data.tags["harness.checkpoint.sha256"] == "cd" * 32
    assert one.data.tags["mlflow.source.git.commit"] == "0123abcd" and one.data.tags["harness.env.cuda"] == "13.0"
    loss = client.get_metric_history(one.info.run_id, "train/loss")
    assert sorted((m.step, m.value, m.timestamp) for m in loss) == [
        (k, 6.0 - k, int(ts(T0 + timedelta(minutes=k)) * 1000)) for k in (1, 2, 3)]
    assert one.data.metrics["probe/100/top1"] == pytest.approx(53.0)
    assert one.data.metrics["probe/full/few"] == pytest.approx(50.0)

    # again: nothing new; then one more epoch in the registry: exactly its values are added
    r = CliRunner().invoke(app, ["export", "mlflow", "--tracking-uri", uri, "--registry", reg.url])
    assert r.exit_code == 0 and "run 1: updated" in r.output and "(0 metric values added)" in r.output
    assert len(exported()) == 2 and len(client.get_metric_history(one.info.run_id, "train/loss")) == 3
    reg.log_epoch(1, 4, loss=2.0, logged_at=T0 + timedelta(minutes=4))
    r = CliRunner().invoke(app, ["export", "mlflow", "--tracking-uri", uri, "--registry", reg.url, "--runs", "1"])
    assert r.exit_code == 0 and "run 1: updated" in r.output and "(1 metric values added)" in r.output
    assert len(exported()) == 2 and len(client.get_metric_history(one.info.run_id, "train/loss")) == 4
    assert not (tmp_path / "mlruns").exists()  # references only: no artifact was copied


def test_mlflow_missing_is_one_line(reg, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_mlflow(name, *args, **kwargs):
        if name == "mlflow" or name.startswith("mlflow."):
            raise ImportError("No module named 'mlflow'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mlflow)
    r = CliRunner().invoke(app, ["export", "mlflow", "--tracking-uri", "sqlite:///x.db", "--registry", reg.url])
    assert r.exit_code == 1 and "pip install '.[mlflow]'" in r.output
