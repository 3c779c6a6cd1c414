"""Many / Medium / Few: which classes of a pretraining split fall into which group.

Torch-free, so the CLI can parse `--groups` without loading torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class GroupRule:
    """How classes fall into Many / Medium / Few by their count in the pretraining split.

    Thirds (the paper's rule; the default): a stable ascending sort, the smallest C // 3 classes
    are Few, the next C // 3 Medium, the rest Many (33 / 33 / 34 at 100 classes). Counts: Many
    above `many_above` images, Few below `few_below`, Medium in between (e.g. 100 and 20).
    `none`: no groups."""
    kind: str = "thirds"             # "thirds", "counts" or "none"
    many_above: int | None = None
    few_below: int | None = None

    def describe(self) -> str:
        if self.kind == "counts":
            return f"Many > {self.many_above}, Few < {self.few_below} images"
        return "thirds of the classes by count" if self.kind == "thirds" else "no groups"

    def to_dict(self) -> dict:
        return {"rule": self.kind, **({"many_above": self.many_above, "few_below": self.few_below}
                                      if self.kind == "counts" else {})}


THIRDS = GroupRule()


def parse_groups(text: str) -> GroupRule:
    """`thirds`, `none`, or `counts:MANY,FEW` (Many: more than MANY images; Few: fewer than FEW)."""
    text = text.strip().lower()
    if text in ("thirds", "none"):
        return GroupRule(text)
    if text.startswith("counts:"):
        try:
            many, few = (int(x) for x in text.split(":", 1)[1].split(","))
        except ValueError:
            pass
        else:
            if 0 < few <= many + 1:
                return GroupRule("counts", many, few)
    raise ValueError(f"groups {text!r}: give thirds (the paper's rule), none, or counts:MANY,FEW with "
                     "0 < FEW <= MANY + 1 (Many: more than MANY images in the pretraining split, Few: fewer "
                     "than FEW), e.g. counts:100,20")


def class_groups(counts: np.ndarray | Sequence[int], rule: GroupRule = THIRDS) -> dict[str, np.ndarray]:
    """Class ids (sorted) of each group, from the pretraining split's class counts (see GroupRule)."""
    counts = np.asarray(counts)
    if rule.kind == "counts":
        many, few = counts > rule.many_above, counts < rule.few_below
        return {"few": np.flatnonzero(few), "medium": np.flatnonzero(~many & ~few), "many": np.flatnonzero(many)}
    order = np.argsort(counts, kind="stable")
    k = len(order) // 3
    return {"few": np.sort(order[:k]), "medium": np.sort(order[k:2 * k]), "many": np.sort(order[2 * k:])}


def group_sizes(counts: np.ndarray | Sequence[int], rule: GroupRule = THIRDS) -> dict[str, int]:
    return {name: int(len(ids)) for name, ids in class_groups(counts, rule).items()}
