"""BCL: boosted contrastive learning, a wrapper around any registered base method (SPEC sections 5, 6).

For every pretraining sample i it keeps a momentum loss s_i (first sighting: s_i = l_i,
then s_i = (1 - beta) l_i + beta s_i). At the end of each epoch the standardised memory
becomes a weight w_i in [0, 1] (high loss = poorly memorised = tail-like = large w),
which sets both the probability and the magnitude of the boosted RandAugment ops in the
next epoch. Epoch 1 runs with w = 0, i.e. no boosted ops: the step is skipped outright.

The base is built by its own constructor (with its own config class, read from the wrapping's
config) and every hook passes through to it: epoch start and end, the step's views and loss,
its modules, probed network, state and compile. A BCL wrapping of a new base is one file:

    @dataclass
    class BCLXConfig(XConfig, BCLConfig):       # X's recipe and options, then BCL's (X's first,
        ...                                     # so X's values win); the wrapping's own values

    @register_method
    class BCLX(BCL):
        name, display_name, config_cls, base_cls = "bcl-x", "BCL(X)", BCLXConfig, X

BCL-I = BCL(SimCLR), k = 1, m = 10 + 20 w.
BCL-D = BCL(SDCLR),  k = 2, m = 5 + 25 w u, u ~ U(0, 1) per sample per epoch, shared by the two views.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
from torch import Tensor
from torch.profiler import record_function

from methods.base import Method, MethodConfig, count, finite, in_unit
from methods.registry import register_method
from methods.sdclr import SDCLR, SDCLRConfig
from methods.simclr import SimCLR, SimCLRConfig

QUANTILES = (0.10, 0.25, 0.50, 0.75, 0.90)


@dataclass
class BCLConfig(MethodConfig):
    """BCL's own options (mixed into a wrapping's config together with its base's)."""
    bcl_beta: float = 0.97              # momentum of the per-sample loss memory
    bcl_k: int = 1                      # RandAugment ops per view
    bcl_min_magnitude: float = 10.0     # m at w = 0
    bcl_max_magnitude: float = 30.0     # m at w = 1 (and u = 1)
    bcl_random_magnitude: bool = False  # BCL-D: m scaled by u ~ U(0, 1) per sample per epoch

    CHECKS = (
        ("bcl_beta", in_unit(closed_top=True), "in [0, 1]"),
        ("bcl_k", count(0), "an integer from 0 to 2^31"),
        ("bcl_min_magnitude", lambda v: finite(v) and v >= 0, "a finite number >= 0"),
        ("bcl_max_magnitude", lambda v: finite(v) and v >= 0, "a finite number >= 0"),
    )


def memory_weights(s: Tensor) -> Tensor:
    """w = z / max|z| / 2 + 1/2 with z = (s - mean) / std (unbiased); w = 1/2 if s is constant."""
    z = (s - s.mean()) / s.std().clamp_min(torch.finfo(s.dtype).tiny)
    return z / z.abs().max().clamp_min(torch.finfo(s.dtype).tiny) / 2 + 0.5


def base_config(cfg: MethodConfig, base_cls: type[Method]) -> MethodConfig:
    """The base's own config: its fields read from the wrapping's config."""
    fields = {f.name for f in dataclasses.fields(base_cls.config_cls)}
    return base_cls.config_cls(**{**{k: v for k, v in dataclasses.asdict(cfg).items() if k in fields},
                                  "name": base_cls.name})


class BCL(Method):
    base_cls: ClassVar[type[Method]]

    def __init__(self, cfg: MethodConfig, num_samples: int, device):
        if num_samples <= 0:
            raise ValueError("BCL needs num_samples, the size of the pretraining split")
        self.cfg = cfg
        self.num_samples = int(num_samples)
        self.device = torch.device(device)
        self.base = self.base_cls(base_config(cfg, self.base_cls), num_samples, device)
        self.s = torch.zeros(num_samples, device=self.device)        # momentum loss
        self.w = torch.zeros(num_samples, device=self.device)        # weights for the next epoch
        self.seen = torch.zeros(num_samples, dtype=torch.bool, device=self.device)

    # ---- what the base trains, checkpoints and probes ------------------------------------
    @property
    def net(self) -> nn.Module:
        return self.base.net

    @property
    def probed(self) -> str:
        return self.base.probed

    def modules(self) -> dict[str, nn.Module]:
        return self.base.modules()

    def probed_network(self) -> nn.Module:
        return self.base.probed_network()

    # ---- hooks: BCL's part, and the base's ---------------------------------------------
    def on_epoch_start(self, epoch: int) -> None:
        self.base.on_epoch_start(epoch)

    def magnitude(self, w: Tensor, generator: torch.Generator) -> Tensor:
        """Per-sample RandAugment magnitude in [min, max] (BCL-D: one u per sample, drawn here)."""
        cfg = self.cfg
        scale = w
        if cfg.bcl_random_magnitude:
            u = torch.rand(w.shape[0], generator=generator, device=generator.device).to(w.device)
            scale = w * u
        return cfg.bcl_min_magnitude + (cfg.bcl_max_magnitude - cfg.bcl_min_magnitude) * scale

    def step_views(self, images: Tensor, indices: Tensor, epoch: int, generator: torch.Generator) -> Tensor:
        if epoch == 1:  # w = 0: every boosted op has probability 0
            return self.base.step_views(images, indices, epoch, generator)
        with record_function("harness/boosted-params"):
            w = self.w[indices]  # w changes only at the end of an epoch
            m = self.magnitude(w, generator)
        return self.base.make_views(images, generator, w, m, self.cfg.bcl_k)

    def step_loss(self, views: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
        loss, per_sample = self.base.step_loss(views, indices)
        self.update_memory(indices, per_sample)
        return loss, per_sample

    @torch.no_grad()
    @record_function("harness/bcl-memory")
    def update_memory(self, indices: Tensor, per_sample: Tensor) -> None:
        # one gather + one scatter: no per-sample Python loop (indices are unique within an epoch)
        beta = self.cfg.bcl_beta
        l = per_sample.float()
        self.s[indices] = torch.where(self.seen[indices], (1 - beta) * l + beta * self.s[indices], l)
        self.seen[indices] = True

    def on_epoch_end(self, epoch: int) -> dict[str, float]:
        stats = dict(self.base.on_epoch_end(epoch))
        stats.update(self.update_weights())
        return stats

    @record_function("harness/bcl-weights")
    def update_weights(self) -> dict[str, float]:
        self.w = memory_weights(self.s)
        q = torch.quantile(self.w, torch.tensor(QUANTILES, device=self.w.device))
        stats = torch.cat([self.w.mean()[None], q]).tolist()  # one host sync per epoch
        keys = ["w_mean"] + [f"w_q{round(p * 100)}" for p in QUANTILES]
        return dict(zip(keys, stats))

    def state_dict(self) -> dict:
        return {"s": self.s.clone(), "w": self.w.clone(), "seen": self.seen.clone(),
                "base": self.base.state_dict()}

    def load_state_dict(self, d: dict) -> None:
        for key in ("s", "w", "seen"):
            getattr(self, key).copy_(d[key])
        self.base.load_state_dict(d.get("base", {}))

    def loss_from_views(self, views: Tensor) -> tuple[Tensor, Tensor]:
        return self.base.loss_from_views(views)

    def forward(self, x: Tensor, branch: str = "dense") -> Tensor:
        return self.base.forward(x, branch)

    def compile(self, **kwargs) -> "BCL":
        self.base.compile(**kwargs)
        return self


@dataclass
class BCLIConfig(SimCLRConfig, BCLConfig):
    weight_decay: float = 5e-4
    bcl_k: int = 1
    bcl_min_magnitude: float = 10.0


@register_method
class BCLI(BCL):
    name = "bcl-i"
    display_name = "BCL-I"
    config_cls = BCLIConfig
    base_cls = SimCLR
    paper = True


@dataclass
class BCLDConfig(SDCLRConfig, BCLConfig):
    weight_decay: float = 1e-4
    bcl_k: int = 2
    bcl_min_magnitude: float = 5.0
    bcl_random_magnitude: bool = True


@register_method
class BCLD(BCL):
    name = "bcl-d"
    display_name = "BCL-D"
    config_cls = BCLDConfig
    base_cls = SDCLR
    paper = True
