"""The one matmul entry point for frozen weights: `x @ W.T`, W dense or NF4.

Every linear layer of the backbone and of the side network calls `matmul`.
The reference path dequantizes the NF4 weight (float32 math, one rounding to
the compute dtype) and calls `lax.dot_general`; inside a `lax.scan` over
stacked layers only one layer's dequantized weight is alive at a time. A fused
GPU kernel can be dispatched from here later without touching any caller.
"""

from __future__ import annotations

from typing import Any

import jax

from qst_jax.quant.nf4 import NF4Weight

Weight = jax.Array | NF4Weight
"""A torch-layout `[out, in]` weight: a dense array or an NF4Weight."""


def weight_shape(w: Weight) -> tuple[int, int]:
    """`(out, in)` of a single (unstacked) weight."""
    if isinstance(w, NF4Weight):
        return w.shape
    return tuple(w.shape[-2:])  # type: ignore[return-value]


def materialize(w: Weight, dtype: Any) -> jax.Array:
    """The weight as a dense `[out, in]` array in `dtype`."""
    if isinstance(w, NF4Weight):
        return w.dequantize(dtype)
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
    dense = materialize(w, x.dtype)
    return jax.lax.dot_general(
        x,
        dense,
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


def is_quantized(w: Any) -> bool:
    return isinstance(w, NF4Weight)


__all__ = ["Weight", "is_quantized", "linear", "materialize", "matmul", "weight_shape"]
