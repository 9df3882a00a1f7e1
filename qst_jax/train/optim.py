"""Optimizers and learning-rate schedules from config, or your own.

`make_optimizer(cfg)` builds AdamW with gradient-norm clipping and a schedule
(constant, linear, cosine, each with linear warmup). To bring your own:

    tx = make_optimizer(cfg, schedule=my_schedule)   # your optax schedule
    tx = my_gradient_transformation                   # or any optax transform

and pass `tx` to `make_train_step` / `Trainer`. Any `optax.GradientTransformation`
works; schedules are plain `step -> lr` callables.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

from qst_jax.tree import path_names

SCHEDULES = ("constant", "linear", "cosine")
NO_DECAY = ("scale", "bias", "b", "gates", "out_gate")


class OptimizerConfigError(ValueError):
    pass


def make_schedule(kind: str, lr: float, total_steps: int, warmup_steps: int = 0, final_fraction: float = 0.0):
    """`step -> lr`: linear warmup to `lr`, then constant, linear or cosine decay."""
    if kind not in SCHEDULES:
        raise OptimizerConfigError(f"optim.schedule {kind!r} is not one of {SCHEDULES}")
    decay_steps = max(total_steps - warmup_steps, 1)
    end = lr * final_fraction
    if kind == "constant":
        after = optax.constant_schedule(lr)
    elif kind == "linear":
        after = optax.linear_schedule(lr, end, decay_steps)
    else:
        after = optax.cosine_decay_schedule(lr, decay_steps, alpha=final_fraction)
    if warmup_steps <= 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps), after], [warmup_steps])


def decay_mask(params: Any) -> Any:
    """True for weight matrices; False for norms, biases and gates."""

    def keep(path: tuple[Any, ...], _: Any) -> bool:
        names = path_names(path)
        return not any(n in NO_DECAY for n in names[-1:]) and "norm" not in names

    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(optim: Any, total_steps: int, schedule: Callable[[Any], Any] | None = None):
    """AdamW + clipping from an `optim` config section.

    Args:
      optim: has `lr`, `schedule`, `warmup_steps` (or `warmup_ratio`),
        `final_lr_fraction`, `weight_decay`, `b1`, `b2`, `eps`, `clip_norm`.
      total_steps: optimizer steps of the run (for decaying schedules).
      schedule: your own `step -> lr`; overrides the configured one.

    Returns:
      (optax.GradientTransformation, the schedule).
    """
    warmup = int(optim.warmup_steps or round(optim.warmup_ratio * total_steps))
    if schedule is None:
        schedule = make_schedule(optim.schedule, optim.lr, total_steps, warmup, optim.final_lr_fraction)
    parts = []
    if optim.clip_norm and optim.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(optim.clip_norm))
    parts.append(
        optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay, mask=decay_mask)
    )
    return optax.chain(*parts), schedule
