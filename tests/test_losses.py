"""NT-Xent per-sample values against a literal, loop-based reading of SPEC section 4."""
from __future__ import annotations

import math

import pytest
import torch

from methods.losses import NTXent, nt_xent_per_sample


def reference_per_sample(z1: torch.Tensor, z2: torch.Tensor, t: float) -> list[float]:
    """Loops over anchors and negatives, in Python floats (double precision)."""
    b = z1.shape[0]
    unit = lambda v: [x / math.sqrt(sum(y * y for y in v)) for x in v]
    views = [[unit(r.tolist()) for r in z1], [unit(r.tolist()) for r in z2]]
    dot = lambda u, v: sum(x * y for x, y in zip(u, v))

    def anchor_loss(view: int, i: int) -> float:
        a, pos = views[view][i], views[1 - view][i]
        num = math.exp(dot(a, pos) / t)
        neg = 0.0
        for v in (0, 1):
            for k in range(b):
                if (v, k) in ((view, i), (1 - view, i)):
                    continue  # not itself, not its positive: 2B - 2 negatives
                neg += math.exp(dot(a, views[v][k]) / t)
        return -math.log(num / (num + neg))

    return [(anchor_loss(0, i) + anchor_loss(1, i)) / 2 for i in range(b)]


@pytest.mark.parametrize("b", [1, 2, 3, 8, 17])
@pytest.mark.parametrize("t", [0.2, 0.5])
def test_matches_loop_reference(b, t):
    g = torch.Generator().manual_seed(b * 100 + int(t * 10))
    z1 = torch.randn(b, 16, generator=g, dtype=torch.float64) * 3
    z2 = torch.randn(b, 16, generator=g, dtype=torch.float64)
    got = nt_xent_per_sample(z1, z2, t)
    assert got.shape == (b,) and got.dtype == torch.float64
    torch.testing.assert_close(got, torch.tensor(reference_per_sample(z1, z2, t), dtype=torch.float64),
                               rtol=1e-10, atol=1e-10)
    # fp32 inputs: same values to fp32 accuracy
    got32 = nt_xent_per_sample(z1.float(), z2.float(), t)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), got, rtol=1e-5, atol=1e-5)


def test_default_temperature_is_0_2():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(2, 6, 8, generator=g, dtype=torch.float64)
    torch.testing.assert_close(nt_xent_per_sample(z1, z2),
                               torch.tensor(reference_per_sample(z1, z2, 0.2), dtype=torch.float64))


def test_module_returns_mean_and_per_sample():
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(2, 5, 128, generator=g)
    loss, per = NTXent(0.2)(z1, z2)
    assert loss.dim() == 0 and per.shape == (5,)
    torch.testing.assert_close(loss, per.mean())


def test_normalised_and_symmetric():
    g = torch.Generator().manual_seed(2)
    z1, z2 = torch.randn(2, 7, 32, generator=g, dtype=torch.float64)
    base = nt_xent_per_sample(z1, z2)
    torch.testing.assert_close(nt_xent_per_sample(5 * z1, 0.1 * z2), base)  # scale-free
    torch.testing.assert_close(nt_xent_per_sample(z2, z1), base)            # mean of both anchors
    perm = torch.randperm(7, generator=g)
    torch.testing.assert_close(nt_xent_per_sample(z1[perm], z2[perm]), base[perm])


def test_fp32_under_bf16_autocast():
    g = torch.Generator().manual_seed(3)
    z1, z2 = torch.randn(2, 64, 128, generator=g)
    z1b, z2b = z1.bfloat16(), z2.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = nt_xent_per_sample(z1b, z2b)
    assert got.dtype == torch.float32
    # the same numbers as an fp32 computation on the (bf16-valued) inputs, not a bf16 one
    torch.testing.assert_close(got, nt_xent_per_sample(z1b.float(), z2b.float()), rtol=1e-6, atol=1e-6)


def test_stable_at_small_temperature():
    z = torch.randn(4, 8)
    per = nt_xent_per_sample(z, z + 1e-3 * torch.randn(4, 8), temperature=0.001)
    assert torch.isfinite(per).all()


def test_stop_gradient_forms():
    g = torch.Generator().manual_seed(4)
    z1 = torch.randn(6, 16, generator=g, requires_grad=True)
    z2 = torch.randn(6, 16, generator=g, requires_grad=True)
    a = nt_xent_per_sample(z1, z2.detach())
    b = nt_xent_per_sample(z1.detach(), z2)
    torch.testing.assert_close(a, b)  # same value, different gradient paths
    (a.mean() + b.mean()).backward()
    g1, g2 = z1.grad.clone(), z2.grad.clone()
    z1.grad = z2.grad = None
    nt_xent_per_sample(z1, z2).mean().backward()
    # each stop-gradient term delivers exactly the full loss's gradient to its own side
    torch.testing.assert_close(g1, z1.grad)
    torch.testing.assert_close(g2, z2.grad)
