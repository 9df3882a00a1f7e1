"""Logical axis names for every weight, so sharding is a rule table.

`logical_axes(params)` maps each parameter path (`"layers/attn/q/w"`) to the
names of the logical array's axes: for a linear, the torch-layout `[out, in]`
matrix (an NF4Weight's packed codes and scales shard along `out` with it).
Names: `layers`, `vocab`, `embed`, `heads`, `kv_heads`, `mlp`, or None for an
axis that is never sharded.
"""

from __future__ import annotations

from typing import Any

from qst_jax.quant.nf4 import NF4Weight
from qst_jax.tree import flatten

# (parent module, param) -> axes of the per-layer array.
_LINEAR_AXES = {
    "q": ("heads", "embed"),
    "k": ("kv_heads", "embed"),
    "v": ("kv_heads", "embed"),
    "o": ("embed", "heads"),
    "gate": ("mlp", "embed"),
    "up": ("mlp", "embed"),
    "fc1": ("mlp", "embed"),
    "down": ("embed", "mlp"),
    "fc2": ("embed", "mlp"),
    "project_in": ("embed", None),
    "project_out": (None, "embed"),
    "lm_head": ("vocab", "embed"),
}


def axes_for(names: list[str], ndim: int) -> tuple[str | None, ...]:
    """Logical axes of the parameter at path `names` with `ndim` dims."""
    lead: tuple[str | None, ...] = ("layers",) if names and names[0] == "layers" else ()
    leaf = names[-1]
    parent = names[-2] if len(names) > 1 else ""
    if leaf == "embed" and len(names) == 1:
        axes: tuple[str | None, ...] = ("vocab", "embed")
    elif leaf == "pos_embed":
        axes = (None, "embed")
    elif leaf in ("scale", "bias"):
        axes = ("embed",)
    elif parent in _LINEAR_AXES and leaf == "w":
        axes = _LINEAR_AXES[parent]
    elif parent in _LINEAR_AXES and leaf == "b":
        axes = _LINEAR_AXES[parent][:1]
    else:
        axes = (None,) * (ndim - len(lead))
    axes = lead + axes
    if len(axes) != ndim:
        axes = axes[:ndim] + (None,) * (ndim - len(axes))
    return axes


def logical_axes(params: Any) -> dict[str, tuple[str | None, ...]]:
    """`{"path/to/param": axis names}` for every array or NF4Weight in `params`."""
    result = {}
    for key, leaf in flatten(params, is_leaf=lambda x: isinstance(x, NF4Weight)).items():
        ndim = len(leaf.lead_shape) + 2 if isinstance(leaf, NF4Weight) else len(leaf.shape)
        result[key] = axes_for(key.split("/"), ndim)
    return result
