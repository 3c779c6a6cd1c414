"""NT-Xent with per-sample values (SPEC section 4)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


def nt_xent_per_sample(z1: Tensor, z2: Tensor, temperature: float = 0.2) -> Tensor:
    """Per-sample NT-Xent, shape (B,), computed in fp32 (fp64 if given fp64).

    z1, z2: (B, D) projections of the two views (row i of each is the same image).
    For anchor z1_i the positive is z2_i and the negatives are the other 2B - 2
    vectors of both views; the loss is -log softmax over {positive} + negatives,
    i.e. logsumexp over every vector but the anchor itself minus the positive logit.
    Sample i's loss is the mean of its two anchors' losses (z1_i and z2_i).

    Stop-gradient variants (SDCLR) work by passing a detached z1 or z2.
    """
    # autocast off and at least fp32 (fp64 stays fp64): bf16 logits / t would distort exp
    with torch.autocast(device_type=z1.device.type, enabled=False):
        b = z1.shape[0]
        z = torch.cat([z1, z2])
        z = F.normalize(z.to(torch.promote_types(z.dtype, torch.float32)), dim=1)
        logits = z @ z.t() / temperature
        self_mask = torch.eye(2 * b, dtype=torch.bool, device=z.device)
        logits = logits.masked_fill(self_mask, float("-inf"))
        pos = torch.arange(2 * b, device=z.device).roll(b)  # i <-> i + B
        per_anchor = torch.logsumexp(logits, dim=1) - logits.gather(1, pos[:, None]).squeeze(1)
        return 0.5 * (per_anchor[:b] + per_anchor[b:])


class NTXent(nn.Module):
    """NT-Xent loss module: returns (batch-mean loss, per-sample losses (B,))."""

    def __init__(self, temperature: float = 0.2):
        super().__init__()
        self.temperature = temperature

    def forward(self, z1: Tensor, z2: Tensor) -> tuple[Tensor, Tensor]:
        per_sample = nt_xent_per_sample(z1, z2, self.temperature)
        return per_sample.mean(), per_sample

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"
