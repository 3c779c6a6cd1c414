"""The method registry: lookups, --set options, report rows, BCL around any base, stray parameters,
plugins from other packages (a real entry point, in a subprocess), runs written before methods had
their own configs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from typer.testing import CliRunner

from harness import data
from harness.cli import app
from harness.registry import Registry
from harness.report import render_report, table1_frame
from harness.train import TrainError, Trainer, load_checkpoint, make_config, train
from methods import registry
from methods.base import MethodConfig, build_method
from methods.bcl import BCL, BCLConfig
from methods.registry import MethodError
from methods.simclr import SimCLR
from tests.conftest import REPO

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()


@pytest.fixture()
def tiny(tmp_path):
    data.make_synthetic(tmp_path / "data", per_class=1, test_per_class=1)
    np.save(tmp_path / "s.npy", np.arange(16))
    return dict(data_root=str(tmp_path / "data"), checkpoint_dir=str(tmp_path / "ck"), epochs=1, batch_size=8,
                width=4, warmup_epochs=1, monitor_size=8), str(tmp_path / "s.npy"), f"sqlite:///{tmp_path}/r.db"


def test_registry_lists_the_methods_in_report_order():
    assert registry.names()[:6] == ["simclr", "bcl-i", "sdclr", "bcl-d", "simsiam", "bcl-simsiam"]
    assert registry.paper_names() == ["simclr", "bcl-i", "sdclr", "bcl-d"]
    e = registry.get("BCL-SimSiam")
    assert (e.name, e.display_name, e.base, e.paper) == ("bcl-simsiam", "BCL(SimSiam)", "simsiam", False)
    assert registry.get("bcl-d").base == "sdclr" and registry.display_name("moco") == "moco"
    with pytest.raises(MethodError, match="unknown method 'byol'; choose one of simclr, bcl-i"):
        registry.get("byol")


def test_set_options_are_typed_checked_recorded_and_reported(tiny, tmp_path):
    kw, split, url = tiny
    assert registry.parse_options("simsiam", ["predictor-dim=16", "projection_dim=32"]) == \
        {"predictor_dim": 16, "projection_dim": 32}
    assert registry.parse_options("bcl-d", ["bcl_random_magnitude=no", "temperature=0.5"]) == \
        {"bcl_random_magnitude": False, "temperature": 0.5}
    for bad, says in ((["predictor_dim=1.5"], "expects an integer"), (["temperature=x"], "no option 'temperature'"),
                      (["lr=0.1"], "has its own option: --lr"), (["predictor_dim"], "write NAME=VALUE")):
        with pytest.raises(MethodError, match=says):
            registry.parse_options("simsiam", bad)
    with pytest.raises(TrainError, match=r"--set predictor_dim=0 \(must be an integer from 1"):
        make_config("simsiam", split, options=["predictor_dim=0"])
    r = runner.invoke(app, ["train", "simsiam", "--split", split, "--set", "temperature=0.5", "--registry", url])
    assert r.exit_code == 1 and "simsiam has no option 'temperature'; its options: projection_dim (paper: 2048)" \
        in r.output and len(r.output.strip().splitlines()) == 1
    args = ["train", "simsiam", "--split", split, "--data-root", kw["data_root"], "--checkpoint-dir",
            kw["checkpoint_dir"], "--epochs", "1", "--batch-size", "8", "--width", "4", "--device", "cpu",
            "--registry", url, "--no-progress", "--set", "predictor_dim=16", "--set", "projection_dim=32"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    reg = Registry(url)
    run = reg.get_run(1)
    assert run["config"]["method"]["predictor_dim"] == 16 and "temperature" not in run["config"]["method"]
    # a resume keeps the run's recipe: another value of an option is refused
    r = runner.invoke(app, ["train", "simsiam", "--resume", "1", "--registry", url, "--set", "predictor_dim=8"])
    assert r.exit_code == 1 and "predictor_dim (run: 16, asked: 8)" in r.output
    reg.update_run(1, status="done")
    reg.log_probe(1, "full", 0, 10.0)
    text = render_report(reg.runs_frame(), reg.probe_frame(), "term", tables=(1,))
    assert "projection dim 32 instead of 2048 (run #1)" in text and "predictor dim 16 instead of 512 (run #1)" in text
    assert "SimSiam " in text
    # `runs show` prints SimSiam's negative loss as it is, and a negative zero as 0
    reg.log_epoch(1, 2, loss=-0.0)
    shown = runner.invoke(app, ["runs", "show", "1", "--registry", url]).output
    losses = [line.split()[1] for line in shown.splitlines() if line[:1].isdigit() and len(line.split()) == 5]
    first = reg.epochs(1)[0]["loss"]
    assert -1 <= first < 0 and losses == [f"{first:.4g}", "0"], shown


def test_report_rows_follow_the_registry_and_show_paper_rows_on_request(tmp_path):
    reg = Registry(f"sqlite:///{tmp_path}/r.db")
    for m in ("moco", "bcl-simsiam", "sdclr", "simsiam", "simclr"):
        reg.log_probe(reg.create_run(m, "split1", 10, 2, {}, status="done"), "full", 0, 40.0)
    assert list(table1_frame(reg.runs_frame(), reg.probe_frame())["method"]) == \
        ["simclr", "sdclr", "simsiam", "bcl-simsiam", "moco"]
    assert list(table1_frame(reg.runs_frame(), reg.probe_frame(), paper_rows=True)["method"]) == \
        ["simclr", "bcl-i", "sdclr", "bcl-d", "simsiam", "bcl-simsiam", "moco"]
    out = runner.invoke(app, ["report", "--registry", reg.url, "--table", "1"]).output
    labels = [line.split()[0] for line in out.splitlines()[3:8]]
    assert labels == ["SimCLR", "SDCLR", "SimSiam", "BCL(SimSiam)", "moco"] and "BCL-D" not in out
    assert "BCL-D" in runner.invoke(app, ["report", "--registry", reg.url, "--paper-rows"]).output


def test_help_texts_list_the_registered_methods():
    for cmd in (["train"], ["run"], ["bench"], ["eval"], ["report"]):
        flat = "".join(runner.invoke(app, [*cmd, "--help"]).output.replace("│", "").split())  # help boxes wrap
        assert "simclr,bcl-i,sdclr,bcl-d,simsiam,bcl-simsiam" in flat, cmd
        assert "{methods}" not in flat and "{paper_methods}" not in flat
    out = runner.invoke(app, ["methods", "--json"]).output
    rows = {r["method"]: r for r in json.loads(out)}
    assert rows["simsiam"]["options (paper values)"] == "projection_dim=2048, predictor_dim=512"
    assert rows["bcl-simsiam"]["BCL of"] == "simsiam" and rows["bcl-d"]["paper"] == "yes"


# -- BCL around any base ---------------------------------------------------------------------

@dataclass
class RecorderConfig(MethodConfig):
    scale: float = 1.0


class Recorder(SimCLR):
    """A base with its own constructor, options, module, hooks and state."""
    name, display_name, config_cls = "recorder", "Recorder", RecorderConfig

    def __init__(self, cfg, num_samples, device):
        super().__init__(cfg, num_samples, device)
        self.calls: list = []
        self.extra = nn.Linear(2, 2)
        self.count = torch.zeros(())

    def modules(self):
        return {"net": self.net, "extra": self.extra}

    def on_epoch_start(self, epoch):
        self.calls.append(("start", epoch))

    def on_epoch_end(self, epoch):
        self.calls.append(("end", epoch))
        return {"recorder_epochs": float(epoch)}

    def loss_from_views(self, views):
        per = self.forward(views).float().pow(2).mean(1).chunk(2)[0] * self.cfg.scale
        return per.mean(), per.detach()

    def state_dict(self):
        return {"count": self.count.clone()}

    def load_state_dict(self, d):
        self.count.copy_(d["count"])


@dataclass
class BCLRecorderConfig(RecorderConfig, BCLConfig):
    pass


class BCLRecorder(BCL):
    name, display_name, config_cls, base_cls = "bcl-recorder", "BCL(Recorder)", BCLRecorderConfig, Recorder


def test_bcl_builds_any_base_with_its_constructor_and_passes_every_hook(monkeypatch):
    cfg = BCLRecorderConfig(name="bcl-recorder", width=4, scale=2.0, bcl_k=3)
    m = BCLRecorder(cfg, num_samples=4, device="cpu")
    assert type(m.base) is Recorder and type(m.base.cfg) is RecorderConfig and m.base.cfg.scale == 2.0
    assert not hasattr(m.base.cfg, "bcl_k")  # the base sees its own config only
    assert m.modules() == m.base.modules() and set(m.modules()) == {"net", "extra"}
    assert m.probed_network() is m.base.net
    m.on_epoch_start(1)
    m.training_step(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.arange(4), 1, torch.Generator())
    stats = m.on_epoch_end(1)
    assert m.base.calls == [("start", 1), ("end", 1)]
    assert stats["recorder_epochs"] == 1.0 and "w_mean" in stats  # the base's statistics and BCL's
    m.base.count.fill_(7)
    state = m.state_dict()
    other = BCLRecorder(cfg, num_samples=4, device="cpu")
    other.load_state_dict(state)
    assert other.base.count.item() == 7 and torch.equal(other.s, m.s)
    entry = registry.make_entry(BCLRecorder, "test")
    assert entry.base == "recorder"

    @dataclass
    class WrongOrder(BCLConfig, RecorderConfig):  # BCLConfig first would reset the base's recipe
        pass

    class Bad(BCL):
        name, display_name, config_cls, base_cls = "bad", "Bad", WrongOrder, Recorder

    with pytest.raises(MethodError, match="in that order"):
        registry.make_entry(Bad, "test")


def test_a_parameter_no_optimizer_sees_stops_the_run_before_it_starts(tiny, monkeypatch):
    kw, split, url = tiny

    class Leaky(SimCLR):
        """The recipe followed literally: a predictor kept on the method, not listed in modules()."""
        name, display_name = "leaky", "Leaky"

        def __init__(self, cfg, num_samples, device):
            super().__init__(cfg, num_samples, device)
            self.predictor = nn.Sequential(nn.Linear(128, 8), nn.ReLU(), nn.Linear(8, 128))

    monkeypatch.setitem(registry.entries(), "leaky", registry.make_entry(Leaky, "test"))
    reg = Registry(url)
    with pytest.raises(TrainError, match=r"leaky has 4 parameter tensor\(s\) that no optimizer sees: "
                                         r"predictor\.0\.weight, predictor\.0\.bias"):
        Trainer(make_config("leaky", split, **kw), reg, progress=False)
    assert reg.list_runs() == []  # refused before a run exists, never a silent "done"


# -- plugins from other packages ---------------------------------------------------------------

PLUGIN = '''
from dataclasses import dataclass

from methods.bcl import BCL, BCLConfig
from methods.registry import register_method
from methods.simclr import SimCLR, SimCLRConfig


@dataclass
class LabConfig(SimCLRConfig):
    temperature: float = 0.5
    sharpen: bool = False


@register_method
class LabCLR(SimCLR):
    name = "lab-clr"
    display_name = "LabCLR"
    config_cls = LabConfig


@dataclass
class BCLLabConfig(LabConfig, BCLConfig):
    pass


@register_method
class BCLLab(BCL):
    name = "bcl-lab"
    display_name = "BCL(LabCLR)"
    config_cls = BCLLabConfig
    base_cls = LabCLR
'''

SCRIPT = '''
import json, sys
from typer.testing import CliRunner
from harness.cli import app
r = CliRunner()
out = {"methods": r.invoke(app, ["methods", "--json"]).output}
common = ["--split", sys.argv[1], "--data-root", sys.argv[2], "--epochs", "1", "--batch-size", "8", "--width", "4",
          "--device", "cpu", "--registry", sys.argv[3], "--no-progress", "--checkpoint-dir", sys.argv[4]]
for m in ("lab-clr", "bcl-lab"):
    res = r.invoke(app, ["train", m, *common, "--set", "sharpen=true"])
    out[m] = [res.exit_code, res.output]
print(json.dumps(out))
'''


def test_a_method_from_another_installed_package_registers_through_its_entry_point(tiny, tmp_path):
    kw, split, url = tiny
    site = tmp_path / "site"
    (site / "labmethods").mkdir(parents=True)
    (site / "labmethods" / "__init__.py").write_text(textwrap.dedent(PLUGIN))
    dist = site / "labmethods-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: labmethods\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[harness.methods]\nlab = labmethods\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)]), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", SCRIPT, split, kw["data_root"], url, kw["checkpoint_dir"]],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    rows = {r["method"]: r for r in json.loads(out["methods"])}
    assert rows["lab-clr"]["from"] == "entry point lab = labmethods" and rows["bcl-lab"]["BCL of"] == "lab-clr"
    for m in ("lab-clr", "bcl-lab"):
        assert out[m][0] == 0 and "done after 1 epochs" in out[m][1], out[m]
    reg = Registry(url)
    cfgs = {r["method"]: r["config"]["method"] for r in reg.list_runs()}
    assert cfgs["lab-clr"]["temperature"] == 0.5 and cfgs["bcl-lab"]["sharpen"] is True
    assert "bcl_k" in cfgs["bcl-lab"]


def test_a_broken_plugin_is_named_in_one_line(monkeypatch):
    class BrokenEntryPoint:
        name, value, dist = "broken", "labbroken:Method", None

        def load(self):
            raise ImportError("No module named 'labbroken'")

    monkeypatch.setattr(registry, "_ENTRIES", {})
    monkeypatch.setattr(registry, "_LOADED", False)
    monkeypatch.setattr(registry, "_entry_points", lambda: [BrokenEntryPoint()])
    with pytest.raises(MethodError, match=r"method plugin entry point broken = labbroken:Method failed to load: "
                                          r"ImportError: No module named 'labbroken'; fix or uninstall"):
        registry.load()


# -- runs recorded before methods had their own configs -------------------------------------------

OLD_FLAT_DEFAULTS = dict(batch_size=512, epochs=2000, lr=0.5, final_lr=1e-6, momentum=0.9, weight_decay=5e-4,
                         warmup_epochs=10, temperature=0.2, seed=10, width=64, prune_ratio=0.9, bcl_beta=0.97,
                         bcl_k=1, bcl_min_magnitude=10.0, bcl_max_magnitude=30.0, bcl_random_magnitude=False)


def as_old_layout(ckpt: dict) -> dict:
    """A checkpoint as the harness wrote it before methods had their own configs and modules: one flat
    MethodConfig with every method's fields, no "modules" entry."""
    flat = {**OLD_FLAT_DEFAULTS, **ckpt["config"]}
    old = {k: v for k, v in ckpt.items() if k != "modules"}
    return {**old, "config": flat, "train_config": {**ckpt["train_config"], "method": flat}}


@pytest.mark.parametrize("method", ["simclr", "bcl-d"])  # fields dropped on reading / the most state
def test_a_checkpoint_of_the_old_layout_resumes_exactly(tiny, tmp_path, method):
    from harness.train import save_checkpoint

    kw, split, url = tiny
    kw = {**kw, "epochs": 2}
    reg = Registry(url)
    full = train(make_config(method, split, **kw), reg, progress=False)
    part = train(make_config(method, split, **{**kw, "checkpoint_dir": str(tmp_path / "b")}, max_steps=3), reg,
                 progress=False)
    art = reg.latest_checkpoint(part["run_id"])
    old = as_old_layout(load_checkpoint(art["path"]))
    assert "modules" not in old and "prune_ratio" in old["train_config"]["method"]
    sha = save_checkpoint(Path(art["path"]), old)
    reg.add_artifact(part["run_id"], "checkpoint", art["path"], sha, epoch=art["epoch"])
    reg.update_run(part["run_id"], config={**reg.get_run(part["run_id"])["config"],
                                           "method": old["train_config"]["method"]})
    rest = train(None, reg, resume=part["run_id"], progress=False, asked={})
    a, b = load_checkpoint(full["checkpoint"]), load_checkpoint(rest["checkpoint"])
    for key in ("model", "method_state"):
        assert a[key].keys() == b[key].keys()
        for k, v in a[key].items():
            assert torch.equal(v, b[key][k]) if torch.is_tensor(v) else v == b[key][k], (key, k)
    assert all(torch.equal(x["momentum_buffer"], y["momentum_buffer"])
               for x, y in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()))
    assert set(b["config"]) == set(registry.get(method).default_config().to_dict())  # its own fields only
    # the report still reads the old flat run config (no departures: the flat fields are the paper's)
    reg.log_probe(part["run_id"], "full", 0, 30.0)
    text = render_report(reg.runs_frame(), reg.probe_frame(), "term", tables=(1,))
    deviations = [line for line in text.splitlines() if line.startswith("Deviation")]
    assert any("ResNet-18 width 4 instead of 64" in d for d in deviations), text
    own = set(registry.get(method).default_config().to_dict())
    foreign = {"prune_ratio", "bcl_beta", "bcl_k", "projection_dim"} - own  # flat fields the method never had
    assert not [d for d in deviations if any(f.replace("_", " ") in d for f in foreign)], deviations


def test_eval_names_the_weights_that_do_not_fit(tmp_path):
    from harness.evaluate import EvalError, load_model

    net = build_method("simsiam", registry.get("simsiam").config_cls(name="simsiam", width=4, projection_dim=8,
                                                                      predictor_dim=4)).net
    state = {**net.state_dict(), "predictor.0.weight": torch.zeros(4, 8)}
    path = tmp_path / "c.pt"
    torch.save({"method": "simsiam", "model": state, "config": {"width": 4, "projection_dim": 8}}, path)
    with pytest.raises(EvalError, match=r"unexpected 1 weight\(s\): predictor\.0\.weight"):
        load_model(path)
    del state["predictor.0.weight"]
    torch.save({"method": "simsiam", "model": state, "config": {"width": 4, "projection_dim": 8}}, path)
    assert load_model(path)[0].features(torch.zeros(2, 3, 32, 32)).shape == (2, 32)


def test_matrix_gives_each_method_the_options_it_has(tiny, tmp_path, monkeypatch):
    from harness import splits
    from harness.matrix import Cell, MatrixError, MatrixSettings, check_settings, run_cell

    kw, split, url = tiny
    monkeypatch.setenv(splits.GENERATED_ENV_VAR, str(tmp_path / "gen"))
    splits.save_generated("t", np.arange(16), "pretrain", "test")
    s = MatrixSettings(methods=("simclr", "simsiam"), splits=("t",), epochs=1, batch_size=8, width=4,
                       evaluate=False, data_root=kw["data_root"], checkpoint_dir=kw["checkpoint_dir"], registry=url,
                       options=("predictor_dim=8", "projection_dim=16", "temperature=0.4"))
    check_settings(s)
    assert s.options_for("simclr") == {"temperature": 0.4}
    with pytest.raises(MatrixError, match="none of the methods simclr, simsiam has an option 'prune_ratio'"):
        check_settings(MatrixSettings(**{**s.__dict__, "options": ("prune_ratio=0.5",)}))
    assert run_cell(Cell("simsiam", "t", 10), s, "cpu") == "train"  # the worker's body, as each process runs it
    cfg = Registry(url).list_runs(method="simsiam")[0]["config"]["method"]
    assert (cfg["predictor_dim"], cfg["projection_dim"]) == (8, 16) and "temperature" not in cfg
