"""The decoding engine's device programs: prefill, insert, generate over a `DecodeState` kept on the device.

    core = DecodeCore(model, bind, slots=8, max_len=512)
    state = core.init_state()
    prefix, first = core.prefill(backbone_params, model_params, ids, rows)   # rows: the admitted requests
    state = core.insert(state, prefix, first, rows)                          # one donated call for all of them
    state, tokens = core.generate(backbone_params, model_params, state)      # one step of every slot
    tokens.copy_to_host_async()                                              # `[slots]` int32: all that comes back

The core holds no Python state that changes per request: the scheduler
(`engine.Engine`) decides who runs where and reads back one small token
array per program. Everything a decode step needs stays on the device
between steps in `DecodeState` (caches, lengths, last tokens, each slot's
side route and sampling), so a step sends nothing from the host; the key
mask is `arange(max_len) <= length`, computed on the device rather than
held. Sampling runs inside prefill and generate, so a step is one jitted
call whose only output to the host is `[slots]` token ids.

`bind(model_params, route)` makes the method's params for rows routed
`route` `[R, 2]` (stack, index): for `methods.IndexedSides`, the side stacks
with the rows' routes; for a fixed method (QLoRA), its params unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qst_jax.generate.sampling import sample_rows
from qst_jax.models.layers import Params


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Rows:
    """What the scheduler says about `R` prefill rows (requests; padding rows have `slot == slots`).

    Attributes:
      slot: int32 `[R]`, the decode slot each row goes to (`slots`: a padding row, dropped by insert).
      length: int32 `[R]`, prompt tokens (1 for a padding row).
      route: int32 `[R, 2]`, (stack, index) of the row's side network ((-1, 0): the base model).
      seed: uint32 `[R]`, the sampling seed (a row's draws depend on it and the position only).
      temperature: float32 `[R]` (0: greedy); top_k: int32 `[R]` (0: all); top_p: float32 `[R]` (1: all).
    """

    slot: jax.Array
    length: jax.Array
    route: jax.Array
    seed: jax.Array
    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array

    @classmethod
    def padding(cls, rows: int, slots: int) -> Rows:
        """Host arrays for `rows` padding rows (greedy, base model, dropped by insert); fill the used ones in."""
        return cls(np.full(rows, slots, np.int32), np.ones(rows, np.int32), np.tile(np.int32([-1, 0]), (rows, 1)),
                   np.zeros(rows, np.uint32), np.zeros(rows, np.float32), np.zeros(rows, np.int32),
                   np.ones(rows, np.float32))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    """Every slot's decoding state, on the device (`S` slots, `M = max_len`).

    Invariants: a slot's cache positions `< length` hold its tokens (prompt,
    then completion); `last` is the token the next step feeds in, written at
    position `length`; `step` counts the tokens drawn for the slot (the
    sampler folds it into the seed's key). A free slot keeps decoding its
    old contents, masked to itself (its row costs what a busy one does and
    is never read); `length` stops at `M - 1`, so no write leaves the cache.

    Attributes:
      caches: the method's KV caches, every leaf `[L, S, M, ...]`.
      length: int32 `[S]`. last: int32 `[S]`. step: int32 `[S]`.
      route: int32 `[S, 2]`, each slot's (stack, index).
      seed: uint32 `[S]`; temperature: float32 `[S]`; top_k: int32 `[S]`; top_p: float32 `[S]`.
    """

    caches: Params
    length: jax.Array
    last: jax.Array
    step: jax.Array
    route: jax.Array
    seed: jax.Array
    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array


class DecodeCore:
    """The jitted prefill, insert and generate programs of one method (see the module docstring).

    Args:
      model: the method (`hidden`, `head`, `init_caches`).
      bind: `(model_params, route [R, 2]) -> params` for the method.
      slots: decode slots (rows of generate).
      max_len: tokens per slot.
    """

    def __init__(self, model: Any, bind: Callable[[Any, jax.Array], Params], *, slots: int, max_len: int):
        self.model, self.bind, self.slots, self.max_len = model, bind, slots, max_len
        self.prefill = jax.jit(self._prefill)
        self.insert = jax.jit(self._insert, donate_argnums=(0,))
        self.generate = jax.jit(self._generate, donate_argnums=(2,))

    def init_state(self) -> DecodeState:
        """Every slot free (length 0, greedy, the base model), with fresh caches."""
        s = self.slots
        zeros = lambda dtype=jnp.int32: jnp.zeros(s, dtype)  # noqa: E731 - one buffer each (all are donated)
        return DecodeState(self.model.init_caches(s, self.max_len), zeros(), zeros(), zeros(), jnp.tile(jnp.int32([-1, 0]), (s, 1)),
                           zeros(jnp.uint32), zeros(jnp.float32), zeros(), jnp.ones(s, jnp.float32))

    def _prefill(self, backbone_params: Params, model_params: Any, ids: jax.Array,
                 rows: Rows) -> tuple[Params, jax.Array]:
        """Caches `[L, R, T, ...]` of prompts `ids` `[R, T]` (left-aligned, `rows.length` tokens each), and the
        first token of each row `[R]`, sampled at step 0."""
        model = self.model
        mask = (jnp.arange(ids.shape[1])[None] < rows.length[:, None]).astype(jnp.int32)
        caches = model.init_caches(ids.shape[0], ids.shape[1])
        positions = jnp.maximum(jnp.cumsum(mask, -1) - 1, 0)
        params = self.bind(model_params, rows.route)
        o, caches = model.hidden(params, backbone_params, ids, mask, positions=positions, key_mask=mask,
                                 caches=caches, cache_index=jnp.int32(0))
        h = jnp.take_along_axis(o, (rows.length - 1)[:, None, None], axis=1)
        logits = model.head(params, backbone_params, h, mask[:, :1])[:, 0]
        first = sample_rows(logits, rows.seed, jnp.zeros_like(rows.length), rows.temperature, rows.top_k, rows.top_p)
        return caches, first

    def _insert(self, state: DecodeState, prefix: Params, first: jax.Array, rows: Rows) -> DecodeState:
        """`state` with row i of a prefill written into slot `rows.slot[i]` (padding rows dropped), all at once."""
        slot = rows.slot

        def put(cache: jax.Array, row: jax.Array) -> jax.Array:  # [L, S, M, ...] <- [L, R, T, ...] at (slot, :T)
            return cache.at[:, slot, : row.shape[2]].set(row.astype(cache.dtype), mode="drop")

        def set_rows(values: jax.Array, new: jax.Array) -> jax.Array:
            return values.at[slot].set(new.astype(values.dtype), mode="drop")

        return DecodeState(
            caches=jax.tree.map(put, state.caches, prefix), length=set_rows(state.length, rows.length),
            last=set_rows(state.last, first), step=set_rows(state.step, jnp.ones_like(first)),
            route=set_rows(state.route, rows.route), seed=set_rows(state.seed, rows.seed),
            temperature=set_rows(state.temperature, rows.temperature), top_k=set_rows(state.top_k, rows.top_k),
            top_p=set_rows(state.top_p, rows.top_p))

    def _generate(self, backbone_params: Params, model_params: Any,
                  state: DecodeState) -> tuple[DecodeState, jax.Array]:
        """One token for every slot: `(state after it, tokens [S] int32)`."""
        model = self.model
        write = state.length
        key_mask = (jnp.arange(self.max_len)[None] <= write[:, None]).astype(jnp.int32)
        ones = jnp.ones((self.slots, 1), jnp.int32)
        params = self.bind(model_params, state.route)
        o, caches = model.hidden(params, backbone_params, state.last[:, None], ones, positions=write[:, None],
                                 key_mask=key_mask, caches=state.caches, cache_index=write)
        logits = model.head(params, backbone_params, o, ones)[:, 0]
        tokens = sample_rows(logits, state.seed, state.step, state.temperature, state.top_k, state.top_p)
        state = dataclasses.replace(state, caches=caches, length=jnp.minimum(write + 1, self.max_len - 1),
                                    last=tokens, step=state.step + 1)
        return state, tokens


def bind_sides(stacks: tuple[Params, ...], route: jax.Array) -> Params:
    """`methods.IndexedSides`' params: the device stacks, and each row's (stack, index)."""
    return {"stacks": stacks, "group": route[:, 0], "index": route[:, 1]}


def bind_fixed(params: Params, route: jax.Array) -> Params:
    """A method whose every row runs the same params (QLoRA): the params, whatever the route."""
    del route
    return params

