"""The fused NF4 dequantize-matmul kernel for a TPU (Pallas, Mosaic lowering), for few tokens.

The same job as `nf4_kernel.py` (Triton, GPUs): with few tokens `x @ W.T` is
bound by reading W, and this kernel reads the packed 4-bit codes once,
dequantizing them in vector registers instead of writing a bf16 W to HBM and
reading it back. Its layout follows the TPU's (8, 128) tiles rather than a
GPU's warps:

  * `packed` `[N, K/2]` holds two codes per byte, the even element in the
    high nibble; x is split into `x_even`, `x_odd` `[M, K/2]` outside, so
    high nibbles multiply `x_even` and low nibbles `x_odd`.
  * The K loop runs over chunks of 128 bytes (one lane width: 256 weights,
    four 64-element quantization blocks). A chunk's codes become the
    unscaled NF4 values by a 4-level select tree (no gathers); each of the
    four blocks is one MXU matmul against the chunk's values with the other
    blocks' lanes zeroed (a lane mask instead of a 32-lane slice, which
    Mosaic would relayout), and its `[block_n]` float32 scales multiply
    that block's partial product, a row broadcast over the M rows.
  * Each program owns `block_n` (a multiple of 128) output columns and the
    whole K extent; M is padded to 16 rows (bf16's sublane tile).

Requires K a multiple of 256 and N of 128 (`tpu_supported`). First-level
scales are decoded outside (`NF4Weight.scales()`). Checked against the
reference in Pallas interpret mode on the CPU and compiled deviceless for a
v5e chip (tests/quant, tests/aot).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from qst_jax.errors import InputError
from qst_jax.quant.nf4 import NF4Weight
from qst_jax.quant.nf4_kernel import _select_tree

_LANES = 128
_ROW_TILE = 16  # bf16 packs 16 rows into a sublane tile
_BLOCK_N_CHOICES = (512, 256, 128)


def tpu_block_n(out_dim: int) -> int | None:
    """The widest column tile in `_BLOCK_N_CHOICES` dividing `out_dim`, or None."""
    return next((b for b in _BLOCK_N_CHOICES if out_dim % b == 0), None)


def tpu_supported(w: Any) -> bool:
    """Whether the TPU kernel handles `w`: one NF4 matrix, 64-element blocks, K % 256 == 0, N % 128 == 0."""
    if not isinstance(w, NF4Weight) or w.lead_shape or w.blocksize != 64:
        return False
    out_dim, in_dim = w.shape
    return in_dim % (2 * _LANES) == 0 and tpu_block_n(out_dim) is not None


def _kernel(x_even_ref, x_odd_ref, packed_ref, scales_ref, out_ref, *, chunks: int):
    rows, block_n = out_ref.shape
    compute = x_even_ref.dtype
    quarter = jax.lax.broadcasted_iota(jnp.int32, (block_n, _LANES), 1) // (_LANES // 4)  # block of each lane
    contract = (((1,), (1,)), ((), ()))

    def body(c: jax.Array, acc: jax.Array) -> jax.Array:
        cols = pl.ds(pl.multiple_of(c * _LANES, _LANES), _LANES)
        codes = packed_ref[:, cols].astype(jnp.int32)  # [block_n, 128]
        w_even, w_odd = _select_tree(codes >> 4), _select_tree(codes & 0x0F)  # float32
        x_even, x_odd = x_even_ref[:, cols], x_odd_ref[:, cols]
        for q in range(4):  # the chunk's four quantization blocks
            mine = quarter == q
            part = (jax.lax.dot_general(x_even, jnp.where(mine, w_even, 0.0).astype(compute), contract,
                                        preferred_element_type=jnp.float32)
                    + jax.lax.dot_general(x_odd, jnp.where(mine, w_odd, 0.0).astype(compute), contract,
                                          preferred_element_type=jnp.float32))
            acc = acc + part * scales_ref[pl.ds(c * 4 + q, 1), :]  # [rows, block_n] * [1, block_n]
        return acc

    acc = jax.lax.fori_loop(0, chunks, body, jnp.zeros((rows, block_n), jnp.float32))
    out_ref[...] = acc.astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("interpret", "block_n"))
def nf4_matmul_tpu(x: jax.Array, w: NF4Weight, *, interpret: bool = False, block_n: int | None = None) -> jax.Array:
    """`x @ dequantize(w).T` on a TPU without materialising the dequantized weight.

    Args:
      x: `[..., K]` activations (bf16 on a TPU).
      w: NF4Weight `[N, K]` (`tpu_supported(w)`).
      interpret: Pallas interpret mode (any backend; for tests).
      block_n: output columns per program (default `tpu_block_n(N)`).

    Returns:
      `[..., N]` in `x.dtype`.
    """
    if not tpu_supported(w):
        raise InputError(f"nf4_matmul_tpu: unsupported weight (shape {w.shape}, blocksize {w.blocksize}, lead axes "
                         f"{w.lead_shape}): needs blocksize 64, K a multiple of 256, N of 128; use quant.matmul")
    out_dim, in_dim = w.shape
    if x.shape[-1] != in_dim:
        raise InputError(f"nf4_matmul_tpu: x has {x.shape[-1]} features, weight expects {in_dim}")
    block_n = block_n or tpu_block_n(out_dim)
    if block_n not in _BLOCK_N_CHOICES or out_dim % block_n:
        raise InputError(f"nf4_matmul_tpu: block_n {block_n} must be one of {_BLOCK_N_CHOICES} and divide {out_dim}")
    lead = x.shape[:-1]
    rows = int(np.prod(lead)) if lead else 1
    padded = -(-rows // _ROW_TILE) * _ROW_TILE
    flat = jnp.pad(x.reshape(rows, in_dim), ((0, padded - rows), (0, 0)))
    x_even, x_odd = flat[:, 0::2], flat[:, 1::2]
    half = in_dim // 2
    itemsize = jnp.dtype(x.dtype).itemsize
    # What the kernel reads and writes once (XLA cannot see into a Mosaic kernel): codes, scales, x, the output.
    cost = pl.CostEstimate(flops=2 * padded * out_dim * in_dim, transcendentals=0,
                           bytes_accessed=out_dim * half + out_dim * (in_dim // w.blocksize) * 4
                           + padded * in_dim * itemsize + padded * out_dim * itemsize)
    out = pl.pallas_call(
        functools.partial(_kernel, chunks=half // _LANES),
        out_shape=jax.ShapeDtypeStruct((padded, out_dim), x.dtype),
        grid=(out_dim // block_n,),
        in_specs=[
            pl.BlockSpec((padded, half), lambda i: (0, 0)),
            pl.BlockSpec((padded, half), lambda i: (0, 0)),
            pl.BlockSpec((block_n, half), lambda i: (i, 0)),
            pl.BlockSpec((in_dim // w.blocksize, block_n), lambda i: (0, i)),
        ],
        out_specs=pl.BlockSpec((padded, block_n), lambda i: (0, i)),
        interpret=interpret,
        cost_estimate=cost,
        name="nf4_matmul_tpu",
    )(x_even, x_odd, w.packed, w.scales().T)
    return out[:rows].reshape(*lead, out_dim)
