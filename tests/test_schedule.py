"""Per-iteration LR: linear warm-up over 10 epochs' iterations, cosine to 1e-6 at the last one."""
from __future__ import annotations

import math

import pytest

from methods.schedule import lr_at

# the paper's run on split 1: 9,754 images, batch 512 (last partial batch kept) -> 20 iterations/epoch
ITERS_PER_EPOCH = math.ceil(9754 / 512)
T = 2000 * ITERS_PER_EPOCH
W = 10 * ITERS_PER_EPOCH


def test_warmup():
    assert ITERS_PER_EPOCH == 20 and (T, W) == (40_000, 200)
    assert lr_at(1, T, W, 0.5) == pytest.approx(0.5 / 200, rel=1e-12)
    assert lr_at(100, T, W, 0.5) == pytest.approx(0.25, rel=1e-12)
    assert lr_at(W, T, W, 0.5) == pytest.approx(0.5, rel=1e-12)   # end of warm-up: the peak


def test_cosine():
    final = 1e-6
    # one step after the peak: barely below it
    assert lr_at(W + 1, T, W, 0.5) == pytest.approx(final + (0.5 - final) * 0.5 * (1 + math.cos(math.pi / (T - W))), rel=1e-12)
    assert lr_at(W + 1, T, W, 0.5) < 0.5
    # half-way through the cosine: the midpoint of base and final
    mid = W + (T - W) // 2
    assert lr_at(mid, T, W, 0.5) == pytest.approx((0.5 + final) / 2, rel=1e-12)
    # a quarter of the way: final + (base - final) * (1 + cos(pi/4)) / 2
    q = W + (T - W) // 4
    assert lr_at(q, T, W, 0.5) == pytest.approx(final + (0.5 - final) * (1 + math.sqrt(0.5)) / 2, rel=1e-12)
    # last iteration: exactly the final lr
    assert lr_at(T, T, W, 0.5) == pytest.approx(1e-6, rel=1e-9, abs=0)
    assert lr_at(T, T, W, 0.5, final_lr=0.0) == 0.0


def test_monotone_and_bounds():
    lrs = [lr_at(i, 1000, 50, 0.5) for i in range(1, 1001)]
    assert all(a < b for a, b in zip(lrs[:49], lrs[1:50]))
    assert all(a >= b for a, b in zip(lrs[49:], lrs[50:]))
    assert max(lrs) == lrs[49] == pytest.approx(0.5)
    with pytest.raises(ValueError):
        lr_at(0, 1000, 50, 0.5)
    with pytest.raises(ValueError):
        lr_at(1001, 1000, 50, 0.5)


def test_no_warmup():
    assert lr_at(1, 100, 0, 0.5) == pytest.approx(1e-6 + (0.5 - 1e-6) * (1 + math.cos(math.pi / 100)) / 2)
    assert lr_at(100, 100, 0, 0.5) == pytest.approx(1e-6)
