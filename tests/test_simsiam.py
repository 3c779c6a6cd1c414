"""SimSiam: negative cosine with stop-gradient, two forwards, a trained and checkpointed predictor;
BCL(SimSiam) tracks its per-sample loss."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from methods import registry
from methods.base import build_method, stray_parameters, trained_parameters
from methods.simsiam import SimSiam, SimSiamNet, negative_cosine_per_sample

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(name="simsiam", **kw):
    cfg = registry.get(name).config_cls(name=name, width=4, projection_dim=16, predictor_dim=8, **kw)
    return build_method(name, cfg, num_samples=4)


def test_loss_is_negative_cosine_with_stop_gradient():
    g = torch.Generator().manual_seed(0)
    p1, p2, z1, z2 = (torch.randn(5, 6, generator=g, requires_grad=True) for _ in range(4))
    per = negative_cosine_per_sample(p1, p2, z1, z2)
    expect = -(F.cosine_similarity(p1, z2, dim=1) + F.cosine_similarity(p2, z1, dim=1)) / 2
    torch.testing.assert_close(per, expect)
    assert per.shape == (5,) and torch.all((per >= -1) & (per <= 1))
    per.sum().backward()
    assert z1.grad is None and z2.grad is None  # the projections are targets: no gradient reaches them
    assert p1.grad is not None and p1.grad.abs().sum() > 0
    same = torch.randn(3, 6, generator=g)
    torch.testing.assert_close(negative_cosine_per_sample(same, same, same, same), -torch.ones(3))


def test_step_uses_two_forwards_and_trains_the_predictor(cifar_images):
    torch.manual_seed(0)
    m = tiny()
    assert isinstance(m, SimSiam) and isinstance(m.net, SimSiamNet)
    assert set(m.modules()) == {"net", "predictor"} and m.probed_network() is m.net
    assert stray_parameters(m) == []
    ids = {id(p) for p in trained_parameters(m)}
    assert all(id(p) in ids for p in m.predictor.parameters()) and all(id(p) in ids for p in m.net.parameters())
    views = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ref = copy.deepcopy(m)
    loss, per = m.loss_from_views(views)
    # the reference procedure: each view through the encoder on its own (own BN statistics)
    z1, z2 = ref.net(views[:4]), ref.net(views[4:])
    expect = negative_cosine_per_sample(ref.predictor(z1), ref.predictor(z2), z1, z2)
    torch.testing.assert_close(per, expect.detach())
    joint = ref.predictor(copy.deepcopy(ref.net)(views))
    assert not torch.allclose(joint[:4], ref.predictor(z1))  # one 2B forward would differ
    loss.backward()
    assert all(p.grad is not None for p in m.predictor.parameters())
    assert m.net.features(views).shape == (8, 32)  # the probe reads the backbone: 8 x width features


def test_loss_in_fp32_under_bf16_autocast():
    m = tiny()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, per = m.loss_from_views(torch.rand(8, 3, 32, 32))
    assert loss.dtype == per.dtype == torch.float32


def test_bcl_simsiam_tracks_the_simsiam_loss(cifar_images):
    torch.manual_seed(0)
    m = tiny("bcl-simsiam")
    assert type(m.base) is SimSiam and m.modules()["predictor"] is m.base.predictor
    images = torch.from_numpy(cifar_images[:4].copy())
    loss, per = m.training_step(images, torch.tensor([2, 0, 3, 1]), 1, torch.Generator().manual_seed(0))
    assert torch.all((per >= -1) & (per <= 1))
    torch.testing.assert_close(m.s[torch.tensor([2, 0, 3, 1])], per)
    stats = m.on_epoch_end(1)
    assert 0 <= stats["w_q10"] <= stats["w_q90"] <= 1
