"""ResNet-18 for 32x32 inputs (the paper's; any square size works: the pool is adaptive) plus the
SimCLR projection head (SPEC section 3).

One network class serves all four methods. With ``two_branch=True`` (SDCLR, BCL-D)
every conv becomes a :class:`MaskedConv2d` and every BN a :class:`BranchBatchNorm`,
so one set of conv/linear weights runs either dense or through the pruning mask,
each branch with its own BN statistics and affine parameters.

The branch is an explicit Python argument (``"dense"`` / ``"pruned"``) threaded
through every forward: no hidden module state, and torch.compile simply specialises
one graph per branch.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

BRANCHES = ("dense", "pruned")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class MaskedConv2d(nn.Conv2d):
    """Conv whose weight is multiplied by the 0/1 buffer ``mask`` in the pruned branch only."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("mask", torch.ones_like(self.weight))

    def forward(self, x: Tensor, branch: str = "dense") -> Tensor:
        # the product keeps the weight shared: pruned-branch gradients reach only kept weights
        w = self.weight * self.mask if branch == "pruned" else self.weight
        return self._conv_forward(x, w, self.bias)


class BranchBatchNorm(nn.Module):
    """Two independent BN layers (``dense`` and ``pruned``); the branch picks one."""

    def __init__(self, num_features: int, dim: int = 2):
        super().__init__()
        bn = nn.BatchNorm2d if dim == 2 else nn.BatchNorm1d
        self.dense = bn(num_features)
        self.pruned = bn(num_features)

    def forward(self, x: Tensor, branch: str = "dense") -> Tensor:
        return self.pruned(x) if branch == "pruned" else self.dense(x)


def _call(m: nn.Module, x: Tensor, branch: str) -> Tensor:
    # plain layers (single-branch net) ignore the branch argument
    if isinstance(m, (MaskedConv2d, BranchBatchNorm)):
        return m(x, branch)
    return m(x)


def _conv(two_branch: bool, cin: int, cout: int, k: int, stride: int = 1) -> nn.Conv2d:
    cls = MaskedConv2d if two_branch else nn.Conv2d
    return cls(cin, cout, k, stride=stride, padding=k // 2, bias=False)


def _bn(two_branch: bool, c: int, dim: int = 2) -> nn.Module:
    if two_branch:
        return BranchBatchNorm(c, dim)
    return nn.BatchNorm2d(c) if dim == 2 else nn.BatchNorm1d(c)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, two_branch: bool):
        super().__init__()
        self.conv1 = _conv(two_branch, cin, cout, 3, stride)
        self.bn1 = _bn(two_branch, cout)
        self.conv2 = _conv(two_branch, cout, cout, 3)
        self.bn2 = _bn(two_branch, cout)
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(_conv(two_branch, cin, cout, 1, stride), _bn(two_branch, cout))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor, branch: str = "dense") -> Tensor:
        out = F.relu(_call(self.bn1, _call(self.conv1, x, branch), branch))
        out = _call(self.bn2, _call(self.conv2, out, branch), branch)
        if isinstance(self.shortcut, nn.Sequential):
            x = _call(self.shortcut[1], _call(self.shortcut[0], x, branch), branch)
        return F.relu(out + x)


class ResNet18(nn.Module):
    """CIFAR ResNet-18: 3x3 stem, no max-pool, 4 stages of 2 BasicBlocks, global average pool.

    ``width`` is the stem's channel count (the paper's 64); the stages have width x 1, 2, 4, 8
    channels, so features are 8 x width wide. Narrow widths exist for tests and CPU tries."""

    def __init__(self, two_branch: bool = False, width: int = 64):
        super().__init__()
        self.feature_dim = 8 * width
        # normalisation is the model's first op, so callers feed [0, 1] images
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.conv1 = _conv(two_branch, 3, width, 3)
        self.bn1 = _bn(two_branch, width)
        cin, layers = width, []
        for cout, stride in ((width, 1), (2 * width, 2), (4 * width, 2), (8 * width, 2)):
            layers.append(nn.Sequential(BasicBlock(cin, cout, stride, two_branch),
                                        BasicBlock(cout, cout, 1, two_branch)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = layers

    def forward(self, x: Tensor, branch: str = "dense") -> Tensor:
        x = (x - self.mean) / self.std
        if self.conv1.weight.is_contiguous(memory_format=torch.channels_last):
            # net.to(memory_format=channels_last) was called: match the input to the weights
            x = x.contiguous(memory_format=torch.channels_last)
        x = F.relu(_call(self.bn1, _call(self.conv1, x, branch), branch))
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in layer:
                x = block(x, branch)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


class ProjectionHead(nn.Module):
    """Linear(512,512) -> BN1d -> ReLU -> Linear(512,128, no bias) -> BN1d."""

    def __init__(self, two_branch: bool = False, dim_in: int = 512, dim_out: int = 128):
        super().__init__()
        self.fc1 = nn.Linear(dim_in, dim_in, bias=True)
        self.bn1 = _bn(two_branch, dim_in, dim=1)
        self.fc2 = nn.Linear(dim_in, dim_out, bias=False)
        self.bn2 = _bn(two_branch, dim_out, dim=1)

    def forward(self, h: Tensor, branch: str = "dense") -> Tensor:
        h = F.relu(_call(self.bn1, self.fc1(h), branch))
        return _call(self.bn2, self.fc2(h), branch)


def init_weights(net: nn.Module) -> None:
    """SPEC 3: convs Kaiming-normal (fan_out, relu), BN weight 1 and bias 0, in module order."""
    for m in net.modules():
        if isinstance(m, nn.Conv2d):  # includes MaskedConv2d
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)) and m.affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    # Linear layers keep PyTorch's default init (SPEC is silent about them)


class ContrastiveNet(nn.Module):
    """Backbone + projection head. ``features`` gives the probe features (512-d at the paper's width),
    ``forward`` the 128-d projections."""

    def __init__(self, two_branch: bool = False, width: int = 64):
        super().__init__()
        self.two_branch = two_branch
        self.backbone = ResNet18(two_branch, width)
        self.head = ProjectionHead(two_branch, dim_in=self.backbone.feature_dim)
        self._init_weights()

    def _init_weights(self) -> None:
        init_weights(self)

    def _check(self, branch: str) -> None:
        if branch not in BRANCHES or (branch == "pruned" and not self.two_branch):
            raise ValueError(f"branch {branch!r} not available (two_branch={self.two_branch})")

    def features(self, x: Tensor, branch: str = "dense") -> Tensor:
        """x: float images in [0, 1], (B, 3, S, S) -> (B, 8 x width): (B, 512) at the paper's width."""
        self._check(branch)
        return self.backbone(x, branch)

    def forward(self, x: Tensor, branch: str = "dense") -> Tensor:
        """x: float images in [0, 1], (B, 3, S, S) -> (B, 128) projections (not normalised)."""
        self._check(branch)
        return self.head(self.backbone(x, branch), branch)

    def masked_convs(self) -> list[MaskedConv2d]:
        return [m for m in self.modules() if isinstance(m, MaskedConv2d)]

    def to_channels_last(self) -> "ContrastiveNet":
        """Conv weights (and masks) to channels_last; the backbone then converts its input to match."""
        return self.to(memory_format=torch.channels_last)


TWO_BRANCH_METHODS = ("sdclr", "bcl-d")


PAPER_WIDTH = 64


def build_network(method_name: str, width: int = PAPER_WIDTH) -> ContrastiveNet:
    """The network of one of the paper's four methods, two-branch (prunable) for SDCLR and BCL-D: for
    the authors' checkpoints and the benchmarks. A registered method builds its own network
    (methods.base.Method.build_network)."""
    if width < 1:
        raise ValueError(f"network width must be at least 1, got {width}")
    return ContrastiveNet(two_branch=method_name.lower() in TWO_BRANCH_METHODS, width=width)
