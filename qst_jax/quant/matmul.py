"""The one matmul entry point for frozen weights: `x @ W.T`, W dense or NF4.

Every linear layer of the backbone and of the side network calls `matmul`.
The reference path dequantizes the NF4 weight (float32 math, one rounding to
the compute dtype) and calls `lax.dot_general`; inside a `lax.scan` over
stacked layers only one layer's dequantized weight is alive at a time. A fused
GPU kernel can be dispatched from here later without touching any caller.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Union

import jax
import jax.numpy as jnp

from qst_jax.quant.nf4 import NF4Weight



@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoRAWeight:
    """A frozen weight plus a trainable low-rank update: `W + scale * B @ A`.

    Attributes:
      base: the frozen `[out, in]` weight (dense or NF4).
      a: `[rank, in]` (float32 master copy; cast to the compute dtype).
      b: `[out, rank]`, initialised to zeros so training starts at `W`.
      scale: static `alpha / rank`.
    """

    base: Any
    a: jax.Array
    b: jax.Array
    scale: float = dataclasses.field(metadata={"static": True}, default=1.0)


Weight = Union[jax.Array, NF4Weight, LoRAWeight]
"""A torch-layout `[out, in]` weight: dense, NF4, or either with a LoRA update."""


def weight_shape(w: Weight) -> tuple[int, int]:
    """`(out, in)` of a single (unstacked) weight."""
    if isinstance(w, NF4Weight):
        return w.shape
    if isinstance(w, LoRAWeight):
        return weight_shape(w.base)
    return tuple(w.shape[-2:])  # type: ignore[return-value]


def materialize(w: Weight, dtype: Any) -> jax.Array:
    """The weight as a dense `[out, in]` array in `dtype`."""
    if isinstance(w, NF4Weight):
        return w.dequantize(dtype)
    if isinstance(w, LoRAWeight):
        delta = w.scale * (w.b.astype(jnp.float32) @ w.a.astype(jnp.float32))
        return (materialize(w.base, jnp.float32) + delta).astype(dtype)
    return w.astype(dtype)


def matmul(x: jax.Array, w: Weight, *, precision: Any = None) -> jax.Array:
    """Computes `x @ w.T` with contraction over `in`.

    Args:
      x: `[..., in]` activations; their dtype is the compute dtype.
      w: `[out, in]` weight, dense or NF4 (no leading stacked axes).
      precision: passed to `lax.dot_general`.

    Returns:
      `[..., out]` in `x.dtype`.
    """
    out_dim, in_dim = weight_shape(w)
    if x.shape[-1] != in_dim:
        raise ValueError(f"matmul: x has {x.shape[-1]} features, weight expects {in_dim} (shape {(out_dim, in_dim)})")
    if isinstance(w, LoRAWeight):
        low_rank = _dot(_dot(x, w.a.astype(x.dtype), precision), w.b.astype(x.dtype), precision)
        return _dot(x, materialize(w.base, x.dtype), precision) + (w.scale * low_rank).astype(x.dtype)
    return _dot(x, materialize(w, x.dtype), precision)


def _dot(x: jax.Array, w: jax.Array, precision: Any) -> jax.Array:
    """`x @ w.T` for a dense `[out, in]` w."""
    return jax.lax.dot_general(
        x,
        w,
        dimension_numbers=(((x.ndim - 1,), (1,)), ((), ())),
        precision=precision,
        preferred_element_type=x.dtype,
    )


def linear(x: jax.Array, w: Weight, bias: jax.Array | None = None) -> jax.Array:
    """`x @ w.T + bias`, the bias cast to `x.dtype`."""
    y = matmul(x, w)
    if bias is not None:
        y = y + bias.astype(y.dtype)
    return y


__all__ = ["LoRAWeight", "Weight", "linear", "materialize", "matmul", "weight_shape"]
