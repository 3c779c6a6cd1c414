"""BCL: boosted contrastive learning, a wrapper around a base method (SPEC sections 5, 6).

For every pretraining sample i it keeps a momentum loss s_i (first sighting: s_i = l_i,
then s_i = (1 - beta) l_i + beta s_i). At the end of each epoch the standardised memory
becomes a weight w_i in [0, 1] (high loss = poorly memorised = tail-like = large w),
which sets both the probability and the magnitude of the boosted RandAugment ops in the
next epoch. Epoch 1 runs with w = 0, i.e. no boosted ops: the step is skipped outright.

BCL-I = BCL(SimCLR), k = 1, m = 10 + 20 w.
BCL-D = BCL(SDCLR),  k = 2, m = 5 + 25 w u, u ~ U(0, 1) per sample per epoch, shared by the two views.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.profiler import record_function

from methods.base import Method, MethodConfig
from methods.sdclr import SDCLR
from methods.simclr import SimCLR

QUANTILES = (0.10, 0.25, 0.50, 0.75, 0.90)


def memory_weights(s: Tensor) -> Tensor:
    """w = z / max|z| / 2 + 1/2 with z = (s - mean) / std (unbiased); w = 1/2 if s is constant."""
    z = (s - s.mean()) / s.std().clamp_min(torch.finfo(s.dtype).tiny)
    return z / z.abs().max().clamp_min(torch.finfo(s.dtype).tiny) / 2 + 0.5


class BCL(Method):
    base_cls: type[Method]

    def __init__(self, cfg: MethodConfig, num_samples: int, device):
        if num_samples <= 0:
            raise ValueError("BCL needs num_samples, the size of the pretraining split")
        self.cfg = cfg
        self.num_samples = int(num_samples)
        self.device = torch.device(device)
        self.base = self.base_cls(cfg, num_samples, device)
        self.net = self.base.net
        self.s = torch.zeros(num_samples, device=self.device)        # momentum loss
        self.w = torch.zeros(num_samples, device=self.device)        # weights for the next epoch
        self.seen = torch.zeros(num_samples, dtype=torch.bool, device=self.device)

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
            return self.make_views(images, generator)
        with record_function("harness/boosted-params"):
            w = self.w[indices]  # w changes only at the end of an epoch
            m = self.magnitude(w, generator)
        return self.make_views(images, generator, w, m, self.cfg.bcl_k)

    def step_loss(self, views: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
        with record_function("harness/forward+loss"):
            loss, per_sample = self.base.loss_from_views(views)
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

    @record_function("harness/bcl-weights")
    def on_epoch_end(self, epoch: int) -> dict[str, float]:
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

    def compile(self, **kwargs) -> "BCL":
        self.base.compile(**kwargs)
        return self


class BCLI(BCL):
    name = "bcl-i"
    base_cls = SimCLR


class BCLD(BCL):
    name = "bcl-d"
    base_cls = SDCLR
