"""The TPU's fused NF4 dequantize-matmul kernel (Mosaic) against the reference path.

On the CPU it runs in Pallas interpret mode; compiled deviceless for a v5e
chip when libtpu is installed (no TPU needed).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qst_jax.errors import InputError
from qst_jax.quant.matmul import matmul, set_kernel_mode
from qst_jax.quant.nf4 import quantize
from qst_jax.quant.nf4_kernel_tpu import nf4_matmul_tpu, tpu_block_n, tpu_supported
from tests.quant.test_nf4 import _bnb_weight, golden  # noqa: F401  (fixture)
from tests.quant.test_nf4_kernel import _rel


@pytest.fixture
def kernel_mode():
    previous = set_kernel_mode("auto")
    yield set_kernel_mode
    set_kernel_mode(previous)


@pytest.mark.parametrize("tokens", [1, 16, 19])
def test_kernel_equals_bnb_dequantized_product(golden, tokens):  # noqa: F811
    w = _bnb_weight(golden, "t1")  # 256 x 4096, quantized by bitsandbytes
    x = jax.random.normal(jax.random.PRNGKey(tokens), (tokens, w.shape[1]), jnp.bfloat16)
    exact = x.astype(jnp.float32) @ w.dequantize(jnp.float32).T
    fused = nf4_matmul_tpu(x, w, interpret=True)
    assert fused.shape == (tokens, 256) and fused.dtype == jnp.bfloat16
    assert _rel(fused, exact) < 5e-3  # bf16 output rounding of the exact product
    assert _rel(fused, exact) < 1.5 * _rel(matmul(x, w), exact) + 1e-3


def test_column_tiles_agree_and_shapes_are_checked():
    w = quantize(jax.random.normal(jax.random.PRNGKey(0), (512, 256)) * 0.05)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 256), jnp.bfloat16)
    outs = [np.asarray(nf4_matmul_tpu(x, w, interpret=True, block_n=b), np.float32) for b in (128, 256, 512)]
    assert outs[0].shape == (2, 3, 512)
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], outs[2])
    assert tpu_block_n(11008) == 256 and tpu_block_n(4096) == 512 and tpu_block_n(64) is None
    assert not tpu_supported(quantize(jnp.ones((128, 192))))  # K not a multiple of 256
    with pytest.raises(InputError, match=r"^nf4_matmul_tpu: unsupported weight \(shape \(64, 256\)"):
        nf4_matmul_tpu(jnp.ones((1, 256), jnp.bfloat16), quantize(jnp.ones((64, 256))), interpret=True)
    with pytest.raises(InputError, match=r"^nf4_matmul_tpu: block_n 384 must be one of \(512, 256, 128\)"):
        nf4_matmul_tpu(x, w, interpret=True, block_n=384)


@pytest.mark.parametrize("traced_for", [None, "tpu"])
def test_matmul_takes_it_in_interpret_tpu_mode_with_the_reference_gradient(kernel_mode, traced_for):
    """The kernel's backward dequantizes in the even-odd order when traced for a TPU (dx interleaved after the
    product): the same gradient."""
    import contextlib

    from qst_jax.platform import targeting

    w = quantize(jax.random.normal(jax.random.PRNGKey(0), (128, 256)) * 0.05)
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 256), jnp.float32)
    weights = jax.random.normal(jax.random.PRNGKey(2), (4, 128))

    def loss_fn():  # a function per trace: jax caches a trace by function, not by the platform traced for
        return lambda x: jnp.sum(weights * matmul(x.astype(jnp.bfloat16), w).astype(jnp.float32))

    kernel_mode("off")
    reference, reference_grad = loss_fn()(x), jax.grad(loss_fn())(x)
    kernel_mode("interpret-tpu")
    with targeting(traced_for) if traced_for else contextlib.nullcontext():
        jaxpr = str(jax.make_jaxpr(jax.grad(loss_fn()))(x))
        assert "nf4_matmul_tpu" in jaxpr
        assert ("concatenate" in jaxpr) == (traced_for == "tpu")
        assert abs(float(loss_fn()(x)) - float(reference)) < 2e-2 * abs(float(reference)) + 1e-2
        assert _rel(jax.grad(loss_fn())(x), reference_grad) < 2e-2


@pytest.mark.skipif(not __import__("qst_jax.environment").environment.libtpu_installed(),
                    reason="needs libtpu (bash scripts/setup.sh tpu)")
def test_the_kernel_compiles_for_a_v5e_and_never_writes_the_dequantized_weight():
    """A 7B linear (4096 x 4096) at 1 and 16 tokens, compiled deviceless for v5e: the reference path's
    temporaries hold the dequantized weight, the kernel's hold none of it."""
    from qst_jax.aot.compile import compile_for, replicated_on
    from qst_jax.aot.targets import abstract_mesh

    mesh = abstract_mesh("v5e")
    w = replicated_on(mesh, jax.eval_shape(lambda: quantize(jnp.zeros((4096, 4096), jnp.float32))))
    for tokens in (1, 16):
        x = replicated_on(mesh, jax.ShapeDtypeStruct((tokens, 4096), jnp.bfloat16))
        fused, _ = compile_for("v5e", jax.jit(lambda x, w: nf4_matmul_tpu(x, w)), (x, w))
        reference, _ = compile_for("v5e", jax.jit(lambda x, w: jnp.dot(x, w.dequantize(jnp.bfloat16).T)), (x, w))
        assert "nf4_matmul_tpu" in fused.as_text()
        assert fused.memory_analysis().temp_size_in_bytes < 2**20
        assert reference.memory_analysis().temp_size_in_bytes >= 4096 * 4096 * 2  # the bf16 weight, at least
