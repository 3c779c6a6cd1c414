"""Convert the authors' checkpoints (MediaBrain-SJTU/BCL) into our state dict.

Their single-branch models (SimCLR, BCL-I) name the backbone like ours except for
`normalize.{mean,std}` and the shortcut `downsample.{0,1}`, and the head `projector`.
Their two-branch models (SDCLR, BCL-D) keep two BN copies per layer in `bn_list.{0,1}`
(0 = un-pruned/dense, 1 = pruned), a shortcut `downsample.{conv,bn}` and the head under
`backbone.fc`. Pruning masks are not saved by their code (a plain attribute), so our
`mask` buffers are filled with ones: the dense branch, the one the probe reads, never
uses them.
"""
from __future__ import annotations

import re
from pathlib import Path

from torch import Tensor

from harness.errors import HarnessError
from methods.models import TWO_BRANCH_METHODS, ContrastiveNet, build_network

BRANCH_NAMES = {"0": "dense", "1": "pruned"}
# our buffers that their files may lack; the model's own values are kept
FILLABLE = (".mask", ".num_batches_tracked")


class ReferenceFormatError(HarnessError, ValueError):
    """A checkpoint that does not fit the reference layout of the chosen method."""


def strip_module_prefix(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """DataParallel checkpoints prefix every key with `module.`."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return state


def unwrap_state_dict(obj: object) -> dict[str, Tensor]:
    """Their files hold {'state_dict': ..., 'epoch': ..., ...} or a bare state dict."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ReferenceFormatError("not a state dict: expected a dict of tensors (or one under 'state_dict')")
    return strip_module_prefix(dict(obj))


def rename_key(key: str, two_branch: bool) -> str:
    """One of their keys -> our key (pure string rewriting; unknown keys pass through)."""
    k = re.sub(r"^backbone\.normalize\.(mean|std)$", r"backbone.\1", key)
    if two_branch:
        k = re.sub(r"^backbone\.fc\.", "head.", k)
        k = k.replace(".downsample.conv.", ".shortcut.0.").replace(".downsample.bn.", ".shortcut.1.")
        k = re.sub(r"\.bn_list\.([01])\.", lambda m: f".{BRANCH_NAMES[m.group(1)]}.", k)
    else:
        k = re.sub(r"^projector\.", "head.", k)
        k = re.sub(r"\.downsample\.([01])\.", r".shortcut.\1.", k)
    return k


def _few(keys, n: int = 5) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def convert_state_dict(theirs: dict[str, Tensor], target: dict[str, Tensor], two_branch: bool) -> dict[str, Tensor]:
    """Their state dict -> ours, checked against `target` (our model's state dict, which
    supplies the expected keys and shapes, and the values of fillable buffers)."""
    renamed: dict[str, Tensor] = {}
    for k, v in theirs.items():
        new = rename_key(k, two_branch)
        if new in renamed:
            raise ReferenceFormatError(f"two keys map to {new!r} (one is {k!r})")
        renamed[new] = v
    missing = [k for k in target if k not in renamed and not k.endswith(FILLABLE)]
    unexpected = [k for k in renamed if k not in target]
    if missing or unexpected:
        layout = "two-branch (SDCLR/BCL-D)" if two_branch else "single-branch (SimCLR/BCL-I)"
        msg = [f"checkpoint does not match the {layout} reference layout"]
        if missing:
            msg.append(f"missing {len(missing)} keys (ours): {_few(missing)}")
        if unexpected:
            msg.append(f"unexpected {len(unexpected)} keys (after renaming): {_few(unexpected)}")
        msg.append("is --method right?")
        raise ReferenceFormatError("; ".join(msg))
    out = {}
    for k, ref in target.items():
        if k not in renamed:
            out[k] = ref.clone()
            continue
        v = renamed[k]
        if v.shape != ref.shape:
            # their normalize buffers are (3,), ours (1, 3, 1, 1): same numbers
            if k in ("backbone.mean", "backbone.std") and v.numel() == ref.numel():
                v = v.reshape(ref.shape)
            else:
                raise ReferenceFormatError(f"shape mismatch for {k}: checkpoint {tuple(v.shape)}, "
                                     f"model {tuple(ref.shape)}")
        out[k] = v.to(ref.dtype)
    return out


def reference_network(obj: object, method: str) -> ContrastiveNet:
    """Our network for `method` holding the weights of a loaded reference checkpoint `obj`."""
    net = build_network(method)
    state = convert_state_dict(unwrap_state_dict(obj), net.state_dict(), method.lower() in TWO_BRANCH_METHODS)
    net.load_state_dict(state)
    return net


def load_reference(path: Path, method: str) -> ContrastiveNet:
    from harness.safeio import load_torch

    return reference_network(load_torch(path, ReferenceFormatError), method)
