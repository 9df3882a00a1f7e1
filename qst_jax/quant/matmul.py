"""The one matmul entry point for frozen weights: `x @ W.T`, W dense or NF4.

Every linear layer of the backbone and of the side network calls `matmul`.
The reference path dequantizes the NF4 weight (float32 math, one rounding to
the compute dtype) and calls `lax.dot_general`; inside a `lax.scan` over
stacked layers only one layer's dequantized weight is alive at a time. On a
TPU (`qst_jax.platform.target_platform()`) it dequantizes the weight's even
columns, then its odd ones, and contracts them with `even_odd(x)`: the same
sum without interleaving each byte's two nibbles, which a TPU does in float32
copies of the whole weight.

For few tokens (decoding, batch-1 training) on a GPU or a TPU, an NF4
weight goes through a fused dequantize-matmul kernel instead
(`nf4_kernel.py`, Triton; `nf4_kernel_tpu.py`, Mosaic), which reads the
4-bit codes once and never writes the dequantized weight. `set_kernel_mode`
chooses: "auto" (default: the backend's kernel for bf16/f16 activations and
at most `MAX_FUSED_TOKENS` tokens), "off" (always the reference path), or
"interpret" / "interpret-tpu" (the GPU's / the TPU's kernel in Pallas
interpret mode wherever it applies, on any backend: how CPU tests check
them against the reference).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Union

import jax
import jax.numpy as jnp
import numpy as np

from qst_jax.errors import InputError
from qst_jax.platform import target_platform
from qst_jax.quant import nf4_kernel, nf4_kernel_tpu
from qst_jax.quant.nf4 import NF4Weight

_KERNEL_MODES = ("auto", "off", "interpret", "interpret-tpu")
_kernel_mode = "auto"


def set_kernel_mode(mode: str) -> str:
    """Chooses how NF4 matmuls with few tokens run; returns the previous mode.

    Args:
      mode: "auto", "off", "interpret" or "interpret-tpu" (see the module docstring). Takes
        effect for functions traced afterwards (jitted functions already
        compiled keep their choice).
    """
    global _kernel_mode
    if mode not in _KERNEL_MODES:
        raise InputError(f"kernel mode must be one of {_KERNEL_MODES}, got {mode!r}")
    previous, _kernel_mode = _kernel_mode, mode
    return previous


def _fused_choice(x: jax.Array, w: Any) -> str | None:
    """"gpu", "tpu", "interpret", "interpret-tpu" or None: whether this matmul takes a fused kernel, which."""
    if _kernel_mode == "off" or math.prod(x.shape[:-1]) > nf4_kernel.MAX_FUSED_TOKENS:
        return None
    if _kernel_mode == "interpret":
        return "interpret" if nf4_kernel.fused_supported(w) else None
    if _kernel_mode == "interpret-tpu":
        return "interpret-tpu" if nf4_kernel_tpu.tpu_supported(w) else None
    backend = jax.default_backend()
    if backend == "gpu" and x.dtype in (jnp.bfloat16, jnp.float16) and nf4_kernel.fused_supported(w) and \
            triton_capable():
        return "gpu"
    if backend == "tpu" and x.dtype == jnp.bfloat16 and nf4_kernel_tpu.tpu_supported(w):
        return "tpu"
    return None


def triton_capable(capability: str | None = None) -> bool:
    """Whether a GPU of this compute capability (default: device 0's) runs Pallas' Triton kernels.

    Triton in XLA needs compute capability 8.0 or later (Ampere); a T4
    (7.5) refuses it at compile time ("Triton support is only enabled for
    Ampere GPUs"), so there the reference path runs.
    """
    if capability is None:
        capability = getattr(jax.devices()[0], "compute_capability", "8.0")
    major, _, minor = str(capability).partition(".")
    return (int(major), int(minor or 0)) >= (8, 0)


def _run_fused(x: jax.Array, w: NF4Weight, choice: str) -> jax.Array:
    if choice in ("tpu", "interpret-tpu"):
        return nf4_kernel_tpu.nf4_matmul_tpu(x, w, interpret=choice == "interpret-tpu")
    return nf4_kernel.nf4_matmul(x, w, interpret=choice == "interpret")


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _fused(x: jax.Array, w: NF4Weight, choice: str) -> jax.Array:
    return _run_fused(x, w, choice)


def _fused_fwd(x: jax.Array, w: NF4Weight, choice: str):
    return _run_fused(x, w, choice), w


def _fused_bwd(choice: str, w: NF4Weight, g: jax.Array):
    del choice
    tpu = target_platform() == "tpu"  # dx in the even-odd order, then interleaved: [tokens, in], not the weight
    weight = w.dequantize_even_odd(g.dtype) if tpu else w.dequantize(g.dtype)
    dx = jax.lax.dot_general(g, weight, (((g.ndim - 1,), (0,)), ((), ())), preferred_element_type=g.dtype)
    if tpu:
        dx = from_even_odd(dx)

    def zero(a: jax.Array) -> Any:  # the frozen weight gets no gradient
        if jnp.issubdtype(a.dtype, jnp.integer):
            return np.zeros(a.shape, jax.dtypes.float0)
        return jnp.zeros_like(a)

    return dx, jax.tree.map(zero, w)


_fused.defvjp(_fused_fwd, _fused_bwd)



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
        raise InputError(f"matmul: x has {x.shape[-1]} features, weight expects {in_dim} (shape {(out_dim, in_dim)})")
    if isinstance(w, LoRAWeight):
        low_rank = _dot(_dot(x, w.a.astype(x.dtype), precision), w.b.astype(x.dtype), precision)
        return _reference(x, w.base, precision) + (w.scale * low_rank).astype(x.dtype)
    choice = _fused_choice(x, w) if precision is None else None
    if choice is not None:
        return _fused(x, w, choice)
    return _reference(x, w, precision)


def even_odd(x: jax.Array) -> jax.Array:
    """`x`'s even features, then its odd ones (`[..., in]`): the column order of `NF4Weight.dequantize_even_odd`."""
    return jnp.concatenate([x[..., 0::2], x[..., 1::2]], axis=-1)


def from_even_odd(y: jax.Array) -> jax.Array:
    """The inverse of `even_odd`: features `[..., in]` in the even-odd order back in their own order."""
    half = y.shape[-1] // 2
    return jnp.stack([y[..., :half], y[..., half:]], axis=-1).reshape(y.shape)


def _reference(x: jax.Array, w: jax.Array | NF4Weight, precision: Any) -> jax.Array:
    """`x @ w.T` with `w` dequantized in XLA.

    On a TPU an NF4 weight is dequantized in its even-odd column order and
    contracted with `even_odd(x)` (the same sum, in another order): the
    interleaved order costs a TPU several float32 copies of the weight.
    """
    if isinstance(w, NF4Weight) and target_platform() == "tpu":
        return _dot(even_odd(x), w.dequantize_even_odd(x.dtype), precision)
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


__all__ = ["LoRAWeight", "Weight", "even_odd", "linear", "materialize", "matmul", "set_kernel_mode", "weight_shape"]
