"""Linear-probe protocol: schedule, batching, groups, batched == one-by-one, accuracy sanity."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from harness.probe import (
    FEATURE_DIM, ProbeConfig, ProbeSpec, batches_per_epoch, class_groups, extract_features,
    group_metrics, init_linear, lr_schedule, probe_generator, run_probes, score_probe, train_probes,
)

NUM_CLASSES = 100  # CIFAR-100's: these tests probe the paper's setting


def test_lr_schedule_protocol():
    cfg = ProbeConfig()
    lrs = lr_schedule(cfg)
    assert len(lrs) == 500 and lrs[0] == 1e-2
    gamma = (1e-6 / 1e-2) ** (1 / 500)
    assert all(math.isclose(b / a, gamma, rel_tol=1e-12) for a, b in zip(lrs, lrs[1:]))
    assert math.isclose(lrs[-1] * gamma, 1e-6, rel_tol=1e-9)  # after the last epoch


def test_lr_schedule_matches_exponential_lr():
    cfg = ProbeConfig(epochs=7)
    opt = torch.optim.Adam([nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, cfg.gamma)
    seen = []
    for _ in range(cfg.epochs):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == lr_schedule(cfg)


@pytest.mark.parametrize("n, expected", [(40_000, 40), (10_000, 10), (5_000, 5), (1_234, 2), (999, 1), (1, 1)])
def test_batches_per_epoch_keeps_last_partial(n, expected):
    assert batches_per_epoch(n, 1000) == expected


def test_init_is_pytorch_default():
    torch.manual_seed(123)
    ref = nn.Linear(FEATURE_DIM, NUM_CLASSES)
    w, b = init_linear(torch.Generator().manual_seed(123), dim_out=NUM_CLASSES)
    assert torch.equal(w, ref.weight.data) and torch.equal(b, ref.bias.data)


def test_groups_33_33_34():
    counts = np.arange(100)[::-1] * 3 + 4  # class 0 largest
    g = class_groups(counts)
    assert [len(g[k]) for k in ("few", "medium", "many")] == [33, 33, 34]
    assert set(g["few"]) == set(range(67, 100)) and set(g["many"]) == set(range(34))


def test_groups_ties_use_stable_order():
    counts = np.array([5] * 50 + [1] * 50)  # ties broken by class id
    g = class_groups(counts)
    assert list(g["few"]) == list(range(50, 83))
    assert list(g["medium"]) == list(range(0, 16)) + list(range(83, 100))
    assert list(g["many"]) == list(range(16, 50))
    g = class_groups(np.full(100, 7))
    assert list(g["few"]) == list(range(33)) and list(g["many"]) == list(range(66, 100))


def test_group_metrics_and_std():
    per_class = np.zeros(100)
    counts = np.arange(100)  # few 0..32, medium 33..65, many 66..99
    per_class[66:] = 90.0
    per_class[33:66] = 60.0
    per_class[:33] = 30.0
    g = group_metrics(per_class, counts)
    assert (g["many"], g["medium"], g["few"]) == (90.0, 60.0, 30.0)
    assert g["std"] == pytest.approx(np.sqrt(((30 ** 2) * 2) / 3))  # ddof 0
    assert group_metrics(per_class, None)["many"] is None


def test_score_probe_top1_top5_per_class():
    feats = torch.eye(NUM_CLASSES)[:, :NUM_CLASSES]  # feature = one-hot of a "predicted" class
    feats = F.pad(feats, (0, FEATURE_DIM - NUM_CLASSES))
    W = torch.zeros(FEATURE_DIM, NUM_CLASSES)
    W[:NUM_CLASSES] = torch.eye(NUM_CLASSES)
    labels = torch.arange(NUM_CLASSES)
    labels[:10] = (labels[:10] + 1) % NUM_CLASSES  # 10 wrong predictions
    r = score_probe(W, torch.zeros(NUM_CLASSES), feats, labels, np.arange(100))
    assert r["top1"] == pytest.approx(90.0)
    assert len(r["per_class"]) == 100 and r["top5"] >= r["top1"]


# -- batched training == torch's nn.Linear + Adam + ExponentialLR, one probe at a time -------------

def reference_probe(feats, labels, subset, seed, cfg):
    """The protocol written the obvious way, with torch's own optimizer and scheduler."""
    g = probe_generator(seed, feats.device)
    lin = nn.Linear(FEATURE_DIM, NUM_CLASSES).to(feats.device, feats.dtype)
    w, b = init_linear(g, feats.device, dim_out=NUM_CLASSES)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    opt = torch.optim.Adam(lin.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, cfg.gamma)
    steps = 0
    for _ in range(cfg.epochs):
        order = subset[torch.randperm(len(subset), generator=g, device=feats.device)]
        for i in range(0, len(order), cfg.batch_size):
            idx = order[i:i + cfg.batch_size]
            loss = F.cross_entropy(lin(feats[idx]), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
        sched.step()
    return lin.weight.detach().T, lin.bias.detach(), steps


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-8), (torch.float32, None)])
def test_batched_equals_one_by_one(dtype, tol):
    """The two differ only in summation order. Adam's update is lr * m / (sqrt(v) + 1e-8):
    for a gradient that happens to cancel to ~0, rounding noise is amplified by up to
    lr / eps = 1e6. fp64: rounding ~1e-17 -> all weights agree to 1e-8 (weights are ~4e-2).
    fp32: rounding ~1e-9 -> a handful of such weights differ by ~1e-4, the rest agree to 1e-5."""
    torch.manual_seed(0)
    n = 1300
    feats = torch.randn(n, FEATURE_DIM, dtype=dtype)
    labels = torch.randint(0, NUM_CLASSES, (n,))
    # training-set sizes with different batch counts and partial last batches (batch 100)
    sizes = [120, 1234, 500, 7, 250, 100]
    subsets = [torch.randperm(n)[:k] for k in sizes]
    seeds = [11, 12, 13, 14, 15, 16]
    cfg = ProbeConfig(epochs=3, batch_size=100)
    W, b = train_probes(feats, labels, subsets, seeds, cfg)
    for p in range(len(sizes)):
        w_ref, b_ref, steps = reference_probe(feats, labels, subsets[p], seeds[p], cfg)
        assert steps == 3 * batches_per_epoch(sizes[p], 100)
        if tol is not None:
            torch.testing.assert_close(W[p], w_ref, rtol=0, atol=tol)
            torch.testing.assert_close(b[p], b_ref, rtol=0, atol=tol)
        else:
            d = (W[p] - w_ref).abs()
            assert (d > 1e-5).float().mean() < 1e-3 and d.max() < 1e-3
            torch.testing.assert_close(b[p], b_ref, rtol=1e-4, atol=1e-6)


def test_probe_independent_of_batch_mates():
    torch.manual_seed(1)
    feats, labels = torch.randn(400, FEATURE_DIM), torch.randint(0, NUM_CLASSES, (400,))
    a, b_ = torch.arange(0, 300), torch.arange(300, 350)
    cfg = ProbeConfig(epochs=2, batch_size=64)
    W1, _ = train_probes(feats, labels, [a], [5], cfg)
    W2, _ = train_probes(feats, labels, [b_, a], [9, 5], cfg)
    torch.testing.assert_close(W1[0], W2[1])


# -- accuracy sanity -----------------------------------------------------------------------------

def synthetic_features(per_class: int, seed: int, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(NUM_CLASSES, FEATURE_DIM, generator=torch.Generator().manual_seed(99)) * scale
    y = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
    return centers[y] + 0.5 * torch.randn(len(y), FEATURE_DIM, generator=g), y


def test_separable_features_reach_high_accuracy():
    xtr, ytr = synthetic_features(10, 0)
    xte, yte = synthetic_features(10, 1)
    specs = [ProbeSpec("full", 0, torch.arange(len(ytr)), seed=0)]
    r = run_probes(specs, xtr, ytr, xte, yte, np.arange(100), ProbeConfig(epochs=10))[0]
    assert r["top1"] > 95 and r["top5"] > 99
    assert r["many"] is not None and r["train_size"] == 1000


def test_shuffled_labels_stay_near_chance():
    xtr, ytr = synthetic_features(10, 0)
    xte, yte = synthetic_features(10, 1)
    shuffled = ytr[torch.randperm(len(ytr), generator=torch.Generator().manual_seed(3))]
    specs = [ProbeSpec("full", 0, torch.arange(len(ytr)), seed=0)]
    r = run_probes(specs, xtr, shuffled, xte, yte, None, ProbeConfig(epochs=10))[0]
    assert r["top1"] < 5  # chance is 1 %


# -- features ------------------------------------------------------------------------------------

class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, FEATURE_DIM)
        self.branches = []

    def features(self, x, branch="dense"):
        self.branches.append(branch)
        assert not self.training and not torch.is_grad_enabled()
        assert x.dtype == torch.float32 and x.max() <= 1
        return self.fc(self.bn(self.conv(x)).mean((2, 3)))


def test_extract_features_eval_dense_nograd_batched(cifar_images):
    net = TinyNet().train()
    f = extract_features(net, cifar_images[:250], "cpu", batch_size=100)
    assert f.shape == (250, FEATURE_DIM) and f.dtype == torch.float32
    assert net.branches == ["dense"] * 3 and net.training  # mode restored
    with torch.no_grad():
        full = net.eval().features(torch.as_tensor(cifar_images[:250]).float() / 255)
    torch.testing.assert_close(f, full)


# -- end to end: evaluate a checkpoint on a synthetic dataset --------------------------------------

@pytest.fixture()
def synthetic_setup(tmp_path, monkeypatch):
    from harness import data as data_mod
    from harness import splits as splits_mod
    data = data_mod.make_synthetic(tmp_path / "data", per_class=2, test_per_class=1)
    labels = data.train_labels
    rng = np.random.default_rng(0)
    # stand-ins for the paper's lists, built from the 200 synthetic train images
    lists = {"full_shot": np.arange(150), "split1": np.concatenate([np.flatnonzero(labels == c)[:1 + c % 2]
                                                                   for c in range(100)])}
    for k in range(1, 6):
        lists[f"split{k}_100shot"] = rng.choice(200, 100, replace=False)
        lists[f"split{k}_50shot"] = rng.choice(200, 50, replace=False)
    monkeypatch.setattr(splits_mod, "load_split", lambda name, root=None, num_images=None: lists[name])
    return tmp_path, lists


def test_evaluate_checkpoint_end_to_end(synthetic_setup):
    from harness.evaluate import evaluate_checkpoint
    from harness.registry import Registry
    from methods.models import build_network
    tmp_path, lists = synthetic_setup
    net = build_network("sdclr", width=8)  # the checkpoint's config says its width; eval rebuilds it so
    ck = tmp_path / "ck.pt"
    torch.save({"method": "sdclr", "model": net.state_dict(), "config": {"seed": 10, "width": 8}, "epoch": 3,
                "split": "split1"}, ck)
    reg = Registry(f"sqlite:///{tmp_path / 'reg.db'}")
    out = evaluate_checkpoint(reg, ck, tmp_path / "data", None, epochs=2, device="cpu", progress=False)
    runs = reg.list_runs()
    assert len(runs) == 1 and runs[0]["status"] == "done" and runs[0]["tags"] == ["external"]
    assert (runs[0]["method"], runs[0]["split"], runs[0]["seed"]) == ("sdclr", "split1", 10)
    probes = reg.probe_frame()
    assert sorted(zip(probes["kind"], probes["subset"])) == sorted(
        [("full", 0)] + [(k, s) for k in ("100", "50") for s in range(1, 6)])
    assert probes["many"].notna().all() and len(probes["per_class"][0]) == 100
    assert set(out["summary"]) == {"full", "100", "50"}
    # re-evaluating the same file replaces the scores of the same run
    evaluate_checkpoint(reg, ck, tmp_path / "data", None, shots=("full",), epochs=1, device="cpu", progress=False)
    assert len(reg.list_runs()) == 1 and len(reg.probe_frame()) == 11


def test_eval_command_errors(tmp_path):
    from typer.testing import CliRunner
    from harness.cli import app
    reg = f"sqlite:///{tmp_path / 'reg.db'}"
    runner = CliRunner()
    r = runner.invoke(app, ["eval", "--checkpoint", str(tmp_path / "missing.pt"), "--registry", reg])
    assert r.exit_code == 1 and "not found" in r.output and len(r.output.strip().splitlines()) == 1
    bad = tmp_path / "bad.pt"
    torch.save({"state_dict": {"backbone.conv1.weight": torch.zeros(1)}}, bad)
    r = runner.invoke(app, ["eval", "--checkpoint", str(bad), "--registry", reg])
    assert r.exit_code == 1 and "--format reference" in r.output
    r = runner.invoke(app, ["eval", "--checkpoint", str(bad), "--format", "reference", "--registry", reg])
    assert r.exit_code == 1 and "--method" in r.output
    r = runner.invoke(app, ["eval", "--checkpoint", str(bad), "--format", "reference", "--method", "simclr",
                            "--registry", reg])
    assert r.exit_code == 1 and "missing" in r.output
    r = runner.invoke(app, ["eval", "--registry", reg])
    assert r.exit_code == 1 and "RUN_ID" in r.output


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_equals_eager():
    torch.manual_seed(0)
    feats = torch.randn(3000, FEATURE_DIM, device="cuda")
    labels = torch.randint(0, NUM_CLASSES, (3000,), device="cuda")
    subsets = [torch.arange(3000, device="cuda"), torch.arange(1234, device="cuda")]
    cfg = ProbeConfig(epochs=4)
    Wg, bg = train_probes(feats, labels, subsets, [0, 1], cfg, cuda_graph=True)
    We, be = train_probes(feats, labels, subsets, [0, 1], cfg, cuda_graph=False)
    assert torch.equal(Wg, We) and torch.equal(bg, be)
