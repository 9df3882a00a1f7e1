"""Meshes and partition rules: the same train step on one device or many.

Every weight carries logical axis names (`models.logical_axes`); a rule table
maps them to mesh axes (`data`, `fsdp`, `tensor`), so sharding a model is a
table, not a rewrite:

    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    backbone_sh = backbone_shardings(backbone.params, mesh)
    params = jax.device_put(backbone.params, backbone_sh)
    state_sh = replicated(state, mesh)  # or fsdp_shardings(state, mesh)
    step = make_train_step(model, tx, shardings=(state_sh, backbone_sh, batch_sharding(mesh)))

NF4 weights shard their packed codes and first-level scales together along
`out` (rows), as docs/nf4-format.md says; the in-axis's mesh axes move onto `out`
too, so every device holds 1/N of the 4-bit bytes. The nested (second-level)
scales are tiny and replicated, which is always correct whatever row
boundaries the shards have. Side params and optimizer state are replicated
(`replicated`) or split over `fsdp` (`fsdp_shardings`); batches shard their
batch axis over (`data`, `fsdp`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from qst_jax.errors import InputError
from qst_jax.models.axes import axes_for
from qst_jax.tree import path_names
from qst_jax.quant.nf4 import NF4Weight

MESH_AXES = ("data", "fsdp", "tensor")

DEFAULT_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "vocab": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "embed": ("fsdp",),
    "layers": (),
}


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, devices: list | None = None) -> Mesh:
    """A `(data, fsdp, tensor)` mesh over `devices` (default: all of them)."""
    devices = list(jax.devices() if devices is None else devices)
    if data * fsdp * tensor != len(devices):
        raise InputError(f"mesh {data}x{fsdp}x{tensor} needs {data * fsdp * tensor} devices, have {len(devices)}")
    return Mesh(np.asarray(devices).reshape(data, fsdp, tensor), MESH_AXES)


def mesh_axes_of(names: tuple[str | None, ...], rules: Mapping[str, tuple[str, ...]]) -> list[tuple[str, ...]]:
    return [tuple(rules.get(n, ())) if n else () for n in names]


def fit_spec(spec_axes: list[tuple[str, ...]], shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """A PartitionSpec using each dimension's mesh axes only where they divide it."""
    used: set[str] = set()
    parts = []
    for dim, axes in zip(shape, spec_axes):
        keep = []
        size = 1
        for axis in axes:
            n = mesh.shape[axis]
            if axis in used or n == 1 or dim % (size * n):
                continue
            keep.append(axis)
            size *= n
        used.update(keep)
        parts.append(tuple(keep) if len(keep) > 1 else (keep[0] if keep else None))
    return PartitionSpec(*parts)


def backbone_specs(params: Any, mesh: Any, rules: Mapping[str, tuple[str, ...]] = DEFAULT_RULES) -> Any:
    """PartitionSpecs for a backbone param tree, from the rule table; `mesh` needs only `.shape`.

    An NF4Weight leaf gets an NF4Weight of specs: `packed` and `absmax`
    split by rows (the in-axis's mesh axes move onto `out`), the nested
    absmax and offset (a few floats) replicated. Works on arrays and on
    `jax.ShapeDtypeStruct`s alike (`scripts/memory_plan.py`).
    """

    def one(path: tuple[Any, ...], leaf: Any) -> Any:
        names = path_names(path)
        if isinstance(leaf, NF4Weight):
            lead = len(leaf.lead_shape)
            axes = mesh_axes_of(axes_for(names, lead + 2), rules)
            row_spec = [()] * lead + [axes[lead] + axes[lead + 1], ()]
            nested = None if leaf.nested_absmax is None else PartitionSpec()
            offset = None if leaf.offset is None else PartitionSpec()
            return NF4Weight(fit_spec(row_spec, leaf.packed.shape, mesh), fit_spec(row_spec, leaf.absmax.shape, mesh),
                             nested, offset, shape=leaf.shape, blocksize=leaf.blocksize, dtype=leaf.dtype)
        return fit_spec(mesh_axes_of(axes_for(names, len(leaf.shape)), rules), leaf.shape, mesh)

    return jax.tree_util.tree_map_with_path(one, params, is_leaf=lambda x: isinstance(x, NF4Weight))


def backbone_shardings(params: Any, mesh: Mesh, rules: Mapping[str, tuple[str, ...]] = DEFAULT_RULES) -> Any:
    """NamedShardings for a backbone param tree (NF4Weight leaves included): `backbone_specs` on `mesh`."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), backbone_specs(params, mesh, rules),
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def replicated(tree: Any, mesh: Mesh) -> Any:
    return jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()), tree)


def fsdp_shardings(tree: Any, mesh: Mesh, axis: str = "fsdp", min_size: int = 1024) -> Any:
    """Shardings that split each leaf of `tree` over mesh axis `axis` (ZeRO-3 style).

    For the side params and optimizer state: each leaf with at least
    `min_size` elements is split along its largest dimension that the axis
    divides; smaller leaves, scalars and leaves with no such dimension are
    replicated. XLA gathers a split param where a step uses it and
    reduce-scatters its gradient, so the result equals the replicated step.
    """
    n = mesh.shape[axis]

    def one(leaf: Any) -> NamedSharding:
        shape = tuple(getattr(leaf, "shape", ()))
        if n == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
            return NamedSharding(mesh, PartitionSpec())
        dims = sorted((d for d, size in enumerate(shape) if size % n == 0), key=lambda d: -shape[d])
        if not dims:
            return NamedSharding(mesh, PartitionSpec())
        spec = [None] * len(shape)
        spec[dims[0]] = axis
        return NamedSharding(mesh, PartitionSpec(*spec))

    return jax.tree.map(one, tree)


def batch_sharding(mesh: Mesh, rules: Mapping[str, tuple[str, ...]] = DEFAULT_RULES) -> NamedSharding:
    """Batches `[A, B, ...]`: the micro-batch axis whole, B over the batch rule's axes."""
    axes = tuple(a for a in rules["batch"] if mesh.shape[a] > 1)
    return NamedSharding(mesh, PartitionSpec(None, axes if axes else None))


def place_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows of a global batch `[A, B, ...]`, as global arrays sharded by `batch_sharding`.

    Every process holds the same host batch; process i contributes rows
    `[i * B / P, (i + 1) * B / P)` of the batch axis.
    """
    sharding = batch_sharding(mesh)
    count, index = jax.process_count(), jax.process_index()

    def local(x: np.ndarray) -> jax.Array:
        rows = x.shape[1] // count
        return jax.make_array_from_process_local_data(sharding, x[:, index * rows : (index + 1) * rows])

    return jax.tree.map(local, batch)
