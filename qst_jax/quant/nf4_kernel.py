"""A fused NF4 dequantize-matmul kernel (Pallas, Triton lowering) for few tokens.

With few tokens (decoding, batch-1 training) `x @ W.T` is bound by reading
W. The reference path (`matmul.py`) first writes the dequantized bf16 W to
memory (16 bits per weight) and reads it back; this kernel reads the packed
4-bit codes once and dequantizes them in registers, so the dominant traffic
drops by about 4x.

Layout and algorithm, per program (a tile of `block_n` output rows):

  * `packed` `[N, K/2]` holds two codes per byte, the even element in the
    high nibble (bitsandbytes' order). The high nibbles therefore multiply
    the even columns of x and the low nibbles the odd ones, so x is split
    into `x_even`, `x_odd` `[M, K/2]` outside the kernel and no interleaving
    happens inside it.
  * The K loop runs over first-level quantization blocks (64 elements = 32
    bytes). Within a block every weight has the same scale, so the block's
    partial product is computed on the unscaled NF4 table values (bf16, f32
    accumulation) and then multiplied by the `[block_n]` scales in float32.
  * The 16-entry table lookup is a 4-level select tree on the code's bits
    (Triton has no register gathers).

First-level scales are decoded from their double-quantized form outside the
kernel (`NF4Weight.scales()`, float32, 1/16 of the weight's element count).

The same kernel runs in Pallas interpret mode on CPU, where tests compare it
with the reference path; on GPU it is chosen by `matmul.matmul` for up to
`MAX_FUSED_TOKENS` tokens (`set_kernel_mode` switches it).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from qst_jax.errors import InputError
from qst_jax.quant.nf4 import NF4_TABLE, NF4Weight

MAX_FUSED_TOKENS = 64
"""Above this many tokens the matmul is compute-bound: dequantize + XLA GEMM wins."""

_MIN_ROWS = 16  # Triton's dot needs at least 16 rows.
_BLOCK_N_CHOICES = (128, 64, 32, 16)


def _select_tree(code: jax.Array) -> jax.Array:
    """NF4_TABLE[code] for int32 codes in [0, 16), by selects on the code's bits (float32)."""
    values = [jnp.float32(v) for v in NF4_TABLE]
    bits = [(code >> b) & 1 for b in range(4)]
    for bit in bits:  # pair up neighbours: bit 0 picks within pairs, then bit 1, ...
        values = [jnp.where(bit == 1, hi, lo) for lo, hi in zip(values[0::2], values[1::2])]
    return values[0]


def _kernel(x_even_ref, x_odd_ref, packed_ref, scales_ref, out_ref, *, num_blocks: int, half: int):
    rows = x_even_ref.shape[0]
    block_n = packed_ref.shape[0]
    compute = x_even_ref.dtype

    def body(j: int, acc: jax.Array) -> jax.Array:
        cols = pl.ds(pl.multiple_of(j * half, half), half)
        codes = packed_ref[:, cols].astype(jnp.int32)  # [block_n, half]
        w_even = _select_tree(codes >> 4).astype(compute)
        w_odd = _select_tree(codes & 0x0F).astype(compute)
        part = (pltriton.dot(x_even_ref[:, cols], w_even, trans_b=True)
                + pltriton.dot(x_odd_ref[:, cols], w_odd, trans_b=True))
        scale = scales_ref[pl.ds(j, 1), :]  # [1, block_n], float32
        return acc + part.astype(jnp.float32) * scale

    acc = jax.lax.fori_loop(0, num_blocks, body, jnp.zeros((rows, block_n), jnp.float32))
    out_ref[...] = acc.astype(out_ref.dtype)


_MIN_PROGRAMS = 128  # about one program per streaming multiprocessor of an H100 (132)


def block_n_for(out_dim: int) -> int | None:
    """The row tile: the widest that divides `out_dim` and still gives `_MIN_PROGRAMS` programs.

    Each program streams its rows' whole K extent, so the grid must be wide
    enough to occupy every multiprocessor. None if no tile divides `out_dim`.
    """
    dividing = [b for b in _BLOCK_N_CHOICES if out_dim % b == 0]
    if not dividing:
        return None
    return next((b for b in dividing if out_dim // b >= _MIN_PROGRAMS), dividing[-1])


def fused_supported(w: Any) -> bool:
    """Whether the kernel handles `w`: a single (unstacked) NF4 matrix with 64-element blocks."""
    if not isinstance(w, NF4Weight) or w.lead_shape:
        return False
    out_dim, in_dim = w.shape
    return w.blocksize == 64 and in_dim % 64 == 0 and block_n_for(out_dim) is not None


@functools.partial(jax.jit, static_argnames=("interpret", "block_n", "num_warps", "num_stages"))
def nf4_matmul(x: jax.Array, w: NF4Weight, *, interpret: bool = False, block_n: int | None = None,
               num_warps: int = 4, num_stages: int = 3) -> jax.Array:
    """`x @ dequantize(w).T` without materialising the dequantized weight.

    Args:
      x: `[..., K]` activations in the compute dtype (bf16 or f16 on GPU).
      w: NF4Weight `[N, K]` with blocksize 64 and no leading axes
        (`fused_supported(w)`).
      interpret: run in Pallas interpret mode (any backend; for tests).
      block_n: output rows per program (a power of two >= 16 dividing N);
        default `block_n_for(N)`.
      num_warps, num_stages: Triton launch parameters.

    Returns:
      `[..., N]` in `x.dtype`.
    """
    if not fused_supported(w):
        raise InputError(f"nf4_matmul: unsupported weight (shape {w.shape}, blocksize {w.blocksize}, "
                         f"lead axes {w.lead_shape}); use quant.matmul")
    out_dim, in_dim = w.shape
    if x.shape[-1] != in_dim:
        raise InputError(f"nf4_matmul: x has {x.shape[-1]} features, weight expects {in_dim}")
    lead = x.shape[:-1]
    rows = int(np.prod(lead)) if lead else 1
    padded = max(_MIN_ROWS, -(-rows // _MIN_ROWS) * _MIN_ROWS)
    flat = jnp.pad(x.reshape(rows, in_dim), ((0, padded - rows), (0, 0)))
    x_even, x_odd = flat[:, 0::2], flat[:, 1::2]
    scales_t = w.scales().T  # [K / 64, N] float32
    block_n = block_n or block_n_for(out_dim)
    if block_n not in _BLOCK_N_CHOICES or out_dim % block_n:
        raise InputError(f"nf4_matmul: block_n {block_n} must be one of {_BLOCK_N_CHOICES} and divide {out_dim}")
    half = w.blocksize // 2
    kernel = functools.partial(_kernel, num_blocks=in_dim // w.blocksize, half=half)
    compiler_params = None if interpret else pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((padded, out_dim), x.dtype),
        grid=(out_dim // block_n,),
        in_specs=[
            pl.BlockSpec((padded, in_dim // 2), lambda i: (0, 0)),
            pl.BlockSpec((padded, in_dim // 2), lambda i: (0, 0)),
            pl.BlockSpec((block_n, in_dim // 2), lambda i: (i, 0)),
            pl.BlockSpec((in_dim // w.blocksize, block_n), lambda i: (0, i)),
        ],
        out_specs=pl.BlockSpec((padded, block_n), lambda i: (0, i)),
        interpret=interpret,
        compiler_params=compiler_params,
        name="nf4_matmul",
    )(x_even, x_odd, w.packed, scales_t)
    return out[:rows].reshape(*lead, out_dim)
