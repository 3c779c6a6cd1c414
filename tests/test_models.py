"""ResNet-18 / projection head / two-branch network / global magnitude pruning."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn

from methods.models import (BasicBlock, BranchBatchNorm, ContrastiveNet, MaskedConv2d,
                            build_network)
from methods.pruning import global_magnitude_prune, prune_k

# hand count of conv weights: stem + 4 stages (3x3 convs, plus 1x1 shortcuts in stages 2-4)
CONV_WEIGHTS = (3 * 64 * 9
                + 4 * 64 * 64 * 9
                + (64 * 128 * 9 + 3 * 128 * 128 * 9 + 64 * 128)
                + (128 * 256 * 9 + 3 * 256 * 256 * 9 + 128 * 256)
                + (256 * 512 * 9 + 3 * 512 * 512 * 9 + 256 * 512))
BN_CHANNELS = 64 + 4 * 64 + 5 * 128 + 5 * 256 + 5 * 512  # stem + 2 per block + shortcut BNs
HEAD_PARAMS = (512 * 512 + 512) + 2 * 512 + 512 * 128 + 2 * 128


pytestmark = pytest.mark.usefixtures("one_thread")


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.fixture(scope="module")
def net() -> ContrastiveNet:
    torch.manual_seed(0)
    return ContrastiveNet()


@pytest.fixture(scope="module")
def net2() -> ContrastiveNet:
    torch.manual_seed(0)
    return ContrastiveNet(two_branch=True)


def test_param_counts(net, net2):
    assert CONV_WEIGHTS == 11_159_232
    assert n_params(net.backbone) == 11_168_832 == CONV_WEIGHTS + 2 * BN_CHANNELS
    assert n_params(net.head) == HEAD_PARAMS
    # two-branch: same conv/linear weights, every BN (backbone and head) duplicated
    assert n_params(net2.backbone) == CONV_WEIGHTS + 4 * BN_CHANNELS
    assert n_params(net2.head) == HEAD_PARAMS + 2 * (512 + 128)
    assert sum(m.weight.numel() for m in net2.masked_convs()) == CONV_WEIGHTS


def test_architecture_and_names(net, net2):
    for n in (net, net2):
        bb = n.backbone
        assert bb.mean.shape == bb.std.shape == (1, 3, 1, 1)
        assert torch.allclose(bb.mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))
        assert torch.allclose(bb.std.flatten(), torch.tensor([0.229, 0.224, 0.225]))
        assert (bb.conv1.kernel_size, bb.conv1.stride, bb.conv1.padding) == ((3, 3), (1, 1), (1, 1))
        assert bb.conv1.out_channels == 64 and bb.conv1.bias is None
        assert not any(isinstance(m, (nn.MaxPool2d, nn.Linear)) for m in bb.modules())
        for i, (cout, stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2)), 1):
            layer = getattr(bb, f"layer{i}")
            assert isinstance(layer, nn.Sequential) and len(layer) == 2
            assert all(isinstance(b, BasicBlock) for b in layer)
            b0, b1 = layer
            assert b0.conv1.stride == (stride, stride) and b0.conv2.out_channels == cout
            assert isinstance(b1.shortcut, nn.Identity)
            if i == 1:
                assert isinstance(b0.shortcut, nn.Identity)
            else:
                sc = b0.shortcut
                assert isinstance(sc, nn.Sequential) and len(sc) == 2
                assert sc[0].kernel_size == (1, 1) and sc[0].stride == (2, 2) and sc[0].bias is None
            for conv in (b0.conv1, b0.conv2, b1.conv1, b1.conv2):
                assert conv.bias is None and conv.kernel_size == (3, 3)
        h = n.head
        assert (h.fc1.in_features, h.fc1.out_features, h.fc1.bias is not None) == (512, 512, True)
        assert (h.fc2.in_features, h.fc2.out_features, h.fc2.bias is None) == (512, 128, True)
    # single-branch: plain layers; two-branch: every conv masked, every BN split
    assert not any(isinstance(m, (MaskedConv2d, BranchBatchNorm)) for m in net.modules())
    assert isinstance(net.backbone.bn1, nn.BatchNorm2d) and isinstance(net.head.bn2, nn.BatchNorm1d)
    convs = [m for m in net2.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 20 and all(isinstance(m, MaskedConv2d) for m in convs)
    assert all(torch.equal(m.mask, torch.ones_like(m.weight)) for m in convs)
    bns = [m for m in net2.modules() if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d))]
    assert len(bns) == 2 * (20 + 2)
    assert isinstance(net2.head.bn1.dense, nn.BatchNorm1d) and isinstance(net2.head.bn1.pruned, nn.BatchNorm1d)
    sd = net2.state_dict()
    for key in ("backbone.conv1.mask", "backbone.layer2.0.shortcut.0.mask",
                "backbone.layer2.0.shortcut.1.pruned.running_mean", "head.bn2.dense.weight"):
        assert key in sd
    assert isinstance(build_network("sdclr").backbone.conv1, MaskedConv2d)
    assert isinstance(build_network("bcl-d").backbone.conv1, MaskedConv2d)
    assert type(build_network("simclr").backbone.conv1) is nn.Conv2d
    assert type(build_network("bcl-i").backbone.conv1) is nn.Conv2d


def test_init_stats(net2):
    for m in net2.modules():
        if isinstance(m, nn.Conv2d) and m.weight.numel() >= 100_000:
            fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1]
            std = m.weight.std().item()
            assert abs(std / math.sqrt(2.0 / fan_out) - 1) < 0.03
            assert abs(m.weight.mean().item()) < 0.05 * std
        if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)


def test_shapes_and_branches(net, net2):
    x = torch.rand(4, 3, 32, 32)
    net.eval(), net2.eval()
    assert net.features(x).shape == (4, 512) and net(x).shape == (4, 128)
    assert net2.features(x, "pruned").shape == (4, 512) and net2(x, "pruned").shape == (4, 128)
    with pytest.raises(ValueError):
        net(x, branch="pruned")
    with pytest.raises(ValueError):
        net2(x, branch="sparse")
    # all-ones mask and identical fresh BN copies: the branches agree
    torch.testing.assert_close(net2(x, "dense"), net2(x, "pruned"))
    net.train(), net2.train()


def test_normalisation_is_first_op(net):
    net.eval()
    x = torch.rand(3, 3, 32, 32)
    plain = copy.deepcopy(net)
    plain.backbone.mean.zero_()
    plain.backbone.std.fill_(1.0)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(net.features(x), plain.features((x - mean) / std))
    net.train()


def test_pruned_branch_uses_masked_weights():
    torch.manual_seed(1)
    net2 = ContrastiveNet(two_branch=True).eval()
    global_magnitude_prune(net2, 0.9)
    ref = ContrastiveNet(two_branch=False).eval()
    # reference: a plain net holding weight * mask, with the pruned BN copies' state
    sd = {}
    for k, v in net2.state_dict().items():
        if k.endswith(".mask") or ".dense." in k:
            continue
        sd[k.replace(".pruned.", ".")] = v
    for name, m in net2.named_modules():
        if isinstance(m, MaskedConv2d):
            sd[name + ".weight"] = m.weight * m.mask
    ref.load_state_dict(sd)
    x = torch.rand(4, 3, 32, 32)
    torch.testing.assert_close(net2(x, "pruned"), ref(x))
    assert not torch.allclose(net2(x, "dense"), ref(x))
    # gradients from the pruned branch reach only kept weights
    net2.train().zero_grad()
    net2(x, "pruned").square().sum().backward()
    for m in net2.masked_convs():
        assert torch.all(m.weight.grad[m.mask == 0] == 0)
        assert m.weight.grad[m.mask == 1].abs().sum() > 0


def test_bn_copies_are_separate():
    torch.manual_seed(2)
    net2 = ContrastiveNet(two_branch=True).train()
    before = copy.deepcopy(net2.state_dict())
    x = torch.rand(8, 3, 32, 32)
    net2(x, "dense").sum().backward()
    after = net2.state_dict()
    stats = [k for k in after if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert stats
    for k in stats:
        if ".pruned." in k:
            assert torch.equal(before[k], after[k]), k
        else:
            assert not torch.equal(before[k], after[k]), k
    for name, m in net2.named_modules():
        if isinstance(m, BranchBatchNorm):
            assert m.pruned.weight.grad is None and m.dense.weight.grad is not None, name


def test_prune_k_exact():
    assert prune_k(10, 0.9) == 9          # float 0.9 * 10 = 9.000000000000002 must not round up
    assert prune_k(11, 0.9) == 10
    assert prune_k(CONV_WEIGHTS, 0.9) == 10_043_309
    assert all(prune_k(n, 0.9) == math.ceil(9 * n / 10 - 1e-9) for n in range(1, 500))


def test_global_magnitude_prune_count_and_scope():
    torch.manual_seed(3)
    net2 = ContrastiveNet(two_branch=True)
    convs = net2.masked_convs()
    mags = torch.cat([m.weight.abs().flatten() for m in convs])
    n = mags.numel()
    thr = global_magnitude_prune(net2, 0.9)
    # 11M fp32 magnitudes tie often (about 9.5M distinct values), even at the threshold:
    # the rule keeps all of a tie, so the count is exact up to the ties at the threshold
    kept = int(sum(m.mask.sum().item() for m in convs))
    ties = int((mags == thr).sum())
    assert kept == int((mags >= thr).sum())
    assert n - prune_k(n, 0.9) <= kept <= n - prune_k(n, 0.9) - 1 + ties
    assert kept - (ties - 1) <= 1_115_923 <= kept  # the authors' count for ResNet-18
    k = prune_k(n, 0.9)
    assert (mags < thr).sum() <= k < (mags <= thr).sum()  # thr is sorted[k] (0-based), as theirs
    # one global threshold: every kept |w| beats every dropped |w|
    kept_min = min(m.weight[m.mask == 1].abs().min().item() for m in convs)
    dropped_max = max(m.weight[m.mask == 0].abs().max().item() for m in convs)
    assert kept_min >= thr.item() > dropped_max
    # the stem conv and the shortcut convs are pruned too; linear layers carry no mask
    bb = net2.backbone
    for conv in (bb.conv1, bb.layer2[0].shortcut[0], bb.layer3[0].shortcut[0], bb.layer4[0].shortcut[0]):
        assert 0 < conv.mask.sum() < conv.mask.numel()
    assert not any(hasattr(m, "mask") for m in net2.head.modules())
    assert set(torch.cat([m.mask.flatten() for m in convs]).unique().tolist()) == {0.0, 1.0}
    # masks are recomputed from scratch: shrinking weights changes the selection
    with torch.no_grad():
        bb.layer4[1].conv2.weight.mul_(1e-3)
    global_magnitude_prune(net2, 0.9)
    assert bb.layer4[1].conv2.mask.sum() == 0
    assert int(sum(m.mask.sum().item() for m in convs)) == n - prune_k(n, 0.9)


def test_prune_exact_count_small_and_ties():
    net2 = ContrastiveNet(two_branch=True)
    convs = net2.masked_convs()
    n = sum(m.weight.numel() for m in convs)
    with torch.no_grad():  # distinct magnitudes 1..n in a shuffled order, random signs
        vals = (torch.randperm(n) + 1).double() * torch.where(torch.rand(n) < 0.5, -1.0, 1.0)
        vals = vals.float()
        off = 0
        for m in convs:
            m.weight.copy_(vals[off:off + m.weight.numel()].view_as(m.weight))
            off += m.weight.numel()
    assert torch.cat([m.weight.abs().flatten() for m in convs]).unique().numel() == n
    global_magnitude_prune(net2, 0.9)
    kept = torch.cat([m.weight[m.mask == 1].abs() for m in convs])
    # without ties: n - ceil(0.9 n) kept, the authors' 1,115,923 (an earlier rule kept one more)
    assert kept.numel() == n - prune_k(n, 0.9) == 1_115_923
    assert kept.min().item() == prune_k(n, 0.9) + 1  # sorted[k] (0-based) and above
    # ties at the threshold are all kept (SPEC rule |w| >= k-th smallest)
    with torch.no_grad():
        for m in convs:
            m.weight.fill_(0.01)
    global_magnitude_prune(net2, 0.9)
    assert all(torch.all(m.mask == 1) for m in convs)


def test_channels_last_matches():
    torch.manual_seed(4)
    a = ContrastiveNet(two_branch=True).eval()
    global_magnitude_prune(a, 0.9)
    b = copy.deepcopy(a).to_channels_last()
    assert b.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.rand(2, 3, 32, 32)
    for branch in ("dense", "pruned"):
        torch.testing.assert_close(a(x, branch), b(x, branch), rtol=1e-4, atol=1e-4)


def test_kth_smallest_matches_sort_definition():
    from methods.pruning import kth_smallest
    x = torch.randn(10_001).abs()
    x[::7] = x[3]  # ties
    for k in (1, 2, 5_000, 9_001, 10_001):
        assert kth_smallest(x, k) == torch.sort(x).values[k - 1]
