"""Pytree path helpers shared by every room: names of a path, set a nested value, flatten and unflatten.

Params are nested dicts of arrays (and `NF4Weight`s). Their paths are written
as `/`-joined names (`"layers/attn/q/w"`): that is how they appear in logical
axis tables, in exported `side.safetensors` files and in error messages.

This module imports nothing of qst_jax, so every package may use it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax

SEPARATOR = "/"


def path_names(path: Iterable[Any]) -> list[str]:
    """The names of a `jax.tree_util` key path: dict keys, attribute names or indices, as strings."""
    names = []
    for entry in path:
        key = getattr(entry, "key", None)
        if key is None:
            key = getattr(entry, "name", None)
        if key is None:
            key = getattr(entry, "idx", entry)
        names.append(str(key))
    return names


def set_path(tree: dict[str, Any], path: Iterable[str], value: Any) -> None:
    """`tree[p0][p1]...[pn] = value`, creating the dicts on the way."""
    *parents, last = list(path)
    for name in parents:
        tree = tree.setdefault(name, {})
    tree[last] = value


def flatten(tree: Any, is_leaf: Callable[[Any], bool] | None = None) -> dict[str, Any]:
    """`{"a/b/c": leaf}` of every leaf of `tree`, in the tree's order."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return {SEPARATOR.join(path_names(path)): leaf for path, leaf in leaves}


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """The nested dict of `{"a/b/c": leaf}` (the inverse of `flatten` for trees of dicts)."""
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        set_path(tree, key.split(SEPARATOR), value)
    return tree


def count_params(tree: Any) -> int:
    """Number of scalars in the leaves of `tree`."""
    return int(sum(x.size for x in jax.tree_util.tree_leaves(tree)))


def first_non_finite(tree: Any) -> str | None:
    """The `"a/b/c"` key of the first floating-point leaf holding a NaN or an infinity (None: every one is finite).

    Integer leaves (NF4 codes, steps) are skipped; each leaf is checked with
    one reduction, so a large tree costs one pass over its bytes.
    """
    jnp = jax.numpy
    for key, leaf in flatten(tree).items():
        dtype = getattr(leaf, "dtype", None)
        if dtype is not None and jnp.issubdtype(dtype, jnp.inexact) and not bool(jnp.isfinite(jnp.asarray(leaf)).all()):
            return key
    return None
