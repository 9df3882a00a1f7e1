"""Groups of many side networks over one backbone pass (the `SideGroup`s beside `side_network.OneSide`).

`StackedSides`: K members of one shape, params stacked on a leading member
axis and run under `vmap`, h_i shared (not copied): sweeps and multi-side
evaluation (`side_set.SideSet`). `RowSides`: row b runs member `index[b]` of a
stack: serving many side networks at once (`indexed_sides.IndexedSides`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from qst_jax.methods.side_config import SideConfig
from qst_jax.methods.side_network import SideRun
from qst_jax.methods.side_params import PER_LAYER
from qst_jax.models.layers import Params


@dataclasses.dataclass(frozen=True)
class StackedSides:
    """K side networks of one shape, every param leaf `[K, ...]`; outputs `[K, B, T, d]`."""

    side: SideConfig
    params: Params

    @property
    def members(self) -> int:
        return self.params["gates"].shape[0]

    def init(self, h0: jax.Array, run: SideRun) -> tuple[jax.Array, Any]:
        first_down = jax.tree.map(lambda x: x[:, 0], self.params["down"])
        s0 = jax.vmap(run.layer(self.side).down, in_axes=(0, None), axis_size=self.members)(first_down, h0)
        by_layer = jax.tree.map(lambda x: jnp.moveaxis(x, 1, 0), tuple(self.params[k] for k in PER_LAYER))
        return s0, by_layer  # leaves [L, K, ...]: the scan slices layers, each slice keeps its members

    def step(self, xs: Any, h: jax.Array, s: jax.Array, kv: Params | None,
             run: SideRun) -> tuple[jax.Array, Params | None]:
        down, gate, layer = xs
        members_layer = jax.vmap(run.layer(self.side), in_axes=(0, 0, 0, None, 0, 0), axis_size=self.members)
        return members_layer(layer, down, gate, h, s, kv)

    def finish(self, base: jax.Array, s_last: jax.Array, run: SideRun) -> jax.Array:
        return jax.vmap(run.layer(self.side).mix, in_axes=(None, 0, 0))(base, self.params, s_last)


@dataclasses.dataclass(frozen=True)
class RowSides:
    """Row b through member `index[b]` of `stack` (leaves `[K, ...]`); outputs `[B, T, d]`.

    Each layer gathers its rows' params from the stack by (index, layer):
    the scan's per-layer inputs are the layer numbers and the stack stays as
    it is, so a step reads B members' layer whatever K is (moving the stack
    to layer-major order would copy all K members every call). The side
    layer runs under `vmap` over rows, each row a batch of one with its own
    mask, RoPE and cache slot; the carried side state is `[B, 1, T, d/r]`.
    """

    side: SideConfig
    stack: Params
    index: jax.Array  # int32 [B]

    def _of_rows(self, tree: Params, layer: jax.Array | int) -> Params:
        return jax.tree.map(lambda x: x[self.index, layer], tree)  # leaves [B, ...]

    def init(self, h0: jax.Array, run: SideRun) -> tuple[jax.Array, Any]:
        s0 = jax.vmap(run.layer(self.side).down)(self._of_rows(self.stack["down"], 0), h0[:, None])
        return s0, jnp.arange(self.stack["gates"].shape[1], dtype=jnp.int32)

    def step(self, xs: Any, h: jax.Array, s: jax.Array, kv: Params | None,
             run: SideRun) -> tuple[jax.Array, Params | None]:
        layer = xs
        side_layer = run.layer(self.side)
        ctx = side_layer.ctx
        rows = self.index.shape[0]
        row_ctx = dataclasses.replace(
            ctx, mask=ctx.mask[:, None],
            cache_index=None if ctx.cache_index is None else jnp.broadcast_to(ctx.cache_index, (rows,)),
            rope=None if ctx.rope is None else tuple(r[:, None] for r in ctx.rope))
        kv_rows = None if kv is None else jax.tree.map(lambda x: x[:, None], kv)
        s, kv_rows = jax.vmap(side_layer)(self._of_rows(self.stack["layers"], layer),
                                          self._of_rows(self.stack["down"], layer),
                                          self.stack["gates"][self.index, layer], h[:, None], s, kv_rows, row_ctx)
        return s, None if kv_rows is None else jax.tree.map(lambda x: x[:, 0], kv_rows)

    def finish(self, base: jax.Array, s_last: jax.Array, run: SideRun) -> jax.Array:
        once = jax.tree.map(lambda x: x[self.index], {k: v for k, v in self.stack.items() if k not in PER_LAYER})
        return jax.vmap(run.layer(self.side).mix)(base[:, None], once, s_last)[:, 0]
