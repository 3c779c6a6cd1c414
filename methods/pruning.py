"""Global magnitude pruning of all conv weights together (SDCLR, SPEC section 5).

The rule, exactly as specified: over the n conv weights of the whole network
(stem conv and 1x1 shortcut convs included, linear layers excluded), let
k = ceil(ratio * n) and t = the k-th smallest |w| (1-based); keep every weight with
|w| >= t. Without ties that keeps n - k + 1 weights (= ceil(0.1 n) for ratio 0.9
unless 10 divides n, when it is n/10 + 1); ties at t are all kept, so ties can keep
more. Everything stays on the device (no host sort, no sync).
"""
from __future__ import annotations

from fractions import Fraction

import torch
from torch import Tensor

from methods.models import ContrastiveNet


def prune_k(n: int, ratio: float) -> int:
    """k = ceil(ratio * n) in exact arithmetic (0.9 * 10 is 9.000000000000002 in floats)."""
    r = Fraction(str(ratio))
    return max(1, -(-n * r.numerator // r.denominator))


def kth_smallest(x: Tensor, k: int) -> Tensor:
    """The k-th smallest value (1-based) of a 1-D tensor, as a 0-d tensor on its device.

    On CUDA one slice of 11M values is slow for kthvalue's single-slice radix select
    (~72 ms per epoch on an H200); a full device radix sort gives the same value and
    should take a few ms (not yet re-measured: see `harness bench`)."""
    if x.is_cuda:
        return torch.sort(x).values[k - 1]
    return torch.kthvalue(x, k).values


@torch.no_grad()
def global_magnitude_prune(net: ContrastiveNet, ratio: float = 0.9) -> Tensor:
    """Recompute every ``MaskedConv2d.mask`` in place; returns the threshold (0-d tensor, on device)."""
    convs = net.masked_convs()
    if not convs:
        raise ValueError("network has no MaskedConv2d layers (build it with two_branch=True)")
    mags = torch.cat([m.weight.detach().abs().flatten().float() for m in convs])
    threshold = kth_smallest(mags, prune_k(mags.numel(), ratio))
    for m in convs:
        m.mask.copy_(m.weight.abs() >= threshold)
    return threshold
