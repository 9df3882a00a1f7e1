"""Placing a backbone on a mesh while it streams in: each device gets its shard only.

The loader (`models.loader.read_params`) reads and quantizes one layer at a
time on the host. With a mesh it hands each piece to a `ShardedPlacement`
instead of stacking it on the host:

  * whole arrays (embeddings, final norm, LM head) go straight to their
    shards through `jax.make_array_from_callback`, so each device (and, on
    several hosts, each process) receives only the slices it owns;
  * each layer is placed the same way, then written into its slot of the
    stacked `[layers, ...]` array, which was allocated sharded on the devices
    and is updated in place (the update donates it).

So the host holds at most one layer's float copy plus its 4-bit result, and a
device holds its shard of the stacked model plus its shard of one layer, never
the whole model. Shardings come from the same rule table as
`sharding.backbone_shardings`, so the result is identical to loading on one
device and calling `jax.device_put(params, backbone_shardings(params, mesh))`.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from qst_jax.parallel.sharding import DEFAULT_RULES, backbone_shardings


def put(host: Any, sharding: NamedSharding) -> jax.Array:
    """A global array from a host array: each addressable device gets its slice only."""
    host = np.asarray(host)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _without_lead(sharding: NamedSharding) -> NamedSharding:
    """The sharding of one layer of a stacked leaf (its spec less the `layers` entry)."""
    spec = tuple(sharding.spec)
    return NamedSharding(sharding.mesh, PartitionSpec(*spec[1:]))


@functools.cache
def _zeros(shape: tuple[int, ...], dtype: Any, sharding: NamedSharding):
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)


@functools.cache
def _writer(sharding: NamedSharding):
    """`(stacked, layer, index) -> stacked` with `layer` written at `index`, in place."""

    def write(stacked: jax.Array, layer: jax.Array, index: jax.Array) -> jax.Array:
        return jax.lax.dynamic_update_index_in_dim(stacked, layer.astype(stacked.dtype), index, 0)

    return jax.jit(write, donate_argnums=0, out_shardings=sharding)


class ShardedPlacement:
    """Receives a backbone piece by piece from the loader; returns sharded params.

    Args:
      mesh: the device mesh (`sharding.make_mesh`).
      rules: logical axis -> mesh axes (default `sharding.DEFAULT_RULES`).

    Invariant: after `finish`, the tree equals the host-loaded params placed
    with `backbone_shardings(params, mesh, rules)`, value for value and
    sharding for sharding.
    """

    def __init__(self, mesh: Mesh, rules: Mapping[str, tuple[str, ...]] = DEFAULT_RULES):
        self.mesh, self.rules = mesh, rules
        self._stacked: Any = None
        self._shardings: Any = None

    def place(self, tree: dict[str, Any]) -> dict[str, Any]:
        """Places the top-level entries (`embed`, `final_norm`, `lm_head`, ...) on their shards."""
        return jax.tree.map(put, tree, backbone_shardings(tree, self.mesh, self.rules))

    def add_layer(self, index: int, num_layers: int, layer: Any) -> None:
        """Writes host layer `index` (of `num_layers`) into the stacked, sharded params."""
        if self._stacked is None:
            abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct((num_layers, *np.shape(x)), np.asarray(x).dtype),
                                    layer)
            self._shardings = backbone_shardings({"layers": abstract}, self.mesh, self.rules)["layers"]
            self._stacked = jax.tree.map(lambda a, s: _zeros(a.shape, a.dtype, s)(), abstract, self._shardings)
        index_array = jnp.asarray(index, jnp.int32)

        def write(stacked: jax.Array, host: Any, sharding: NamedSharding) -> jax.Array:
            return _writer(sharding)(stacked, put(host, _without_lead(sharding)), index_array)

        self._stacked = jax.tree.map(write, self._stacked, layer, self._shardings)

    def finish(self) -> Any:
        """The stacked layers (block until every write has landed)."""
        return jax.block_until_ready(self._stacked)
