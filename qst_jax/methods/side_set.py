"""Several QST side networks over one backbone pass (sweeps, multi-side evaluation, mixed-batch generation).

The backbone is frozen and gets no gradient, so one forward pass of it can
feed any number of side networks: `SideSet` runs K members in the
`joint_pass` of `side_network.py`. Members whose side networks have the same
shape (every `SideConfig` field but the init-only ones) form a group: their
params are stacked on a leading member axis and run under `vmap`, with the
backbone states shared, not copied. Groups of other shapes run one after
another inside the same scan step.

    sides = SideSet(backbone.cfg, (SideConfig(), SideConfig(reduction_factor=8)))
    params = sides.init([key_a, key_b])            # a tuple per group, leaves [K_g, ...]
    totals, weight, aux = sides.losses(params, backbone.params, batch)   # totals [K]
    per_member = sides.unstack(params)              # each loadable as a QSTModel's params

(The engine serves many side networks a row each through
`indexed_sides.IndexedSides`.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from qst_jax.errors import InputError
from qst_jax.methods.base import score
from qst_jax.methods.losses import chunked_lm_loss, classification_loss, shift_targets
from qst_jax.methods.qst import QSTModel
from qst_jax.methods.side_config import SideConfig, init_only_fields, side_model_config
from qst_jax.methods.side_groups import StackedSides
from qst_jax.methods.side_network import joint_pass
from qst_jax.methods.side_params import init_side_params
from qst_jax.models.config import ConfigError, ModelConfig
from qst_jax.models.decoder import init_caches, lm_head
from qst_jax.models.layers import Params

def shape_of(side: SideConfig) -> SideConfig:
    """What decides a side network's forward and param shapes: `side` less its init-only fields."""
    blank = {f.name: f.default for f in dataclasses.fields(SideConfig) if f.name in init_only_fields()}  # one init
    return dataclasses.replace(side, **blank)


@dataclasses.dataclass(frozen=True)
class SideSet:
    """K QST side networks over one frozen backbone, one backbone pass for all.

    Attributes:
      cfg: the backbone's ModelConfig.
      members: each member's SideConfig (one task and label count for all).
      dtype, ce_chunk, remat_side, attention_impl, hidden_store: as `QSTModel`.

    Invariants: params are a tuple with one entry per group (`groups`), in
    group order; a group's leaves carry a leading axis of its member count.
    Outputs, losses and logits come in member order.
    """

    cfg: ModelConfig
    members: tuple[SideConfig, ...]
    dtype: Any = jnp.bfloat16
    ce_chunk: int = 1024
    remat_side: bool = True
    attention_impl: str | None = None
    hidden_store: str = "auto"

    def __post_init__(self) -> None:
        if not self.members:
            raise ConfigError("a SideSet needs at least one member")
        kinds = {(m.task, m.num_labels if m.task == "classification" else 0) for m in self.members}
        if len(kinds) > 1:
            raise ConfigError(f"side networks of one set must share the task and label count; got {sorted(kinds)}")

    @classmethod
    def of(cls, models: Sequence[QSTModel], names: Sequence[str] | None = None) -> SideSet:
        """The set of already built QST models (one backbone, one set of runtime options).

        Args:
          names: what to call each model in an error (default: "side network i").
        """
        if not models:
            raise ConfigError("a SideSet needs at least one member")
        names = list(names) if names is not None else [f"side network {i}" for i in range(len(models))]
        first = models[0]
        for name, m in zip(names, models, strict=True):
            if getattr(m, "name", None) != "qst":
                raise ConfigError(f"{name}: a {getattr(m, 'name', type(m).__name__)!r} model; "
                                  "several side networks over one backbone pass must all be QST")
            if m.cfg != first.cfg:
                raise ConfigError(f"{name} was trained on another backbone than {names[0]}")
        return cls(first.cfg, tuple(m.side for m in models), first.dtype, first.ce_chunk, first.remat_side,
                   first.attention_impl, first.hidden_store)

    # -- layout ----------------------------------------------------------------------
    @property
    def size(self) -> int:
        return len(self.members)

    @property
    def task(self) -> str:
        return self.members[0].task

    @property
    def num_labels(self) -> int:
        return self.members[0].num_labels

    @property
    def pool(self) -> str:
        """The members' classification pooling (one for all; a group's members always share theirs)."""
        pools = sorted({m.pool for m in self.members})
        if len(pools) > 1:
            raise ConfigError(f"these side networks pool differently ({', '.join(pools)}); route rows to one pooling")
        return pools[0]

    @property
    def groups(self) -> tuple[tuple[int, ...], ...]:
        """Member indices per group of one shape, groups in order of first appearance."""
        order: dict[SideConfig, list[int]] = {}
        for i, m in enumerate(self.members):
            order.setdefault(shape_of(m), []).append(i)
        return tuple(tuple(v) for v in order.values())

    def member(self, i: int) -> QSTModel:
        """Member `i` as a QSTModel (its export, a single run with its settings)."""
        return QSTModel(self.cfg, self.members[i], self.dtype, self.ce_chunk, self.remat_side, self.attention_impl,
                        self.hidden_store)

    def stack(self, member_params: Sequence[Params]) -> tuple[Params, ...]:
        """Per-member params (member order) as the set's grouped, stacked params."""
        if len(member_params) != self.size:
            raise InputError(f"{len(member_params)} param trees for {self.size} members")
        return tuple(jax.tree.map(lambda *xs: jnp.stack(xs), *[member_params[i] for i in g]) for g in self.groups)

    def unstack(self, params: tuple[Params, ...]) -> list[Params]:
        """The set's params as one tree per member (member order)."""
        out: list[Params] = [None] * self.size
        for g, group_params in zip(self.groups, params):
            for j, i in enumerate(g):
                out[i] = jax.tree.map(lambda x, j=j: x[j], group_params)
        return out

    def init(self, keys: Sequence[jax.Array]) -> tuple[Params, ...]:
        """Member i initialised from `keys[i]` exactly as `QSTModel.init` would."""
        return self.stack([init_side_params(self.cfg, m, k) for m, k in zip(self.members, keys, strict=True)])

    def in_member_order(self, per_group: Sequence[jax.Array]) -> jax.Array:
        """Per-group arrays with a leading `[K_g]` axis as one `[K, ...]` in member order."""
        flat = [i for g in self.groups for i in g]
        joined = jnp.concatenate(list(per_group), axis=0)
        return joined[jnp.argsort(jnp.asarray(flat))] if flat != sorted(flat) else joined

    # -- the pass ----------------------------------------------------------------------
    def outputs(self, params: tuple[Params, ...], backbone_params: Params, ids: jax.Array, mask: jax.Array, *,
                positions: jax.Array | None = None, key_mask: jax.Array | None = None,
                caches: Params | None = None, cache_index: jax.Array | None = None):
        """(Norm(h_L) `[B, T, d]`, o per group `[K_g, B, T, d]`, caches): one backbone pass."""
        groups = tuple(StackedSides(self.members[g[0]], p) for g, p in zip(self.groups, params))
        return joint_pass(backbone_params, self.cfg, groups, ids, mask, positions=positions, key_mask=key_mask,
                          caches=caches, cache_index=cache_index, dtype=self.dtype,
                          attention_impl=self.attention_impl, remat_side=self.remat_side,
                          hidden_store=self.hidden_store)

    def init_caches(self, batch: int, length: int) -> Params:
        """Empty KV caches: the backbone's, and each group's `[L, K_g, B, length, ...]`."""
        side = []
        for g in self.groups:
            kv = init_caches(side_model_config(self.cfg, self.members[g[0]]), batch, length, self.dtype)
            side.append(jax.tree.map(lambda x, n=len(g): jnp.zeros((x.shape[0], n, *x.shape[1:]), x.dtype), kv))
        return {"backbone": init_caches(self.cfg, batch, length, self.dtype), "side": tuple(side)}

    def losses(self, params: tuple[Params, ...], backbone_params: Params, batch: dict[str, jax.Array], *,
               include_base: bool = False):
        """Every member's loss sum over one batch from one backbone pass.

        Returns:
          (loss sums `[K]` float32 (`[K + 1]`, the frozen backbone's first,
          with `include_base` for LM), weight sum (shared), aux: `correct`
          `[K]` for classification).
        """
        base, outs, _ = self.outputs(params, backbone_params, batch["input_ids"], batch["attention_mask"])
        if self.task == "lm":
            targets, weights = shift_targets(batch["input_ids"], batch["loss_mask"])
            head = lambda h: lm_head(backbone_params, self.cfg, h)  # noqa: E731
            member_loss = lambda o: chunked_lm_loss(o, head, targets, weights, self.ce_chunk, True)[0]  # noqa: E731
            totals = self.in_member_order([jax.vmap(member_loss)(o) for o in outs])
            if include_base:
                totals = jnp.concatenate([member_loss(base)[None], totals])
            return totals, jnp.sum(weights), {}
        logits = self._class_logits(params, outs, batch["attention_mask"])
        totals, count = jax.vmap(lambda lg: classification_loss(lg, batch["labels"], batch["example_mask"]))(logits)
        if logits.shape[-1] > 1:
            hits = (jnp.argmax(logits, -1) == batch["labels"][None]) * batch["example_mask"][None]
            correct = jnp.sum(hits, axis=-1).astype(jnp.float32)
        else:
            correct = jnp.zeros((self.size,), jnp.float32)
        return totals, count[0], {"correct": correct}

    def logits(self, params: tuple[Params, ...], backbone_params: Params, ids: jax.Array, mask: jax.Array, *,
               last_only: bool = False) -> jax.Array:
        """Float32 logits per member `[K, B, ...]`: classes (classification) or vocab (lm; the
        frozen backbone's first, `[K + 1, B, T or 1, V]`; `last_only`: the last position only)."""
        base, outs, _ = self.outputs(params, backbone_params, ids, mask)
        if self.task == "lm":
            states = jnp.concatenate([base[None], self.in_member_order(outs)])
            if last_only:
                states = states[:, :, -1:]
            return lm_head(backbone_params, self.cfg, states).astype(jnp.float32)
        return self._class_logits(params, outs, mask)

    def _class_logits(self, params: tuple[Params, ...], outs: list[jax.Array], mask: jax.Array) -> jax.Array:
        """Every member's score head on its own output: float32 `[K, B, C]` in member order."""
        pools = [self.members[g[0]].pool for g in self.groups]
        return self.in_member_order([jax.vmap(lambda p, o, pool=pool: score(p, o, mask, pool))(p, o)
                                     for p, o, pool in zip(params, outs, pools)])
