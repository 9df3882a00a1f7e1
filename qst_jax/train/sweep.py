"""A sweep: K QST side networks trained on the same batches, one backbone pass per micro-batch.

    members = plan_members(config, tx=[tx_a, tx_b])        # or config.sweep.lr = "1e-4,3e-4"
    sides = SideSet(backbone.cfg, tuple(m.side for m in members))
    state = init_sweep_state(sides, [m.tx for m in members], [m.seed for m in members], seed=0)
    step = make_sweep_step(sides, [m.tx for m in members])
    state, metrics = step(state, backbone.params, batch)   # metrics["loss"] is [K]

Each member has its own optimizer (any optax transformation), schedule,
init seed and, optionally, side shape; `SideSet` batches members of one shape
under `vmap`. The gradient of the summed member losses is each member's own
gradient (member i's loss depends only on its params; the backbone gets
none), so a member's params follow exactly the updates a single run with its
settings would make on the same batches.

A member whose loss or gradient norm turns non-finite is frozen inside the
step: its params and optimizer state stay those of its last finite step,
`alive` turns false, and the others train on. The trainer reports it by
name; the sweep stops only when every member is frozen.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from qst_jax.methods.build import method_record
from qst_jax.methods.side_config import SideConfig
from qst_jax.methods.side_set import SideSet
from qst_jax.models.config import ConfigError
from qst_jax.train.config import SWEEP_KEYS, validate
from qst_jax.train.optim import make_optimizer
from qst_jax.train.step import accumulate_gradients


@dataclasses.dataclass
class Member:
    """One member of a sweep.

    Attributes:
      name: its directory under `members/` and its tag in metrics.
      config: the run config with the member's values (what a single run with its settings would use).
      side: its SideConfig.
      tx: its optax transformation; schedule: its `step -> lr` (None: unknown, for your own tx).
      seed: its init seed.
      from_config: its tx is the configured AdamW (sized by `with_total_steps`), over
        `given_schedule` when you gave one.
    """

    name: str
    config: Any
    side: SideConfig
    tx: optax.GradientTransformation
    schedule: Callable[[Any], Any] | None
    seed: int
    from_config: bool = False
    given_schedule: Callable[[Any], Any] | None = None


def is_sweep(config: Any, tx: Any = None, schedule: Any = None) -> bool:
    """Whether a run trains several members: a swept config key, or a list/dict of tx or schedules."""
    listed = any(_listed(x) for x in (tx, schedule))
    return listed or any(str(config.sweep[k]).strip() for k in SWEEP_KEYS)


def _listed(value: Any) -> bool:
    """A list/tuple/dict of several values (an optax transformation is a tuple, but one value)."""
    single = hasattr(value, "init") and hasattr(value, "update")
    return isinstance(value, list | tuple | Mapping) and not single


def _parse(key: str, text: str, like: Any) -> list[Any]:
    values = []
    for item in (v.strip() for v in str(text).split(",")):
        if not item:
            raise ConfigError(f"bad config:\n  sweep.{key}: {text!r} has an empty value")
        try:
            values.append(type(like)(item) if not isinstance(like, bool | float) else float(item))
        except ValueError:
            raise ConfigError(f"bad config:\n  sweep.{key}: {item!r} is not a {type(like).__name__}") from None
    return values


def _swept(config: Any) -> list[dict[str, tuple[str, Any]]]:
    """Per member: {sweep key: (the value as given, the parsed value)}; [] when nothing is swept."""
    columns = {}
    for key, target in SWEEP_KEYS.items():
        text = str(config.sweep[key]).strip()
        if text:
            section, name = target.split(".")
            parsed = _parse(key, text, config[section][name])
            columns[key] = list(zip([v.strip() for v in text.split(",")], parsed))
    if not columns:
        return []
    if config.sweep.mode == "grid":
        return [dict(zip(columns, combo)) for combo in itertools.product(*columns.values())]
    lengths = {k: len(v) for k, v in columns.items() if len(v) > 1}
    if len(set(lengths.values())) > 1:
        raise ConfigError("bad config:\n  sweep: zipped keys have different lengths "
                          f"({', '.join(f'{k}: {n}' for k, n in lengths.items())}); use sweep.mode=grid for "
                          "every combination")
    k = max(lengths.values(), default=1)
    return [{key: (col[i] if len(col) > 1 else col[0]) for key, col in columns.items()} for i in range(k)]


def _as_list(value: Any, what: str) -> tuple[list[str] | None, list[Any] | None]:
    if not _listed(value):
        return None, None
    if isinstance(value, Mapping):
        return [str(k) for k in value], list(value.values())
    return [f"{what}{i}" for i in range(len(value))], list(value)


def plan_members(config: Any, tx: Any = None, schedule: Any = None, total_steps: int = 1) -> list[Member]:
    """The sweep's members from `config.sweep` and/or lists (or name -> value dicts) of tx or schedules.

    Lists and swept keys are zipped: they must have one length (a single
    value of either applies to every member).

    Raises:
      ConfigError: a value that does not parse, lengths that do not zip, or
        a member whose config is invalid (named).
    """
    rows = _swept(config)
    swept = set(rows[0]) if rows else set()
    optim_keys = sorted(k for k in swept if SWEEP_KEYS[k].startswith("optim."))
    schedule_keys = sorted(set(optim_keys) & {"lr", "schedule", "warmup_steps", "warmup_ratio", "final_lr_fraction"})
    if tx is not None and optim_keys:
        raise ConfigError(f"bad config:\n  sweep.{optim_keys[0]}: sweeps the configured optimizer, which tx= "
                          "replaces; sweep your transformations as a list or dict instead")
    if schedule is not None and schedule_keys:
        raise ConfigError(f"bad config:\n  sweep.{schedule_keys[0]}: sweeps the configured schedule, which "
                          "schedule= replaces; sweep your schedules as a list or dict instead")
    tx_names, txs = _as_list(tx, "tx")
    sched_names, schedules = _as_list(schedule, "schedule")
    lengths = {n: len(v) for n, v in (("config.sweep", rows), ("tx", txs), ("schedule", schedules)) if v}
    if len(set(lengths.values())) > 1:
        raise ConfigError("bad config:\n  sweep: " + ", ".join(f"{n} gives {k} members" for n, k in lengths.items())
                          + "; they are zipped, so they must agree")
    k = max(lengths.values(), default=1)
    members = []
    for i in range(k):
        row = rows[i] if rows else {}
        parts = [f"{key}={given}" for key, (given, _) in row.items()]
        parts += [names[i] for names in (tx_names, sched_names) if names and not rows]
        name = "_".join(parts).replace("/", "-") or f"m{i}"
        member_config = copy.deepcopy(config)
        with member_config.unlocked():
            for key in SWEEP_KEYS:
                member_config.sweep[key] = ""
            for key, (_, value) in row.items():
                section, field = SWEEP_KEYS[key].split(".")
                member_config[section][field] = value
        try:
            validate(member_config)
        except ConfigError as err:
            raise ConfigError(str(err).replace("bad config:", f"bad config of sweep member {name}:", 1)) from None
        member_tx = txs[i] if txs else tx  # one tx or schedule given for a swept config: every member's
        given = schedules[i] if schedules else schedule
        member_schedule, from_config = given, member_tx is None
        if from_config:
            member_tx, member_schedule = make_optimizer(member_config.optim, total_steps, given)
        record = method_record(member_config)
        side = SideConfig.from_dict(record["side"], task=record["task"], num_labels=record["num_labels"])
        members.append(Member(name, member_config, side, member_tx, member_schedule, int(member_config.train.seed),
                              from_config, given if from_config else None))
    names = [m.name for m in members]
    if len(set(names)) != len(names):
        raise ConfigError(f"bad config:\n  sweep: members share a name ({names}); give tx/schedule as a dict "
                          "of names")
    return members


def with_total_steps(members: Sequence[Member], total_steps: int) -> list[Member]:
    """The members with the optimizers they build from their config sized for `total_steps` (schedules' length)."""
    out = []
    for m in members:
        if m.from_config:
            tx, schedule = make_optimizer(m.config.optim, total_steps, m.given_schedule)
            m = dataclasses.replace(m, tx=tx, schedule=schedule)
        out.append(m)
    return out


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SweepState:
    """Everything a sweep changes.

    Attributes:
      step: int32 scalar, optimizer steps taken.
      params: the SideSet's params (a tuple per group, leaves `[K_g, ...]`).
      opt_states: each member's optimizer state (member order).
      rng: a PRNG key, advanced once per step.
      alive: bool `[K]`: false once the member went non-finite (its params are frozen since).
    """

    step: jax.Array
    params: Any
    opt_states: tuple[Any, ...]
    rng: jax.Array
    alive: jax.Array


def init_sweep_state(sides: SideSet, txs: Sequence[optax.GradientTransformation], seeds: Sequence[int],
                     seed: int) -> SweepState:
    """Member i initialised as a single run with `train.seed = seeds[i]` would be (`init_train_state`)."""
    keys = [jax.random.split(jax.random.PRNGKey(s))[0] for s in seeds]
    params = sides.init(keys)
    per_member = sides.unstack(params)
    opt_states = tuple(tx.init(p) for tx, p in zip(txs, per_member, strict=True))
    return SweepState(step=jnp.zeros((), jnp.int32), params=params, opt_states=opt_states,
                      rng=jax.random.split(jax.random.PRNGKey(seed))[1], alive=jnp.ones((sides.size,), bool))


class _SummedLoss:
    """`loss(params, backbone, batch)` of the summed member losses, aux the per-member sums (for the scan)."""

    def __init__(self, sides: SideSet):
        self.sides = sides

    def loss(self, params: Any, backbone_params: Any, batch: dict[str, jax.Array]):
        totals, weight, aux = self.sides.losses(params, backbone_params, batch)
        return jnp.sum(totals), (weight, {"member_loss": totals, **aux})


def make_sweep_step(sides: SideSet, txs: Sequence[optax.GradientTransformation], *, donate: bool = True,
                    compiler_options: dict[str, Any] | None = None):
    """A jitted `(state, backbone_params, batch) -> (state, metrics)` for the whole sweep.

    `compiler_options`: as `make_train_step`'s.

    Metrics: `loss`, `grad_norm`, `finite` (float32 `[K]`), `alive` (bool
    `[K]`, after this step), `weight` (shared), and `correct` `[K]` for
    classification.
    """

    def step(state: SweepState, backbone_params: Any, batch: dict[str, jax.Array]):
        grads, _, weight, aux = accumulate_gradients(_SummedLoss(sides), state.params, backbone_params, batch)
        denom = jnp.maximum(weight, 1.0)
        totals = aux.pop("member_loss") / denom
        member_grads = [jax.tree.map(lambda g: g / denom, g) for g in sides.unstack(grads)]
        member_params = sides.unstack(state.params)
        new_params, new_opt, norms, finite = [], [], [], []
        for i, (tx, g, p, opt) in enumerate(zip(txs, member_grads, member_params, state.opt_states, strict=True)):
            updates, opt_i = tx.update(g, opt, p)
            norm = optax.tree.norm(g)
            ok = state.alive[i] & jnp.isfinite(totals[i]) & jnp.isfinite(norm)
            keep = lambda new, old, ok=ok: jnp.where(ok, new, old)  # noqa: E731
            new_params.append(jax.tree.map(keep, optax.apply_updates(p, updates), p))
            new_opt.append(jax.tree.map(keep, opt_i, opt))
            norms.append(norm)
            finite.append(jnp.isfinite(totals[i]) & jnp.isfinite(norm))
        finite = jnp.stack(finite)
        alive = state.alive & finite
        rng, _ = jax.random.split(state.rng)
        new_state = SweepState(step=state.step + 1, params=sides.stack(new_params), opt_states=tuple(new_opt),
                               rng=rng, alive=alive)
        metrics = {"loss": totals, "grad_norm": jnp.stack(norms), "finite": finite.astype(jnp.float32),
                   "alive": alive, "weight": weight, **aux}
        return new_state, metrics

    return jax.jit(step, donate_argnums=(0,) if donate else (), compiler_options=compiler_options)
