"""SimCLR, SDCLR, BCL-I, BCL-D: configs, steps, SDCLR gradients, BCL memory and weights, state."""
from __future__ import annotations

import copy
import importlib.util
import sys
import types

import numpy as np
import pytest
import torch

import methods

if importlib.util.find_spec("methods.augment") is None:
    # methods/augment.py is written separately; the tests below patch its functions anyway
    methods.augment = sys.modules["methods.augment"] = types.ModuleType("methods.augment")
from methods import augment  # noqa: E402
from methods.base import MethodConfig, build_method, default_config  # noqa: E402
from methods.bcl import BCL, BCLD, BCLI, memory_weights  # noqa: E402
from methods.losses import nt_xent_per_sample  # noqa: E402
from methods.models import ContrastiveNet  # noqa: E402
from methods.sdclr import SDCLR  # noqa: E402
from methods.simclr import SimCLR  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


REAL_AUGMENT = all(callable(getattr(augment, f, None))
                   for f in ("simclr_augment", "boosted_randaugment", "to_unit_float"))


class FakeAugment:
    """Cheap stand-ins: a generator-driven +-2 jitter (so the two views differ) and a recorder."""

    def __init__(self):
        self.simclr_inputs, self.boosted_calls = [], []

    def simclr_augment(self, x, generator):
        self.simclr_inputs.append(x.clone())
        noise = torch.randint(-2, 3, x.shape, generator=generator, device=generator.device)
        return (x.long() + noise.to(x.device)).clamp(0, 255).to(torch.uint8)

    def boosted_randaugment(self, x, weight, magnitude, k, generator):
        self.boosted_calls.append(dict(x=x.clone(), weight=weight.clone(), magnitude=magnitude.clone(), k=k))
        return x

    @staticmethod
    def to_unit_float(x):
        return x.float() / 255


@pytest.fixture
def fake_aug(monkeypatch):
    fake = FakeAugment()
    for name in ("simclr_augment", "boosted_randaugment", "to_unit_float"):
        monkeypatch.setattr(augment, name, getattr(fake, name), raising=False)
    return fake


@pytest.fixture(scope="module")
def images(cifar_images):
    """8 real images cropped to 8x8: the fake augmentation and the network are size-agnostic, CPU time is short."""
    return torch.from_numpy(cifar_images[:8, :, 12:20, 12:20].copy())


@pytest.fixture(scope="module")
def images32(cifar_images):
    return torch.from_numpy(cifar_images[:4].copy())


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------- configs
def test_default_configs():
    """The paper's values; each method's config holds its own options and no other method's."""
    common = dict(batch_size=512, epochs=2000, lr=0.5, final_lr=1e-6, momentum=0.9, warmup_epochs=10,
                  temperature=0.2, seed=10)
    pruning, bcl = dict(prune_ratio=0.9), dict(bcl_beta=0.97, bcl_max_magnitude=30.0)
    expect = {"simclr": dict(weight_decay=5e-4), "sdclr": dict(weight_decay=1e-4, **pruning),
              "bcl-i": dict(weight_decay=5e-4, bcl_k=1, bcl_min_magnitude=10.0, bcl_random_magnitude=False, **bcl),
              "bcl-d": dict(weight_decay=1e-4, bcl_k=2, bcl_min_magnitude=5.0, bcl_random_magnitude=True,
                            **pruning, **bcl)}
    for name, extra in expect.items():
        cfg = default_config(name)
        assert isinstance(cfg, MethodConfig) and cfg.name == name
        for key, value in {**common, **extra}.items():
            assert getattr(cfg, key) == value, (name, key)
        assert cfg.to_dict()["weight_decay"] == extra["weight_decay"]
        foreign = {"prune_ratio", "bcl_beta", "bcl_k", "projection_dim"} - set(extra)
        assert not foreign & set(cfg.to_dict()), (name, foreign & set(cfg.to_dict()))
    with pytest.raises(ValueError):
        default_config("byol")


def test_build_method_types():
    kinds = {"simclr": (SimCLR, False), "sdclr": (SDCLR, True), "bcl-i": (BCLI, False), "bcl-d": (BCLD, True)}
    for name, (cls, two_branch) in kinds.items():
        m = build_method(name, num_samples=10)
        assert type(m) is cls and m.name == name
        assert isinstance(m.net, ContrastiveNet) and m.net.two_branch == two_branch
        assert m.cfg == default_config(name)
        if isinstance(m, BCL):
            assert m.net is m.base.net and m.s.shape == m.w.shape == m.seen.shape == (10,)
    assert type(build_method("bcl-i", num_samples=3).base) is SimCLR
    assert type(build_method("bcl-d", num_samples=3).base) is SDCLR
    with pytest.raises(ValueError):
        build_method("bcl-i")  # BCL needs the split size


# ---------------------------------------------------------------------------------------- SimCLR
def test_simclr_step(fake_aug, images):
    torch.manual_seed(0)
    m = build_method("simclr", num_samples=8)
    loss, per = m.training_step(images, torch.arange(8), 1, gen(1))
    assert loss.dim() == 0 and loss.requires_grad and per.shape == (8,) and not per.requires_grad
    torch.testing.assert_close(loss.detach(), per.mean())
    # views: one 2B augmentation call on [x, x]; view 1 = first half
    assert len(fake_aug.simclr_inputs) == 1
    assert torch.equal(fake_aug.simclr_inputs[0], torch.cat([images, images]))
    assert not fake_aug.boosted_calls
    views = m.make_views(images, gen(1))
    assert views.shape == (16, 3, 8, 8) and views.dtype == torch.float32
    assert not torch.equal(views[:8], views[8:])  # independent views
    z1, z2 = m.net(views).chunk(2)                # both views in one forward, as the reference does
    torch.testing.assert_close(per, nt_xent_per_sample(z1, z2, 0.2).detach())
    loss.backward()
    assert all(p.grad is not None for p in m.net.parameters())


# ---------------------------------------------------------------------------------------- SDCLR
def two_pass_sdclr(net, views, t=0.2):
    """The reference procedure: pruned branch run twice, once without grad."""
    v1, v2 = views.chunk(2)
    z1 = net(v1, "dense")
    with torch.no_grad():
        z2_const = net(v2, "pruned")
    loss1 = nt_xent_per_sample(z1, z2_const, t).mean()
    loss1.backward()
    z2 = net(v2, "pruned")
    loss2 = nt_xent_per_sample(z1.detach(), z2, t).mean()
    loss2.backward()
    return loss1.detach() + loss2.detach()


def grads(net):
    return {n: p.grad.clone() if p.grad is not None else None for n, p in net.named_parameters()}


def test_sdclr_fused_step_equals_two_pass(fake_aug, images):
    torch.manual_seed(0)
    m = build_method("sdclr", num_samples=8)
    m.on_epoch_start(1)
    assert all(0 < c.mask.sum() < c.mask.numel() for c in m.net.masked_convs())
    views = m.make_views(images, gen(2))
    ref_net = copy.deepcopy(m.net)

    m.net.zero_grad()
    loss, per = m.loss_from_views(views)
    loss.backward()
    fused = grads(m.net)

    ref_loss = two_pass_sdclr(ref_net, views)
    ref = grads(ref_net)
    torch.testing.assert_close(loss.detach(), ref_loss)
    for name in ref:
        if ref[name] is None:
            assert fused[name] is None, name
        else:
            torch.testing.assert_close(fused[name], ref[name], rtol=1e-4, atol=1e-6, msg=name)
    # dense BN copies get gradient only from term 1, pruned ones only from term 2: both present
    assert fused["backbone.bn1.dense.weight"] is not None and fused["backbone.bn1.pruned.weight"] is not None
    # the per-sample loss BCL tracks is the first (dense-trained) term
    with torch.no_grad():
        z1, z2 = ref_net(views[:8], "dense"), ref_net(views[8:], "pruned")
    torch.testing.assert_close(per, nt_xent_per_sample(z1, z2))

    # sensitivity: dropping the stop-gradients changes the gradients
    bad = copy.deepcopy(ref_net)
    bad.zero_grad()
    bz1, bz2 = bad(views[:8], "dense"), bad(views[8:], "pruned")
    (2 * nt_xent_per_sample(bz1, bz2).mean()).backward()
    assert not torch.allclose(bad.backbone.conv1.weight.grad, ref["backbone.conv1.weight"], rtol=1e-3)


def test_sdclr_recomputes_masks_each_epoch(fake_aug):
    torch.manual_seed(0)
    m = build_method("sdclr", num_samples=8)
    n = sum(c.weight.numel() for c in m.net.masked_convs())
    m.on_epoch_start(1)
    first = {k: v.clone() for k, v in m.net.state_dict().items() if k.endswith(".mask")}
    assert len(first) == 20
    kept = sum(int(v.sum()) for v in first.values())
    assert abs(kept - n / 10) < 3
    with torch.no_grad():  # now the largest weights of the net
        w = m.net.backbone.layer1[0].conv1.weight
        w.add_(10 * torch.where(w < 0, -1.0, 1.0))
    m.on_epoch_start(2)
    assert torch.all(m.net.backbone.layer1[0].conv1.mask == 1)
    assert not torch.equal(first["backbone.layer1.0.conv1.mask"], m.net.backbone.layer1[0].conv1.mask)
    assert m.state_dict() == {}  # masks live in the network's buffers
    assert all(k in m.net.state_dict() for k in first)


# ---------------------------------------------------------------------------------------- BCL memory
def test_memory_weights_hand_values():
    # s = 1..4: z = (s - 2.5) / sqrt(5/3), max|z| = 1.5 / sqrt(5/3) -> w = (s - 2.5) / 3 + 1/2
    torch.testing.assert_close(memory_weights(torch.tensor([1.0, 2.0, 3.0, 4.0])),
                               torch.tensor([0.0, 1 / 3, 2 / 3, 1.0]))
    # s = (0, 0, 0, 4): mean 1, z proportional to (-1, -1, -1, 3) -> w = (1/3, 1/3, 1/3, 1)
    torch.testing.assert_close(memory_weights(torch.tensor([0.0, 0.0, 0.0, 4.0])),
                               torch.tensor([1 / 3, 1 / 3, 1 / 3, 1.0]))
    # a negative outlier: (-3, 1, 1, 1) -> w = (0, 2/3, 2/3, 2/3)
    torch.testing.assert_close(memory_weights(torch.tensor([-3.0, 1.0, 1.0, 1.0])),
                               torch.tensor([0.0, 2 / 3, 2 / 3, 2 / 3]))
    # constant memory: no information, every weight 1/2 (not NaN)
    torch.testing.assert_close(memory_weights(torch.full((5,), 2.0)), torch.full((5,), 0.5))


def fixed_loss(m: BCL, monkeypatch, values):
    """Make the wrapped method return the given per-sample losses, in call order."""
    queue = [torch.tensor(v) for v in values]

    def loss_from_views(views):
        per = queue.pop(0)
        assert views.shape[0] == 2 * per.shape[0]
        return per.mean().requires_grad_(), per

    monkeypatch.setattr(m.base, "loss_from_views", loss_from_views)


def test_bcl_momentum_memory(fake_aug, monkeypatch):
    m = build_method("bcl-i", num_samples=6)
    fixed_loss(m, monkeypatch, [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [10.0, 20.0], [30.0, 40.0, 50.0, 60.0]])
    img = torch.zeros(4, 3, 32, 32, dtype=torch.uint8)
    # epoch 1: s_i = l_i
    m.training_step(img[:3], torch.tensor([3, 0, 5]), 1, gen())
    m.training_step(img[:3], torch.tensor([1, 2, 4]), 1, gen())
    torch.testing.assert_close(m.s, torch.tensor([2.0, 4.0, 5.0, 1.0, 6.0, 3.0]))
    assert m.seen.all()
    stats = m.on_epoch_end(1)
    s = np.array([2.0, 4.0, 5.0, 1.0, 6.0, 3.0])
    z = (s - s.mean()) / s.std(ddof=1)
    w = z / np.abs(z).max() / 2 + 0.5
    torch.testing.assert_close(m.w, torch.tensor(w, dtype=torch.float32))
    assert set(stats) == {"w_mean", "w_q10", "w_q25", "w_q50", "w_q75", "w_q90"}
    assert stats["w_mean"] == pytest.approx(w.mean(), abs=1e-6)
    for q in (10, 25, 50, 75, 90):
        assert stats[f"w_q{q}"] == pytest.approx(np.quantile(w, q / 100), abs=1e-6)
    # epoch 2: s_i = 0.03 l_i + 0.97 s_i, only for the samples of the batch
    m.training_step(img[:2], torch.tensor([0, 1]), 2, gen())
    expected = torch.tensor([0.03 * 10 + 0.97 * 2, 0.03 * 20 + 0.97 * 4, 5.0, 1.0, 6.0, 3.0])
    torch.testing.assert_close(m.s, expected)
    m.training_step(img, torch.tensor([5, 4, 3, 2]), 2, gen())
    expected[2:] = torch.tensor([0.03 * 60 + 0.97 * 5, 0.03 * 50 + 0.97 * 1,
                                 0.03 * 40 + 0.97 * 6, 0.03 * 30 + 0.97 * 3])
    torch.testing.assert_close(m.s, expected)


def test_bcl_first_sighting_sets_memory_even_after_epoch_1(fake_aug, monkeypatch):
    m = build_method("bcl-i", num_samples=3)
    fixed_loss(m, monkeypatch, [[1.0], [2.0, 3.0]])
    img = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    m.training_step(img[:1], torch.tensor([0]), 1, gen())
    m.training_step(img, torch.tensor([0, 2]), 2, gen())  # sample 2 unseen so far: s = l, no decay to 0
    torch.testing.assert_close(m.s, torch.tensor([0.03 * 2 + 0.97 * 1, 0.0, 3.0]))


def test_bcl_epoch1_applies_no_boosted_ops(fake_aug, images):
    for name in ("bcl-i", "bcl-d"):
        m = build_method(name, num_samples=8)
        m.w.fill_(0.9)  # even with weights present (e.g. loaded), epoch 1 runs with w = 0
        m.training_step(images, torch.arange(8), 1, gen())
        assert all(torch.all(c["weight"] == 0) for c in fake_aug.boosted_calls), name
        fake_aug.boosted_calls.clear()


def test_bcl_i_boosted_step(fake_aug, images):
    m = build_method("bcl-i", num_samples=8)
    w = torch.linspace(0, 1, 8)
    m.w.copy_(w)
    idx = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0])
    m.training_step(images, idx, 2, gen())
    (call,) = fake_aug.boosted_calls
    assert call["k"] == 1
    torch.testing.assert_close(call["weight"], w[idx].repeat(2))
    torch.testing.assert_close(call["magnitude"], (10 + 20 * w[idx]).repeat(2))
    # boosted ops run after the SimCLR augmentation, on both views (view 1 first)
    assert call["x"].shape == (16, 3, 8, 8)
    assert len(fake_aug.simclr_inputs) == 1


def test_bcl_d_shared_random_magnitude(fake_aug, images):
    m = build_method("bcl-d", num_samples=8)
    w = torch.linspace(0.2, 1, 8)
    m.w.copy_(w)
    idx = torch.arange(8)
    m.training_step(images, idx, 2, gen(5))
    m.training_step(images, idx, 3, gen(6))
    first, second = fake_aug.boosted_calls
    assert first["k"] == 2
    torch.testing.assert_close(first["weight"], w.repeat(2))
    for call in (first, second):
        mag = call["magnitude"]
        torch.testing.assert_close(mag[:8], mag[8:])              # one u per sample, both views
        u = (mag[:8] - 5) / (25 * w)
        assert torch.all((u >= 0) & (u <= 1))                     # m = 5 + 25 w u, u in [0, 1]
        assert u.unique().numel() == 8                            # independent across samples
        assert call["x"].shape == (16, 3, 8, 8)
    assert not torch.allclose(first["magnitude"], second["magnitude"])  # u redrawn each epoch
    # and u comes from the training generator: same seed, same magnitudes
    fake_aug.boosted_calls.clear()
    m.training_step(images, idx, 2, gen(5))
    torch.testing.assert_close(fake_aug.boosted_calls[0]["magnitude"], first["magnitude"])


def test_bcl_d_step_is_sdclr_step(fake_aug, images):
    torch.manual_seed(0)
    m = build_method("bcl-d", num_samples=8)
    m.on_epoch_start(1)
    assert all(c.mask.sum() < c.mask.numel() for c in m.net.masked_convs())  # pruning delegated
    loss, per = m.training_step(images, torch.arange(8), 1, gen(3))
    views = m.make_views(images, gen(3))
    ref_loss, ref_per = SDCLR.loss_from_views(m.base, views)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(m.s, ref_per)


# ---------------------------------------------------------------------------------------- state
def test_bcl_state_dict_round_trip(fake_aug, monkeypatch):
    a = build_method("bcl-d", num_samples=5)
    fixed_loss(a, monkeypatch, [[0.5, 1.5, 2.5, 3.5, 4.0]])
    a.training_step(torch.zeros(5, 3, 32, 32, dtype=torch.uint8), torch.tensor([4, 3, 2, 1, 0]), 1, gen())
    a.on_epoch_end(1)
    state = a.state_dict()
    assert set(state) >= {"s", "w", "seen"}
    saved = {k: v.clone() for k, v in state.items() if torch.is_tensor(v)}
    a.s.add_(1)  # the returned state is a snapshot, not a view of live buffers
    assert torch.equal(state["s"], saved["s"])

    b = build_method("bcl-d", num_samples=5)
    b.load_state_dict(state)
    for key in ("s", "w", "seen"):
        assert torch.equal(getattr(b, key), saved[key]), key
    assert b.seen.dtype == torch.bool and b.seen.all()
    # network state, masks included, round-trips through the net's own state_dict
    a.on_epoch_start(1)
    b.net.load_state_dict(a.net.state_dict())
    for ca, cb in zip(a.net.masked_convs(), b.net.masked_convs()):
        assert torch.equal(ca.mask, cb.mask)
    for name in ("simclr", "sdclr"):
        m = build_method(name, num_samples=5)
        m.load_state_dict(m.state_dict())


# ---------------------------------------------------------------------------------------- precision / real pipeline
def test_loss_fp32_under_bf16_autocast(fake_aug, images):
    m = build_method("sdclr", num_samples=8)
    m.on_epoch_start(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, per = m.training_step(images, torch.arange(8), 1, gen())
    assert loss.dtype == torch.float32 and per.dtype == torch.float32
    loss.backward()


@pytest.mark.skipif(not REAL_AUGMENT, reason="methods/augment.py not available yet")
@pytest.mark.parametrize("name", ["bcl-i", "bcl-d"])  # their steps run the SimCLR / SDCLR ones
def test_real_augmentation_smoke(name, images32):
    m = build_method(name, num_samples=4)
    m.w.copy_(torch.linspace(0, 1, 4))
    m.on_epoch_start(2)
    loss, per = m.training_step(images32, torch.arange(4), 2, gen(7))
    assert torch.isfinite(loss) and per.shape == (4,)
    loss.backward()


def test_compiled_two_branch_step_equals_eager(fake_aug, images):
    """Method.compile keeps the branch argument and the masks: one SDCLR step (dense + pruned
    graphs) gives the eager loss and gradients bit for bit (aot_eager: the graph capture without
    inductor's code generation, which CPU CI cannot afford)."""
    def step(compiled: bool):
        torch.manual_seed(0)
        m = build_method("sdclr", MethodConfig(name="sdclr", batch_size=8), num_samples=8)
        m.on_epoch_start(1)
        if compiled:
            m.compile(backend="aot_eager")
        loss, per_sample = m.training_step(images, torch.arange(8), 1, gen())
        loss.backward()
        return loss, per_sample, [p.grad for p in m.net.parameters()]

    eager, compiled = step(False), step(True)
    assert torch.equal(eager[0], compiled[0]) and torch.equal(eager[1], compiled[1])
    assert all(torch.equal(a, b) for a, b in zip(eager[2], compiled[2]))
