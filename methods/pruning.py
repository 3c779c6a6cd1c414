"""Global magnitude pruning of all conv weights together (SDCLR, SPEC section 5).

The rule, exactly as the authors' code applies it: over the n conv weights of the whole
network (stem conv and 1x1 shortcut convs included, linear layers excluded), sort |w|
ascending, let k = ceil(ratio * n) and t = sorted[k] (0-based, i.e. the (k+1)-th smallest);
keep every weight with |w| >= t. Without ties that keeps n - k weights: 1,115,923 of
ResNet-18's 11,159,232 at ratio 0.9. Ties at t are all kept, so ties can keep more.
Everything stays on the device (no host sort, no sync).
"""
from __future__ import annotations

from fractions import Fraction

import torch
from torch import Tensor

from methods.models import ContrastiveNet


def prune_k(n: int, ratio: float) -> int:
    """k = ceil(ratio * n), the weights dropped when there are no ties, in exact arithmetic
    (0.9 * 10 is 9.000000000000002 in floats)."""
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
    n = mags.numel()
    threshold = kth_smallest(mags, min(prune_k(n, ratio) + 1, n))  # sorted[k], 0-based
    for m in convs:
        m.mask.copy_(m.weight.abs() >= threshold)
    return threshold
