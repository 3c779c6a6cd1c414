"""SimCLR: both views through one network, NT-Xent (SPEC section 5)."""
from __future__ import annotations

from torch import Tensor

from methods.base import Method
from methods.losses import nt_xent_per_sample


class SimCLR(Method):
    name = "simclr"

    def loss_from_views(self, views: Tensor) -> tuple[Tensor, Tensor]:
        # one 2B forward: BN statistics are shared by both views, as in the reference
        z1, z2 = self.forward(views).chunk(2)
        per_sample = nt_xent_per_sample(z1, z2, self.cfg.temperature)
        return per_sample.mean(), per_sample.detach()
