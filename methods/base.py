"""Shared base for the pretraining methods: the recipe every method shares, and the hooks.

A method is one file (methods/<name>.py, or a module of another installed package, see
methods/registry.py) holding a ``Method`` subclass decorated with ``@register_method`` and its
own config dataclass (a ``MethodConfig`` subclass whose defaults are the paper's recipe).

A method owns the modules it trains (``modules()``: the network, heads, anything; the optimizer
trains exactly their parameters and a checkpoint saves exactly their states) and says which of
them the linear probe reads (``probed``). The training loop (harness/train.py) owns the
optimizer, schedule, data order and autocast, and calls, per epoch::

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
import math
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
import torch.nn as nn
from torch import Tensor
from torch.profiler import record_function

from methods import augment
from methods.models import ContrastiveNet


# -- checks of config values: (field, test, what it must be), run before any work --------------
BIG = 2**31  # counts beyond this are typos (and overflow torch's index types)


def finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def count(lo: int) -> Callable[[object], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and lo <= v < BIG


def in_unit(closed_top: bool = False) -> Callable[[object], bool]:
    return lambda v: finite(v) and 0 <= v and (v <= 1 if closed_top else v < 1)


Check = tuple[str, Callable[[object], bool], str]


@dataclass
class MethodConfig:
    """The recipe every method shares (SPEC 5); the training loop reads these fields.

    A method's own options (temperature, pruning ratio, head sizes, ...) are fields of its
    config subclass, in its own file, with the paper's values as defaults; `harness train
    NAME --set option=value` sets them. ``CHECKS`` lists each field's valid range; a subclass
    lists the checks of its own fields in its own ``CHECKS`` (those of its bases apply too)."""
    name: str = ""
    batch_size: int = 512
    epochs: int = 2000
    lr: float = 0.5
    final_lr: float = 1e-6
    momentum: float = 0.9
    weight_decay: float = 5e-4          # on all parameters
    warmup_epochs: int = 10
    seed: int = 10
    width: int = 64                     # ResNet-18 stem channels (paper: 64); narrower for tests / CPU tries

    CHECKS: ClassVar[tuple[Check, ...]] = (
        ("epochs", count(1), "an integer from 1 to 2^31"),
        ("batch_size", count(1), "an integer from 1 to 2^31"),
        ("lr", lambda v: finite(v) and v > 0, "a finite number > 0"),
        ("final_lr", lambda v: finite(v) and v >= 0, "a finite number >= 0"),
        ("weight_decay", lambda v: finite(v) and v >= 0, "a finite number >= 0"),
        ("momentum", in_unit(), "in [0, 1)"),
        ("warmup_epochs", count(0), "an integer from 0 to 2^31"),
        ("width", count(1), "an integer from 1 to 2^31"),
    )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def shared_fields(cls) -> tuple[str, ...]:
        """The fields of the shared recipe (each has its own command-line option)."""
        return tuple(f.name for f in dataclasses.fields(MethodConfig))

    @classmethod
    def own_fields(cls) -> tuple[str, ...]:
        """This method's own options: what `--set name=value` may set."""
        shared = set(MethodConfig.shared_fields())
        return tuple(f.name for f in dataclasses.fields(cls) if f.name not in shared)

    @classmethod
    def checks(cls) -> list[Check]:
        """Every class's CHECKS along the MRO; a field checked by a subclass is checked its way."""
        out: dict[str, Check] = {}
        for klass in cls.__mro__:
            for check in vars(klass).get("CHECKS", ()):
                out.setdefault(check[0], check)
        return list(out.values())

    def problems(self) -> list[tuple[str, object, str]]:
        """(field, value, what it must be) for every value out of its range."""
        return [(name, getattr(self, name), what) for name, ok, what in self.checks()
                if hasattr(self, name) and not ok(getattr(self, name))]


class Method:
    """One pretraining method. Subclasses set the class attributes below (the registry reads
    them) and implement ``loss_from_views``; see the README's "Adding a method"."""
    name: ClassVar[str] = ""                 # command-line and registry name, e.g. "simclr"
    display_name: ClassVar[str] = ""         # the name in reports, e.g. "SimCLR"
    config_cls: ClassVar[type[MethodConfig]] = MethodConfig
    paper: ClassVar[bool] = False            # one of the BCL paper's four methods (published numbers)
    row: ClassVar[int] = 100                 # position of a base method's rows in reports (ties: by name)
    two_branch: ClassVar[bool] = False       # the network has SDCLR's pruned branch
    probed: ClassVar[str] = "net"            # the module of modules() whose features() the probe reads

    net: nn.Module

    def __init__(self, cfg: MethodConfig, num_samples: int, device):
        self.cfg = cfg
        self.num_samples = int(num_samples)
        self.device = torch.device(device)
        self.net = self.build_network().to(self.device)
        self._forward = self.net  # replaced by a compiled wrapper in compile(); shares parameters

    def build_network(self) -> nn.Module:
        """The network (backbone + projection head); ``features(x)`` is what the probe reads."""
        if self.cfg.width < 1:
            raise ValueError(f"network width must be at least 1, got {self.cfg.width}")
        return ContrastiveNet(two_branch=self.two_branch, width=self.cfg.width)

    # ---- what is trained, checkpointed and probed ------------------------------------------
    def modules(self) -> dict[str, nn.Module]:
        """Every module this method trains, by name: the optimizer trains exactly their parameters
        (those that require grad), a checkpoint saves and a resume restores exactly their states.
        A parameter that requires grad and is on the method but in none of these stops the run
        before it starts (it would never be trained nor saved)."""
        return {"net": self.net}

    def probed_network(self) -> nn.Module:
        """The network the linear probe and the kNN monitor read (``features(x, branch="dense")``)."""
        return self.modules()[self.probed]

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
        """State beyond modules() (tensors, plain values), checkpointed and resumed exactly."""
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


def trained_parameters(method: Method) -> list[nn.Parameter]:
    """The parameters the optimizer trains, in modules() order, each once."""
    seen, out = set(), []
    for module in method.modules().values():
        for p in module.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def stray_parameters(method: Method) -> list[str]:
    """Names of parameters that require grad, hang on the method (or on a method it wraps) and are
    in none of its modules(): no optimizer would train them and no checkpoint would save them."""
    covered = {id(p) for m in method.modules().values() for p in m.parameters()}
    out: list[str] = []

    def walk(obj: object, prefix: str, seen: set) -> None:
        for attr, value in vars(obj).items():
            if id(value) in seen:
                continue
            seen.add(id(value))
            if isinstance(value, nn.Module):
                out.extend(f"{prefix}{attr}.{n}" for n, p in value.named_parameters()
                           if p.requires_grad and id(p) not in covered)
            elif isinstance(value, Method):
                walk(value, f"{prefix}{attr}.", seen)

    walk(method, "", set())
    return out


def default_config(name: str) -> MethodConfig:
    """The paper's recipe for method ``name`` (its config class's defaults)."""
    from methods import registry

    return registry.get(name).default_config()


def build_method(name: str, cfg: MethodConfig | None = None, num_samples: int = 0,
                 device="cpu") -> Method:
    """Method ``name`` of the registry; ``cfg`` defaults to ``default_config(name)``. A config of
    another class (e.g. a plain MethodConfig) is read into the method's own config class."""
    from methods import registry

    entry = registry.get(name)
    if cfg is None:
        cfg = entry.default_config()
    elif type(cfg) is not entry.config_cls:
        cfg = entry.config_from_dict(dataclasses.asdict(cfg))
    return entry.cls(cfg, num_samples, device)
