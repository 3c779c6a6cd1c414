"""Linear-probe protocol (SPEC section 7) as plain tensor functions.

Features come from the frozen backbone (eval mode, dense branch). Probes are
Linear(512, C) (C: the dataset's classes, 100 for CIFAR-100) trained with Adam (lr 1e-2, wd 5e-6, batch 1,000, 500 epochs, lr
decayed geometrically to 1e-6). All probes of an evaluation (1 full-shot + 5 x 100-shot
+ 5 x 50-shot) train together as one batched problem: stacked weights (P, 513, C)
(the bias is the weight of a constant-1 feature), torch.bmm, and a hand-written Adam that
matches torch.optim.Adam step for step. Probes see different numbers of batches per
epoch; they are sorted by batch count so that the probes still training at step j are
always a prefix [0:k] and can be updated in place through views (no masking of optimizer
state, no wasted compute). On CUDA an epoch is replayed as a CUDA graph: the 11-probe,
500-epoch protocol then takes a few seconds (H200), where it is launch-bound otherwise.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from harness.groups import THIRDS, GroupRule, class_groups

FEATURE_DIM = 512


@dataclass(frozen=True)
class ProbeConfig:
    epochs: int = 500
    lr: float = 1e-2
    final_lr: float = 1e-6  # lr after the last epoch; gamma = (final_lr / lr) ** (1 / epochs)
    weight_decay: float = 5e-6
    batch_size: int = 1000
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    @property
    def gamma(self) -> float:
        return (self.final_lr / self.lr) ** (1.0 / self.epochs)


# -- features -------------------------------------------------------------------------------

@torch.no_grad()
def extract_features(net: nn.Module, images: np.ndarray | Tensor, device: torch.device | str | None = None,
                     batch_size: int = 1000, bf16: bool = False,
                     on_batch: Callable[[int], None] | None = None) -> Tensor:
    """(N, 3, S, S) uint8 images -> (N, 512) fp32 features on `device` (dense branch, eval mode)."""
    device = torch.device(device) if device is not None else next(net.parameters()).device
    was_training = net.training
    net.eval()  # BN running statistics, as the protocol says
    images = torch.as_tensor(images)
    dim = getattr(getattr(net, "backbone", None), "feature_dim", FEATURE_DIM)
    out = torch.empty(len(images), dim, device=device)
    use_amp = bf16 and device.type == "cuda"
    try:
        for i in range(0, len(images), batch_size):
            x = images[i:i + batch_size].to(device, non_blocking=True).float().div_(255)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
                out[i:i + batch_size] = net.features(x, branch="dense").float()
            if on_batch is not None:
                on_batch(len(x))
    finally:
        net.train(was_training)
    return out


# -- the batched probe trainer ---------------------------------------------------------------

def batches_per_epoch(n: int, batch_size: int = 1000) -> int:
    """The last partial batch is kept: ceil(n / batch_size)."""
    return -(-n // batch_size)


def lr_schedule(cfg: ProbeConfig) -> list[float]:
    """The lr used in each epoch; multiplied by gamma after every epoch (as ExponentialLR does)."""
    lrs, lr = [], cfg.lr
    for _ in range(cfg.epochs):
        lrs.append(lr)
        lr = lr * cfg.gamma
    return lrs


def init_linear(generator: torch.Generator, device: torch.device | str = "cpu",
                dim_in: int = FEATURE_DIM, *, dim_out: int) -> tuple[Tensor, Tensor]:
    """nn.Linear's default init, drawn from `generator`: weight (dim_out, dim_in), bias (dim_out,)."""
    w = torch.empty(dim_out, dim_in, device=device)
    nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=generator)
    bound = 1 / math.sqrt(dim_in)
    b = torch.empty(dim_out, device=device).uniform_(-bound, bound, generator=generator)
    return w, b


def probe_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """One generator per probe draws its init and then its per-epoch permutations."""
    return torch.Generator(device=device).manual_seed(seed)


def train_probes(feats: Tensor, labels: Tensor, subsets: Sequence[Tensor], seeds: Sequence[int],
                 cfg: ProbeConfig = ProbeConfig(), on_epoch: Callable[[int], None] | None = None,
                 cuda_graph: bool = True, num_classes: int | None = None) -> tuple[Tensor, Tensor]:
    """Train len(subsets) independent probes at once.

    feats (N, 512) and labels (N,) live on one device; subsets[p] are indices into them
    (probe p's training set); seeds[p] seeds probe p's init and permutations, so a probe's
    result does not depend on which others it was batched with.
    Returns weights (P, 512, C) and biases (P, C), in the order of `subsets`; C is `num_classes`
    (callers with a dataset give its class count; else one more than the largest label).
    On CUDA one epoch's steps are captured once as a CUDA graph and replayed (the loop is
    launch-bound otherwise); `cuda_graph=False` runs the same kernels eagerly.
    """
    assert len(subsets) == len(seeds) and len(subsets) > 0
    device, P, B = feats.device, len(subsets), cfg.batch_size
    C = int(num_classes) if num_classes is not None else int(labels.max()) + 1
    subsets = [torch.as_tensor(s, device=device, dtype=torch.long) for s in subsets]
    sizes = [len(s) for s in subsets]
    assert min(sizes) > 0, "empty probe training set"
    nb = [batches_per_epoch(n, B) for n in sizes]
    # sort by batch count (descending): at step j the probes still going are a prefix
    order = sorted(range(P), key=lambda p: -nb[p])
    subsets, sizes, nb = [subsets[p] for p in order], [sizes[p] for p in order], [nb[p] for p in order]
    gens = [probe_generator(seeds[p], device) for p in order]

    # the bias is a weight on a constant-1 feature: one bmm and one Adam update per step.
    # Probes train in the features' dtype (fp32 in practice; fp64 lets tests compare exactly).
    x1 = torch.cat([feats, torch.ones(len(feats), 1, device=device, dtype=feats.dtype)], 1)
    D = feats.shape[1]  # 512 at the paper's width
    theta = torch.empty(P, D + 1, C, device=device, dtype=feats.dtype)
    for i, g in enumerate(gens):
        w_i, b_i = init_linear(g, device, dim_in=D, dim_out=C)
        theta[i, :D], theta[i, D] = w_i.T, b_i

    # row p of `idx` holds probe p's epoch order, then padding; `scale` is 1/(rows in the
    # batch) on real rows and 0 on padding, so each probe's loss is the mean over its batch
    L = nb[0] * B
    scale = torch.zeros(P, L, device=device, dtype=feats.dtype)
    for i, n in enumerate(sizes):
        for j in range(nb[i]):
            lo, hi = j * B, min((j + 1) * B, n)
            scale[i, lo:hi] = 1.0 / (hi - lo)
    st = _State(x1=x1, labels=labels, theta=theta, m=torch.zeros_like(theta), v=torch.zeros_like(theta),
                idx=torch.zeros(P, L, dtype=torch.long, device=device), scale=scale,
                eye=torch.eye(C, device=device, dtype=feats.dtype),
                nb=torch.tensor(nb, device=device, dtype=torch.float64),
                epoch=torch.zeros((), device=device, dtype=torch.float64),
                lr=torch.zeros((), device=device, dtype=feats.dtype),
                active=[sum(1 for n in nb if n > j) for j in range(nb[0])], batch_size=B, cfg=cfg)

    graph = None
    for epoch, lr in enumerate(lr_schedule(cfg)):
        for i, (s, g) in enumerate(zip(subsets, gens)):
            st.idx[i, :sizes[i]] = s[torch.randperm(sizes[i], generator=g, device=device)]
        st.epoch.fill_(epoch)
        st.lr.fill_(lr)
        if graph is not None:
            graph.replay()
        elif cuda_graph and device.type == "cuda" and epoch == 0:
            graph = _run_and_capture(st)
        else:
            _train_epoch(st)
        if on_epoch is not None:
            on_epoch(epoch)

    inverse = torch.tensor([order.index(p) for p in range(P)], device=device)
    theta = st.theta[inverse]
    return theta[:, :D].contiguous(), theta[:, D].contiguous()


@dataclass
class _State:
    """Static buffers of the batched trainer (fixed addresses, so an epoch can be graph-captured)."""
    x1: Tensor        # (N, 513) features with a constant-1 column
    labels: Tensor    # (N,)
    theta: Tensor     # (P, 513, C) weights and bias
    m: Tensor         # Adam first moment
    v: Tensor         # Adam second moment
    idx: Tensor       # (P, L) this epoch's sample order per probe, padded
    scale: Tensor     # (P, L) 1/batch rows on real rows, 0 on padding
    eye: Tensor       # (C, C) for one-hot targets
    nb: Tensor        # (P,) batches per epoch, float64
    epoch: Tensor     # () current epoch (0-based), float64
    lr: Tensor        # () current learning rate
    active: list[int]  # probes still training at step j: a prefix of this length
    batch_size: int
    cfg: ProbeConfig


def _train_epoch(st: _State) -> None:
    B = st.batch_size
    for j, k in enumerate(st.active):
        sl = slice(j * B, (j + 1) * B)
        bi = st.idx[:k, sl]
        x, y = st.x1[bi], st.labels[bi]                                  # (k, B, 513), (k, B)
        # gradient of each probe's mean cross-entropy over its batch (padding rows weigh 0)
        logits = torch.bmm(x, st.theta[:k])
        g_logits = (logits.softmax(-1) - st.eye[y]) * st.scale[:k, sl, None]
        grad = torch.bmm(x.transpose(1, 2), g_logits)
        step = st.epoch * st.nb[:k] + (j + 1)                            # Adam step count per probe
        _adam_(st.theta[:k], grad, st.m[:k], st.v[:k], step[:, None, None], st.lr, st.cfg)


def _run_and_capture(st: _State) -> torch.cuda.CUDAGraph:
    """Run epoch 0 eagerly on a side stream (the warm-up capture needs), then capture the
    epoch's kernels; capturing records without executing, so the state is not advanced."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        _train_epoch(st)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _train_epoch(st)
    return graph


def _adam_(param: Tensor, grad: Tensor, m: Tensor, v: Tensor, step: Tensor, lr: Tensor | float,
           cfg: ProbeConfig) -> None:
    """torch.optim.Adam (L2 weight decay added to the gradient, not decoupled), in place,
    with a per-probe step count for the bias corrections."""
    beta1, beta2 = cfg.betas
    grad = grad + cfg.weight_decay * param
    m.lerp_(grad, 1 - beta1)
    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bc1 = (1 - beta1 ** step).to(param.dtype)
    bc2_sqrt = (1 - beta2 ** step).sqrt().to(param.dtype)
    param.sub_(lr / bc1 * m / (v.sqrt() / bc2_sqrt + cfg.eps))


# -- scoring ---------------------------------------------------------------------------------

def per_class_accuracy(pred: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """(C,) accuracy in % per class; NaN for a class absent from `labels`."""
    hits = torch.bincount(labels, weights=(pred == labels).double(), minlength=num_classes)
    total = torch.bincount(labels, minlength=num_classes).double()
    return 100 * hits / total


def score_probe(W: Tensor, b: Tensor, feats: Tensor, labels: Tensor,
                class_counts: np.ndarray | None = None, groups: GroupRule = THIRDS) -> dict:
    """Top-1/top-5 (%), per-class accuracy, and Many/Medium/Few/Std when class counts are given.
    With fewer than five classes, top-5 is top-C (every class counts, so 100%)."""
    logits = feats @ W + b
    top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
    pred = top5[:, 0]
    out = {
        "top1": 100 * (pred == labels).double().mean().item(),
        "top5": 100 * (top5 == labels[:, None]).any(1).double().mean().item(),
        "per_class": per_class_accuracy(pred, labels, W.shape[1]).cpu().tolist(),
    }
    out.update(group_metrics(np.array(out["per_class"]), class_counts, groups))
    return out


def group_metrics(per_class: np.ndarray, class_counts: np.ndarray | None, groups: GroupRule = THIRDS) -> dict:
    """Group accuracy = mean of its classes' accuracies (the test set is balanced, so this is
    also the accuracy over the group's test images); Std = population std of the three."""
    if class_counts is None or groups.kind == "none":
        return {"many": None, "medium": None, "few": None, "std": None}
    with warnings.catch_warnings():  # a group whose classes all lack test images has no mean: NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        g = {name: float(np.nanmean(per_class[ids])) if len(ids) else float("nan")
             for name, ids in class_groups(class_counts, groups).items()}
    g["std"] = float(np.std([g["many"], g["medium"], g["few"]], ddof=0))
    return g


@dataclass
class ProbeSpec:
    """One probe to train: its training indices (into the feature matrix) and identity."""
    kind: str      # "full", "100", "50"
    subset: int    # 0 for full-shot, 1..5 for the k-shot lists
    indices: Tensor
    seed: int
    extra: dict = field(default_factory=dict)


def run_probes(specs: Sequence[ProbeSpec], train_feats: Tensor, train_labels: Tensor,
               test_feats: Tensor, test_labels: Tensor, class_counts: np.ndarray | None = None,
               cfg: ProbeConfig = ProbeConfig(),
               on_epoch: Callable[[int], None] | None = None, num_classes: int | None = None,
               groups: GroupRule = THIRDS) -> list[dict]:
    """Train all probes in one batch and score each on the test features. `num_classes` is the
    dataset's (default: the class counts' length, else one more than the largest label)."""
    if num_classes is None and class_counts is not None:
        num_classes = len(class_counts)
    if num_classes is None:
        num_classes = int(max(int(train_labels.max()), int(test_labels.max()))) + 1
    W, b = train_probes(train_feats, train_labels, [s.indices for s in specs], [s.seed for s in specs],
                        cfg, on_epoch, num_classes=num_classes)
    results = []
    for p, s in enumerate(specs):
        r = score_probe(W[p], b[p], test_feats, test_labels, class_counts, groups)
        results.append({"kind": s.kind, "subset": s.subset, "train_size": len(s.indices), **r})
    return results
