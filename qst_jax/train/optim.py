"""Optimizers and learning-rate schedules from config, or your own.

`make_optimizer(cfg)` builds AdamW with gradient-norm clipping and a schedule
(constant, linear, cosine, each with linear warmup). To bring your own:

    tx = make_optimizer(cfg, schedule=my_schedule)   # your optax schedule
    tx = my_gradient_transformation                   # or any optax transform

and pass `tx` to `make_train_step` / `Trainer`. Any `optax.GradientTransformation`
works; schedules are plain `step -> lr` callables.

Parameter groups: `optim.readout_lr` (the score head and QST's up-projection)
and `optim.gate_lr` (QST's gates), when > 0, give that group its own peak
learning rate: the same schedule scaled by `group_lr / optim.lr`, through
`optax.multi_transform`. 0 (the default) keeps one AdamW for every param.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

from qst_jax.errors import QSTError
from qst_jax.tree import path_names

SCHEDULES = ("constant", "linear", "cosine")
NO_DECAY = ("scale", "bias", "b", "gates", "out_gate")
# group -> (its optim key, the top-level param keys it holds); every other param is in "rest"
PARAM_GROUPS = {"readout": ("readout_lr", ("score", "up")), "gates": ("gate_lr", ("gates", "out_gate"))}


class OptimizerConfigError(QSTError, ValueError):
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


def param_groups(params: Any) -> Any:
    """Each leaf's group name: "readout", "gates" (PARAM_GROUPS, by top-level key) or "rest"."""

    def group(path: tuple[Any, ...], _: Any) -> str:
        top = path_names(path)[0]
        return next((g for g, (_, keys) in PARAM_GROUPS.items() if top in keys), "rest")

    return jax.tree_util.tree_map_with_path(group, params)


def group_lrs(optim: Any) -> dict[str, float]:
    """The groups given their own peak learning rate (`optim.<group>_lr` > 0), by group name."""
    rates = {g: float(getattr(optim, key, 0.0) or 0.0) for g, (key, _) in PARAM_GROUPS.items()}
    return {g: lr for g, lr in rates.items() if lr > 0}


def make_optimizer(optim: Any, total_steps: int, schedule: Callable[[Any], Any] | None = None):
    """AdamW + clipping from an `optim` config section.

    Args:
      optim: has `lr`, `schedule`, `warmup_steps` (or `warmup_ratio`),
        `final_lr_fraction`, `weight_decay`, `b1`, `b2`, `eps`, `clip_norm`.
      total_steps: optimizer steps of the run (for decaying schedules).
      schedule: your own `step -> lr`; overrides the configured one. A
        group with its own rate (`readout_lr`, `gate_lr`) follows it scaled
        by `group_lr / optim.lr`.

    Returns:
      (optax.GradientTransformation, the schedule of the "rest" group). The
      clipping is over the global norm of every group's gradient together.
    """
    warmup = int(optim.warmup_steps or round(optim.warmup_ratio * total_steps))
    if schedule is None:
        schedule = make_schedule(optim.schedule, optim.lr, total_steps, warmup, optim.final_lr_fraction)

    def adamw(sched: Callable[[Any], Any]) -> optax.GradientTransformation:
        return optax.adamw(sched, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay,
                           mask=decay_mask)

    parts = []
    if optim.clip_norm and optim.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(optim.clip_norm))
    own = group_lrs(optim)
    if own:
        scaled = {g: _scaled(schedule, lr / optim.lr) for g, lr in own.items()}
        parts.append(optax.multi_transform({"rest": adamw(schedule), **{g: adamw(s) for g, s in scaled.items()}},
                                           lambda params: jax.tree.map(lambda g: g if g in own else "rest",
                                                                       param_groups(params))))
    else:
        parts.append(adamw(schedule))
    return optax.chain(*parts), schedule


def _scaled(schedule: Callable[[Any], Any], factor: float) -> Callable[[Any], Any]:
    return lambda step: schedule(step) * factor
