"""SimCLR: both views through one network, NT-Xent (SPEC section 5)."""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from methods.base import Method, MethodConfig, finite
from methods.losses import nt_xent_per_sample
from methods.registry import register_method


@dataclass
class SimCLRConfig(MethodConfig):
    weight_decay: float = 5e-4
    temperature: float = 0.2

    CHECKS = (("temperature", lambda v: finite(v) and v > 0, "a finite number > 0"),)


@register_method
class SimCLR(Method):
    name = "simclr"
    display_name = "SimCLR"
    config_cls = SimCLRConfig
    paper = True
    row = 10

    def loss_from_views(self, views: Tensor) -> tuple[Tensor, Tensor]:
        # one 2B forward: BN statistics are shared by both views, as in the reference
        z1, z2 = self.forward(views).chunk(2)
        per_sample = nt_xent_per_sample(z1, z2, self.cfg.temperature)
        return per_sample.mean(), per_sample.detach()
