"""Per-iteration learning rate: linear warm-up, then cosine decay (SPEC section 5).

Iterations are 1-based, it = 1 .. T, with W warm-up iterations (10 epochs' worth):

    it <= W:  lr = base * it / W                     (ramp from 0 at it = 0; base at it = W)
    it >  W:  p  = (it - W) / (T - W)
              lr = final + (base - final) * (1 + cos(pi * p)) / 2     (final exactly at it = T)

The first step runs at base / W (0.0025 on split 1, where W = 10 epochs x 20 steps = 200),
as in the authors' code (checked side by side), and the last step at exactly ``final_lr``,
as "cosine decay to 1e-6 at the last iteration" reads.
"""
from __future__ import annotations

import math


def lr_at(iteration: int, total_iterations: int, warmup_iterations: int,
          base_lr: float, final_lr: float = 1e-6) -> float:
    if not 1 <= iteration <= total_iterations:
        raise ValueError(f"iteration {iteration} outside 1..{total_iterations}")
    if iteration <= warmup_iterations:
        return base_lr * iteration / warmup_iterations
    progress = (iteration - warmup_iterations) / (total_iterations - warmup_iterations)
    return final_lr + (base_lr - final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
