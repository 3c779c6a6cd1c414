"""SimSiam (Chen & He, "Exploring Simple Siamese Representation Learning", CVPR 2021).

Both views go through the encoder f (the ResNet-18 backbone and SimSiam's projection MLP) and
then the prediction MLP h; the loss is the negative cosine similarity of each view's prediction
with the other view's projection, which gets no gradient (the stop-gradient that keeps SimSiam
from collapsing):

    L = D(p1, stopgrad(z2)) / 2 + D(p2, stopgrad(z1)) / 2,   D(p, z) = -cos(p, z)

so the per-sample loss lies in [-1, 1] (-1: both predictions point exactly at the other view).
No negatives, no momentum encoder. The predictor is trained and checkpointed with the network
(``modules()``); the probe reads the backbone's features, as the paper's linear evaluation does.

Recipe: the paper's CIFAR-10 setting on the benchmark's CIFAR ResNet-18 (3x3 stem, no max-pool;
SPEC 3) and augmentation (SPEC 6): SGD with momentum 0.9, lr 0.03 x batch / 256 = 0.06 at batch
512, weight decay 5e-4 on all parameters, cosine decay, no warm-up; a 2-layer projection MLP
(Linear-BN-ReLU-Linear-BN, 2048-d output; no biases before BN, no affine on the output BN) and the
bottleneck predictor Linear(2048, 512, no bias)-BN-ReLU-Linear(512, 2048). Adapted to this
benchmark, and so marked here: 2,000 epochs (the benchmark's budget for every method; the paper
trains 800), cosine decay to 1e-6 (the harness's schedule) rather than to 0, and the predictor's
learning rate decays with the rest (the paper's ImageNet runs keep it fixed). The two views go
through the network in two forwards, so each has its own BN statistics, as in the paper's code.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from methods.base import Method, MethodConfig, count
from methods.models import ResNet18, init_weights
from methods.registry import register_method


@dataclass
class SimSiamConfig(MethodConfig):
    lr: float = 0.06                 # base lr 0.03 x 512 / 256
    weight_decay: float = 5e-4
    warmup_epochs: int = 0
    projection_dim: int = 2048       # projection MLP width and output (= the predictor's in and out)
    predictor_dim: int = 512         # the predictor's bottleneck

    CHECKS = (("projection_dim", count(1), "an integer from 1 to 2^31"),
             ("predictor_dim", count(1), "an integer from 1 to 2^31"))


class SimSiamNet(nn.Module):
    """Backbone + SimSiam's projection MLP; ``features`` gives the probe features."""

    def __init__(self, width: int, projection_dim: int):
        super().__init__()
        self.backbone = ResNet18(two_branch=False, width=width)
        d = self.backbone.feature_dim
        self.head = nn.Sequential(
            nn.Linear(d, projection_dim, bias=False), nn.BatchNorm1d(projection_dim), nn.ReLU(inplace=True),
            nn.Linear(projection_dim, projection_dim, bias=False), nn.BatchNorm1d(projection_dim, affine=False))
        init_weights(self)

    def features(self, x: Tensor, branch: str = "dense") -> Tensor:
        if branch != "dense":
            raise ValueError(f"branch {branch!r} not available (SimSiam's network has one branch)")
        return self.backbone(x)

    def forward(self, x: Tensor, branch: str = "dense") -> Tensor:
        return self.head(self.features(x, branch))


def predictor(dim: int, hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, dim))


def negative_cosine_per_sample(p1: Tensor, p2: Tensor, z1: Tensor, z2: Tensor) -> Tensor:
    """(D(p1, sg z2) + D(p2, sg z1)) / 2 per sample, in fp32 whatever precision the network ran in."""
    with torch.autocast(device_type=p1.device.type, enabled=False):
        f = lambda t: t.float()
        d1 = -F.cosine_similarity(f(p1), f(z2).detach(), dim=1)
        d2 = -F.cosine_similarity(f(p2), f(z1).detach(), dim=1)
        return 0.5 * (d1 + d2)


@register_method
class SimSiam(Method):
    name = "simsiam"
    display_name = "SimSiam"
    config_cls = SimSiamConfig

    def __init__(self, cfg: SimSiamConfig, num_samples: int, device):
        super().__init__(cfg, num_samples, device)
        self.predictor = predictor(cfg.projection_dim, cfg.predictor_dim).to(self.device)

    def build_network(self) -> nn.Module:
        if self.cfg.width < 1:
            raise ValueError(f"network width must be at least 1, got {self.cfg.width}")
        return SimSiamNet(self.cfg.width, self.cfg.projection_dim)

    def modules(self) -> dict[str, nn.Module]:
        return {"net": self.net, "predictor": self.predictor}

    def loss_from_views(self, views: Tensor) -> tuple[Tensor, Tensor]:
        v1, v2 = views.chunk(2)
        z1, z2 = self.forward(v1), self.forward(v2)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        per_sample = negative_cosine_per_sample(p1, p2, z1, z2)
        return per_sample.mean(), per_sample.detach()
