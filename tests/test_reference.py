"""Converting the authors' checkpoints: both layouts round-trip to identical features."""
from __future__ import annotations

import re

import pytest
import torch

from harness.reference import (
    ReferenceFormatError, convert_state_dict, load_reference, reference_network, rename_key,
)
from methods.models import build_network

METHODS = ("simclr", "bcl-i", "sdclr", "bcl-d")


def randomized(method: str, seed: int = 0):
    """Our network with every parameter and buffer random (BN variances positive)."""
    torch.manual_seed(seed)
    net = build_network(method)
    with torch.no_grad():
        for k, v in net.state_dict().items():
            if k.endswith("num_batches_tracked") or k.endswith(".mask") or k in ("backbone.mean", "backbone.std"):
                continue
            v.copy_(torch.rand_like(v) + 0.5 if k.endswith("running_var") else torch.randn_like(v) * 0.1)
    return net.eval()


def to_reference_layout(state: dict, two_branch: bool) -> dict:
    """Our names -> the authors' names, written independently of harness.reference."""
    out = {}
    for k, v in state.items():
        if k in ("backbone.mean", "backbone.std"):
            out[k.replace("backbone.", "backbone.normalize.")] = v.reshape(3)  # theirs is 1-D
            continue
        if two_branch:
            if k.endswith(".mask"):
                continue  # their code never saves masks
            k = k.replace(".dense.", ".bn_list.0.").replace(".pruned.", ".bn_list.1.")
            k = k.replace(".shortcut.0.", ".downsample.conv.").replace(".shortcut.1.", ".downsample.bn.")
            k = re.sub(r"^head\.", "backbone.fc.", k)
        else:
            k = k.replace(".shortcut.", ".downsample.")
            k = re.sub(r"^head\.", "projector.", k)
        out[k] = v.clone()
    return out


@pytest.mark.parametrize("method", METHODS)
def test_reference_layout_gives_identical_features(method, cifar_images, tmp_path):
    net = randomized(method)
    two = net.two_branch
    theirs = to_reference_layout(net.state_dict(), two)
    if two:
        assert "backbone.layer2.0.downsample.bn.bn_list.1.running_mean" in theirs
        assert "backbone.fc.bn2.bn_list.0.weight" in theirs
    else:
        assert "backbone.layer3.0.downsample.1.weight" in theirs and "projector.fc1.bias" in theirs
    # DataParallel prefix and the {'state_dict': ...} wrapper, as their train.py saves it
    path = tmp_path / "ref.pt"
    torch.save({"epoch": 2000, "state_dict": {f"module.{k}": v for k, v in theirs.items()}}, path)
    loaded = load_reference(path, method).eval()
    x = torch.as_tensor(cifar_images[:4]).float() / 255
    with torch.no_grad():
        torch.testing.assert_close(loaded.features(x), net.features(x), rtol=0, atol=0)
        torch.testing.assert_close(loaded(x), net(x), rtol=0, atol=0)
        if two:  # the pruned-branch BN copies land in `.pruned`, masks default to ones
            torch.testing.assert_close(loaded(x, branch="pruned"), net(x, branch="pruned"), rtol=0, atol=0)
    ours = net.state_dict()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, ours[k]), k


def test_bare_state_dict_is_accepted():
    net = randomized("simclr", 1)
    loaded = reference_network(to_reference_layout(net.state_dict(), False), "simclr")
    assert torch.equal(loaded.state_dict()["head.fc2.weight"], net.state_dict()["head.fc2.weight"])


def test_rename_examples():
    assert rename_key("backbone.layer2.0.downsample.1.running_var", False) == "backbone.layer2.0.shortcut.1.running_var"
    assert rename_key("projector.bn1.weight", False) == "head.bn1.weight"
    assert rename_key("backbone.normalize.mean", True) == "backbone.mean"
    assert rename_key("backbone.layer4.0.downsample.bn.bn_list.1.bias", True) == "backbone.layer4.0.shortcut.1.pruned.bias"
    assert rename_key("backbone.fc.bn1.bn_list.0.running_mean", True) == "head.bn1.dense.running_mean"
    assert rename_key("backbone.layer1.1.conv2.weight", True) == "backbone.layer1.1.conv2.weight"


def test_missing_and_unexpected_keys_are_listed():
    net = build_network("simclr")
    theirs = to_reference_layout(net.state_dict(), False)
    del theirs["backbone.layer1.0.bn1.weight"]
    theirs["backbone.extra.weight"] = torch.zeros(1)
    with pytest.raises(ReferenceFormatError, match=r"missing 1 keys.*layer1\.0\.bn1\.weight.*unexpected 1.*extra"):
        convert_state_dict(theirs, net.state_dict(), two_branch=False)


def test_wrong_method_layout_is_refused():
    theirs = to_reference_layout(build_network("sdclr").state_dict(), True)
    with pytest.raises(ReferenceFormatError, match="single-branch.*is --method right"):
        reference_network(theirs, "simclr")


def test_shape_mismatch_is_reported():
    net = build_network("bcl-i")
    theirs = to_reference_layout(net.state_dict(), False)
    theirs["projector.fc2.weight"] = torch.zeros(64, 512)
    with pytest.raises(ReferenceFormatError, match=r"shape mismatch for head\.fc2\.weight.*\(64, 512\).*\(128, 512\)"):
        convert_state_dict(theirs, net.state_dict(), two_branch=False)


def test_not_a_state_dict():
    with pytest.raises(ReferenceFormatError, match="not a state dict"):
        reference_network({"epoch": 3, "optim": {}}, "simclr")
