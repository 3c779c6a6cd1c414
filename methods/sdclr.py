"""SDCLR: dense branch vs. its 90%-pruned self, with stop-gradients (SPEC section 5).

The reference runs the pruned branch twice (once without grad for the first term,
once with grad for the second). One pass with grad plus detaches gives the same
gradients: the first term only reaches the dense branch, the second only the pruned.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor
from torch.profiler import record_function

from methods.base import Method, MethodConfig, finite, in_unit
from methods.losses import nt_xent_per_sample
from methods.pruning import global_magnitude_prune
from methods.registry import register_method


@dataclass
class SDCLRConfig(MethodConfig):
    weight_decay: float = 1e-4
    temperature: float = 0.2
    prune_ratio: float = 0.9

    CHECKS = (("temperature", lambda v: finite(v) and v > 0, "a finite number > 0"),
             ("prune_ratio", in_unit(), "in [0, 1)"))


@register_method
class SDCLR(Method):
    name = "sdclr"
    display_name = "SDCLR"
    config_cls = SDCLRConfig
    paper = True
    row = 20
    two_branch = True  # dense and pruned branches share every conv and linear weight

    @record_function("harness/prune")
    def on_epoch_start(self, epoch: int) -> None:
        global_magnitude_prune(self.net, self.cfg.prune_ratio)

    def loss_from_views(self, views: Tensor) -> tuple[Tensor, Tensor]:
        v1, v2 = views.chunk(2)
        z1 = self.forward(v1, "dense")
        z2 = self.forward(v2, "pruned")
        t = self.cfg.temperature
        dense_term = nt_xent_per_sample(z1, z2.detach(), t)   # trains the dense branch
        pruned_term = nt_xent_per_sample(z1.detach(), z2, t)  # trains the pruned branch
        # BCL tracks the dense term (equal in value to the pruned one, which differs only in gradient)
        return dense_term.mean() + pruned_term.mean(), dense_term.detach()
