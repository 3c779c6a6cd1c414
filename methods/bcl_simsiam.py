"""BCL(SimSiam): boosted contrastive learning around SimSiam (methods/bcl.py, methods/simsiam.py).

BCL's claim is that its memorization-boosted augmentation helps any base; this row tests it on a
non-contrastive one. The momentum-loss memory tracks SimSiam's per-sample loss (the negative
cosine, in [-1, 1]; the memory is standardised, so its scale does not matter). BCL's options take
BCL-I's values (k = 1, m = 10 + 20 w, beta 0.97), SimSiam's its own paper's (methods/simsiam.py).
"""
from __future__ import annotations

from dataclasses import dataclass

from methods.bcl import BCL, BCLConfig
from methods.registry import register_method
from methods.simsiam import SimSiam, SimSiamConfig


@dataclass
class BCLSimSiamConfig(SimSiamConfig, BCLConfig):
    """SimSiam's recipe and options, then BCL's (SimSiam's listed first, so its values win)."""


@register_method
class BCLSimSiam(BCL):
    name = "bcl-simsiam"
    display_name = "BCL(SimSiam)"
    config_cls = BCLSimSiamConfig
    base_cls = SimSiam
