"""NF4 4-bit weights with double quantization, in bitsandbytes' exact layout.

The format (docs/nf4-format.md):

* A torch-layout weight `[out, in]` is split into blocks of `blocksize` (64)
  consecutive elements along `in`. Each block has a float32 scale
  `absmax = max |x|`; every element is scaled by the reciprocal `1 / absmax`
  and coded as the index of the nearest entry of the 16-entry NF4 table
  (thresholds: the float32 midpoints, a tie takes the lower code).
* Two codes share a byte, the first element in the high nibble.
* Double quantization stores the first-level scales themselves in 8 bits:
  `offset = mean(absmax)`; blocks of 256 consecutive scales (running across
  rows) get a float32 `nested_absmax`; each `(absmax - offset) / nested_absmax`
  is coded by bitsandbytes' signed 256-entry dynamic map with the CUDA
  kernel's binary search, replicated here step for step.

Dequantization computes everything in float32 and rounds once, at the end.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qst_jax.errors import QSTError
from qst_jax.quant.dynamic_map import DYNAMIC_MAP_HEX

NF4_TABLE = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=np.float32,
)
"""The NF4 code table (float32, ascending); the 4-bit code is the index."""

# Decision thresholds of bitsandbytes' `dQuantizeNF4`: midpoints of adjacent
# entries, computed in double precision and rounded to float32.
NF4_THRESHOLDS = ((NF4_TABLE[:-1].astype(np.float64) + NF4_TABLE[1:]) / 2).astype(np.float32)

DYNAMIC_MAP = np.array([float.fromhex(h) for h in DYNAMIC_MAP_HEX], dtype=np.float32)
"""bitsandbytes' signed 8-bit dynamic map (float32 [256], ascending)."""

NESTED_BLOCKSIZE = 256


class QuantizationError(QSTError, ValueError):
    """A weight cannot be quantized, or stored 4-bit data is inconsistent."""


def _static_field(**kwargs: Any) -> Any:
    return dataclasses.field(metadata={"static": True}, **kwargs)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NF4Weight:
    """A frozen `[out, in]` weight held as NF4 codes, bitsandbytes' byte layout.

    Leaves may carry any number of leading axes `...` (for example the
    `layers` axis of a stacked decoder); `shape` is the per-matrix shape.

    Attributes:
      packed: uint8 `[..., out, in // 2]`. Byte `k` of a row holds the codes of
        elements `2k` (high nibble) and `2k + 1` (low nibble). Flattened
        row-major it is exactly bitsandbytes' `weight` tensor.
      absmax: first-level scales `[..., out, in // blocksize]`, one per block of
        `blocksize` consecutive elements of a row. uint8 codes into
        `DYNAMIC_MAP` when double-quantized, float32 otherwise.
      nested_absmax: float32 `[..., ceil(out * in / blocksize / 256)]`: one
        scale per 256 consecutive (row-major) first-level scales; None when
        not double-quantized.
      offset: float32 `[...]`, the mean of the first-level scales that was
        subtracted before nested quantization; None when not double-quantized.
      shape: static `(out, in)`.
      blocksize: static first-level block size; `in % blocksize == 0`.
      dtype: static name of the dtype the weight had (bitsandbytes' `dtype`).

    Invariants: `in` is even and a multiple of `blocksize`; `absmax.dtype` is
    uint8 exactly when `nested_absmax` and `offset` are present. The arrays are
    integer codes, so `jax.grad` refuses them: an NF4Weight is never trainable.
    """

    packed: jax.Array
    absmax: jax.Array
    nested_absmax: jax.Array | None
    offset: jax.Array | None
    shape: tuple[int, int] = _static_field()
    blocksize: int = _static_field(default=64)
    dtype: str = _static_field(default="bfloat16")

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def lead_shape(self) -> tuple[int, ...]:
        """Leading (stacked) axes in front of `[out, in // 2]`."""
        return tuple(self.packed.shape[:-2])

    @property
    def nbytes(self) -> int:
        """Bytes of storage, all leaves included."""
        leaves = jax.tree_util.tree_leaves(self)
        return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in leaves))

    def scales(self) -> jax.Array:
        """First-level scales as float32 `[..., out, in // blocksize]`."""
        if not self.double_quant:
            return self.absmax.astype(jnp.float32)
        lead = self.absmax.shape[:-2]
        flat = self.absmax.reshape(*lead, -1)
        nblocks = flat.shape[-1]
        nested = jnp.repeat(self.nested_absmax, NESTED_BLOCKSIZE, axis=-1)[..., :nblocks]
        scales = jnp.asarray(DYNAMIC_MAP)[flat] * nested + self.offset[..., None]
        return scales.reshape(self.absmax.shape)

    def codes(self) -> jax.Array:
        """The 4-bit codes, uint8 `[..., out, in]`."""
        hi = self.packed >> 4
        lo = self.packed & 0x0F
        return jnp.stack([hi, lo], axis=-1).reshape(*self.packed.shape[:-1], -1)

    def dequantize(self, dtype: Any = jnp.bfloat16) -> jax.Array:
        """The weight `[..., out, in]` in `dtype`: float32 math, one rounding."""
        out_dim, in_dim = self.shape
        values = jnp.asarray(NF4_TABLE)[self.codes()]
        values = values.reshape(*values.shape[:-1], in_dim // self.blocksize, self.blocksize)
        w = values * self.scales()[..., None]
        return w.reshape(*w.shape[:-2], in_dim).astype(dtype)

    def dequantize_even_odd(self, dtype: Any = jnp.bfloat16) -> jax.Array:
        """`dequantize(dtype)` `[..., out, in]` with its columns in the order 0, 2, 4, ..., 1, 3, 5, ....

        Column `j < in / 2` is the weight's column `2j` (the high nibbles),
        column `in / 2 + j` its column `2j + 1` (the low nibbles), each value
        bitwise as `dequantize` gives it. Made without interleaving the two
        nibbles of a byte, which a TPU cannot do in place: XLA materializes the
        interleaved weight in float32, several times its bf16 size
        (`quant.matmul` contracts it with `even_odd(x)` there).
        """
        out_dim, in_dim = self.shape
        scales = self.scales()[..., None]  # [..., out, in // blocksize, 1]: a block is blocksize // 2 bytes of a half
        table = jnp.asarray(NF4_TABLE)

        def half(codes: jax.Array) -> jax.Array:
            values = table[codes].reshape(*codes.shape[:-1], in_dim // self.blocksize, self.blocksize // 2)
            return (values * scales).reshape(*codes.shape[:-1], in_dim // 2).astype(dtype)

        return jnp.concatenate([half(self.packed >> 4), half(self.packed & 0x0F)], axis=-1)


def _check_shape(shape: tuple[int, ...], blocksize: int, name: str) -> None:
    if len(shape) != 2:
        raise QuantizationError(f"{name}: expected a 2-D [out, in] weight, got shape {tuple(shape)}")
    out_dim, in_dim = shape
    if blocksize <= 0 or blocksize % 2:
        raise QuantizationError(f"{name}: blocksize must be a positive even number, got {blocksize}")
    if in_dim % blocksize:
        raise QuantizationError(
            f"{name}: input dimension {in_dim} of shape {tuple(shape)} is not a multiple of the "
            f"blocksize {blocksize}; NF4 blocks must not straddle rows"
        )
    if out_dim * in_dim == 0:
        raise QuantizationError(f"{name}: cannot quantize an empty weight of shape {tuple(shape)}")


def _nf4_codes(scaled: jax.Array) -> jax.Array:
    """bitsandbytes' `dQuantizeNF4`: count thresholds strictly below x.

    A value on a threshold takes the lower code; NaN (an all-zero block scaled
    by 1/0) takes code 0, as in the CUDA kernel.
    """
    codes = jnp.zeros(scaled.shape, jnp.uint8)
    for t in NF4_THRESHOLDS:
        codes = codes + (scaled > t).astype(jnp.uint8)
    return codes


def _dynamic_codes(x: jax.Array) -> jax.Array:
    """bitsandbytes' CUDA `dQuantize<0>` over DYNAMIC_MAP, step for step."""
    code = jnp.asarray(DYNAMIC_MAP)
    pivot = jnp.full(x.shape, 127, jnp.int32)
    upper_pivot = jnp.full(x.shape, 255, jnp.int32)
    lower_pivot = jnp.zeros(x.shape, jnp.int32)
    lower = jnp.full(x.shape, -1.0, jnp.float32)
    upper = jnp.full(x.shape, 1.0, jnp.float32)
    val = code[pivot]
    step = 64
    while step > 0:
        gt = x > val
        lower_pivot = jnp.where(gt, pivot, lower_pivot)
        lower = jnp.where(gt, val, lower)
        upper_pivot = jnp.where(gt, upper_pivot, pivot)
        upper = jnp.where(gt, upper, val)
        pivot = jnp.where(gt, pivot + step, pivot - step)
        val = code[pivot]
        step //= 2
    upper = jnp.where(upper_pivot == 255, code[255], upper)
    lower = jnp.where(lower_pivot == 0, code[0], lower)
    gt = x > val
    up = jnp.where(x > (upper + val) * 0.5, upper_pivot, pivot)
    down = jnp.where(x < (lower + val) * 0.5, lower_pivot, pivot)
    return jnp.where(gt, up, down).astype(jnp.uint8)


def _double_quantize(absmax: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Codes float32 scales `[out, nb]` as (uint8 codes, nested_absmax, offset)."""
    offset = jnp.mean(absmax)
    # XLA computes the mean as `sum * (1/n)`; fused into the subtraction below,
    # the CPU backend contracts that product and the subtraction into one FMA
    # and the result comes out one ulp off bitsandbytes'. Adding a data-
    # dependent zero (which XLA may not fold for floats) keeps them apart.
    # tests/quant/test_nf4.py checks the jitted result bit for bit.
    offset = offset + 0.0 * absmax[0, 0]
    flat = (absmax - offset).reshape(-1)
    n = flat.shape[0]
    nblocks = math.ceil(n / NESTED_BLOCKSIZE)
    blocks = jnp.pad(flat, (0, nblocks * NESTED_BLOCKSIZE - n)).reshape(nblocks, NESTED_BLOCKSIZE)
    nested_absmax = jnp.max(jnp.abs(blocks), axis=-1)
    scaled = blocks * (1.0 / nested_absmax)[:, None]
    codes = _dynamic_codes(scaled).reshape(-1)[:n].reshape(absmax.shape)
    return codes, nested_absmax, offset


def check_finite(w: Any, name: str = "weight") -> None:
    """Raises QuantizationError naming `name` if a concrete `w` has NaN or inf."""
    finite = np.isfinite(np.asarray(w, dtype=np.float32))
    if not finite.all():
        bad = np.argwhere(~finite)[0]
        raise QuantizationError(
            f"{name}: {int((~finite).sum())} non-finite value(s) (first at index "
            f"{tuple(int(i) for i in bad)}); refusing to quantize"
        )


def _is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def quantize(
    w: Any,
    *,
    blocksize: int = 64,
    double_quant: bool = True,
    name: str = "weight",
) -> NF4Weight:
    """Quantizes a torch-layout `[out, in]` weight to NF4, as bitsandbytes does.

    Jittable (`blocksize`, `double_quant` and `name` are static). Called on a
    concrete array it first checks that every value is finite.

    Args:
      w: float array `[out, in]` of any float dtype; `in % blocksize == 0`.
      blocksize: first-level block size (bitsandbytes' default 64).
      double_quant: also quantize the block scales (bitsandbytes'
        `compress_statistics=True`).
      name: what to call the tensor in error messages.

    Returns:
      The NF4Weight; `dtype` records `w`'s dtype name.

    Raises:
      QuantizationError: bad shape or blocksize, or (for a concrete input) a
        NaN or infinite value.
    """
    shape = tuple(int(s) for s in np.shape(w))
    _check_shape(shape, blocksize, name)
    if _is_concrete(w):
        check_finite(w, name)
    dtype_name = jnp.dtype(getattr(w, "dtype", np.float32)).name
    out_dim, in_dim = shape
    x = jnp.asarray(w).astype(jnp.float32).reshape(out_dim, in_dim // blocksize, blocksize)
    absmax = jnp.max(jnp.abs(x), axis=-1)
    scaled = x * (1.0 / absmax)[..., None]
    codes = _nf4_codes(scaled).reshape(out_dim, in_dim // 2, 2)
    packed = (codes[..., 0] << 4) | codes[..., 1]
    if double_quant:
        absmax, nested_absmax, offset = _double_quantize(absmax)
    else:
        nested_absmax = offset = None
    return NF4Weight(
        packed=packed,
        absmax=absmax,
        nested_absmax=nested_absmax,
        offset=offset,
        shape=shape,
        blocksize=blocksize,
        dtype=dtype_name,
    )


quantize_jit = jax.jit(quantize, static_argnames=("blocksize", "double_quant", "name"))
"""`quantize`, compiled once per shape. Leave `name` at its default: it is
static, so a name per tensor would recompile per tensor (check values first
with `check_finite`)."""


def bits_per_parameter(w: NF4Weight) -> float:
    """Storage bits per weight element, all scales included."""
    lead = int(np.prod(w.lead_shape)) if w.lead_shape else 1
    return 8.0 * w.nbytes / (lead * w.shape[0] * w.shape[1])
