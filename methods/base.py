"""Shared base for the four pretraining methods, their configs and the factory.

A method owns its network (``net``, every parameter of which the optimizer trains)
and any state beyond it; the training loop (harness/train.py) owns the optimizer,
schedule, data order and autocast, and calls, per epoch::

    method.on_epoch_start(epoch)
    for images, indices in batches:            # uint8 (B,3,32,32) on device, positions in the split
        loss, per_sample = method.training_step(images, indices, epoch, generator)
        loss.backward(); ...
    stats = method.on_epoch_end(epoch)

``training_step`` is ``step_loss(step_views(...))``; the loop calls the halves apart so that
the next batch's augmentation (which depends only on the generator and on state that is
fixed within an epoch) runs on a side stream while this batch trains.

Each phase runs inside a ``record_function("harness/<phase>")`` range, so a
``torch.profiler`` trace (``harness bench --profile``) attributes host and device time
to augment / boosted-augment / forward+loss / backward / optimizer / prune / bcl-*.

A base method splits its step into ``make_views`` (augmentation, two views stacked
into one 2B batch: view 1 = first half) and ``loss_from_views`` (forward + loss),
so BCL can wrap it and swap in boosted augmentation without touching the forward.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.profiler import record_function

from methods import augment
from methods.models import ContrastiveNet, build_network

METHODS = ("simclr", "sdclr", "bcl-i", "bcl-d")


@dataclass
class MethodConfig:
    """Pretraining hyper-parameters; ``default_config(name)`` gives the paper's values (SPEC 5, 6)."""
    name: str = "simclr"
    batch_size: int = 512
    epochs: int = 2000
    lr: float = 0.5
    final_lr: float = 1e-6
    momentum: float = 0.9
    weight_decay: float = 5e-4          # on all parameters
    warmup_epochs: int = 10
    temperature: float = 0.2
    seed: int = 10
    width: int = 64                     # ResNet-18 stem channels (paper: 64); narrower for tests / CPU tries
    # SDCLR / BCL-D
    prune_ratio: float = 0.9
    # BCL
    bcl_beta: float = 0.97              # momentum of the per-sample loss memory
    bcl_k: int = 1                      # RandAugment ops per view
    bcl_min_magnitude: float = 10.0     # m at w = 0
    bcl_max_magnitude: float = 30.0     # m at w = 1 (and u = 1)
    bcl_random_magnitude: bool = False  # BCL-D: m scaled by u ~ U(0, 1) per sample per epoch

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def default_config(name: str) -> MethodConfig:
    name = name.lower()
    if name == "simclr":
        return MethodConfig(name=name, weight_decay=5e-4)
    if name == "sdclr":
        return MethodConfig(name=name, weight_decay=1e-4)
    if name == "bcl-i":
        return MethodConfig(name=name, weight_decay=5e-4, bcl_k=1, bcl_min_magnitude=10.0)
    if name == "bcl-d":
        return MethodConfig(name=name, weight_decay=1e-4, bcl_k=2, bcl_min_magnitude=5.0,
                            bcl_random_magnitude=True)
    raise ValueError(f"unknown method {name!r}; expected one of {', '.join(METHODS)}")


class Method:
    name: str = "base"
    net: ContrastiveNet

    def __init__(self, cfg: MethodConfig, num_samples: int, device):
        self.cfg = cfg
        self.num_samples = int(num_samples)
        self.device = torch.device(device)
        self.net = build_network(self.name, cfg.width).to(self.device)
        self._forward = self.net  # replaced by a compiled wrapper in compile(); shares parameters

    # ---- hooks called by the training loop -------------------------------------------
    def on_epoch_start(self, epoch: int) -> None:
        pass

    def training_step(self, images: Tensor, indices: Tensor, epoch: int,
                      generator: torch.Generator) -> tuple[Tensor, Tensor]:
        return self.step_loss(self.step_views(images, indices, epoch, generator), indices)

    # the two halves of a step; the loop calls them apart to augment the next batch early
    def step_views(self, images: Tensor, indices: Tensor, epoch: int, generator: torch.Generator) -> Tensor:
        """The augmented views of a batch: uses only the generator and state fixed for the epoch."""
        return self.make_views(images, generator)

    def step_loss(self, views: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
        with record_function("harness/forward+loss"):
            return self.loss_from_views(views)

    def on_epoch_end(self, epoch: int) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, d: dict) -> None:
        pass

    # ---- building blocks -----------------------------------------------------------------
    def make_views(self, images: Tensor, generator: torch.Generator,
                   weight: Tensor | None = None, magnitude: Tensor | None = None,
                   k: int = 0) -> Tensor:
        """uint8 (B,3,32,32) -> float (2B,3,32,32) in [0,1]: two independent views, view 1 first.

        Both views go through the augmentation in one 2B call; with ``weight`` given,
        the boosted RandAugment step follows (per-sample weight and magnitude, the
        same for both views of a sample).
        """
        with record_function("harness/augment"):
            x = augment.simclr_augment(torch.cat([images, images]), generator)
        if weight is not None:
            with record_function("harness/boosted-augment"):
                x = augment.boosted_randaugment(x, weight.repeat(2), magnitude.repeat(2), k, generator)
        return augment.to_unit_float(x)

    def loss_from_views(self, views: Tensor) -> tuple[Tensor, Tensor]:
        """(2B,...) views -> (scalar loss, detached per-sample loss (B,))."""
        raise NotImplementedError

    def forward(self, x: Tensor, branch: str = "dense") -> Tensor:
        return self._forward(x, branch)

    def compile(self, **kwargs) -> "Method":
        """Compile the network's forward and backward (the loss stays eager, in fp32); ``net`` itself
        is untouched. Shapes are static: one graph per (branch, batch size), so the last, smaller
        batch of an epoch gets its own graph instead of a slower dynamic-shape one."""
        self._forward = torch.compile(self.net, **{"dynamic": False, **kwargs})
        return self


def build_method(name: str, cfg: MethodConfig | None = None, num_samples: int = 0,
                 device="cpu") -> Method:
    """``name`` in {"simclr", "sdclr", "bcl-i", "bcl-d"}; ``cfg`` defaults to ``default_config(name)``."""
    from methods.bcl import BCLD, BCLI
    from methods.sdclr import SDCLR
    from methods.simclr import SimCLR

    name = name.lower()
    classes = {"simclr": SimCLR, "sdclr": SDCLR, "bcl-i": BCLI, "bcl-d": BCLD}
    if name not in classes:
        raise ValueError(f"unknown method {name!r}; expected one of {', '.join(METHODS)}")
    return classes[name](cfg if cfg is not None else default_config(name), num_samples, device)
