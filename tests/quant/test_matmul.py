"""The matmul entry point: `x @ W.T` for dense and NF4 weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qst_jax.quant import linear, matmul, quantize


def test_nf4_matmul_equals_dequantize_then_dot():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((96, 128)).astype(np.float32)
    x = jnp.asarray(rng.standard_normal((2, 5, 128)), jnp.bfloat16)
    q = quantize(w)
    y = jax.jit(matmul)(x, q)
    assert y.shape == (2, 5, 96) and y.dtype == jnp.bfloat16
    dense = q.dequantize(jnp.bfloat16)
    ref = jnp.einsum("bti,oi->bto", x, dense, preferred_element_type=jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(ref, np.float32))


def test_dense_linear_with_bias():
    w = jnp.arange(12, dtype=jnp.float32).reshape(3, 4)
    b = jnp.array([1.0, 2.0, 3.0])
    x = jnp.ones((2, 4), jnp.float32)
    np.testing.assert_allclose(np.asarray(linear(x, w, b)), np.asarray(x @ w.T + b))


def test_matmul_shape_mismatch():
    with pytest.raises(ValueError, match="x has 5 features, weight expects 4"):
        matmul(jnp.ones((2, 5)), jnp.ones((3, 4)))


@pytest.mark.parametrize("double_quant", [True, False])
def test_even_odd_dequantize_is_the_weight_with_its_columns_reordered(double_quant):
    w = jax.random.normal(jax.random.PRNGKey(3), (2, 96, 256)) * 0.05
    q = jax.vmap(lambda m: quantize(m, double_quant=double_quant))(w)
    even_odd_columns = np.concatenate([np.arange(0, 256, 2), np.arange(1, 256, 2)])
    for dtype in (jnp.float32, jnp.bfloat16):
        expected = np.asarray(q.dequantize(dtype), np.float32)[..., even_odd_columns]
        np.testing.assert_array_equal(np.asarray(q.dequantize_even_odd(dtype), np.float32), expected)


def test_the_tpu_form_of_the_reference_matmul_is_the_same_product_and_gradient():
    """Traced for a TPU, `matmul` contracts even_odd(x) with the even-odd weight (no nibble interleave); the
    product and the activations' gradient are the reference's, also through a LoRA update."""
    from qst_jax.platform import targeting
    from qst_jax.quant import set_kernel_mode
    from qst_jax.quant.matmul import LoRAWeight

    q = quantize(jax.random.normal(jax.random.PRNGKey(0), (96, 128)) * 0.05)
    lora = LoRAWeight(q, jax.random.normal(jax.random.PRNGKey(4), (4, 128)) * 0.1,
                      jax.random.normal(jax.random.PRNGKey(5), (96, 4)) * 0.1, scale=2.0)
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 128), jnp.float32)
    weights = jax.random.normal(jax.random.PRNGKey(2), (3, 96))
    previous = set_kernel_mode("off")
    try:
        for w in (q, lora):
            def loss_of(w):  # a function per trace: jax caches a trace by function, not by the platform traced for
                return lambda x: jnp.sum(weights * matmul(x, w))

            reference = (loss_of(w)(x), jax.grad(loss_of(w))(x))
            assert "concatenate" not in str(jax.make_jaxpr(loss_of(w))(x))
            with targeting("tpu"):
                assert "concatenate" in str(jax.make_jaxpr(loss_of(w))(x))
                tpu = (jax.jit(loss_of(w))(x), jax.jit(jax.grad(loss_of(w)))(x))
            np.testing.assert_allclose(float(tpu[0]), float(reference[0]), rtol=1e-5)
            np.testing.assert_allclose(np.asarray(tpu[1]), np.asarray(reference[1]), rtol=1e-5, atol=1e-6)
    finally:
        set_kernel_mode(previous)


@pytest.mark.skipif(not __import__("qst_jax.environment").environment.libtpu_installed(),
                    reason="needs libtpu (bash scripts/setup.sh tpu)")
def test_compiled_for_a_v5e_the_reference_matmul_holds_no_interleaved_weight():
    """A 7B linear (4096 x 4096) at 512 tokens compiled for a v5e chip: `matmul` dequantizes into the dot
    (temporaries under the bf16 weight's 32 MiB); dequantizing in the interleaved order holds float32 copies."""
    from qst_jax.aot.compile import compile_for, replicated_on
    from qst_jax.aot.targets import abstract_mesh

    mesh = abstract_mesh("v5e")
    w = replicated_on(mesh, jax.eval_shape(lambda: quantize(jnp.zeros((4096, 4096), jnp.float32))))
    x = replicated_on(mesh, jax.ShapeDtypeStruct((512, 4096), jnp.bfloat16))
    even_odd, _ = compile_for("v5e", jax.jit(matmul), (x, w))
    interleaved, _ = compile_for("v5e", jax.jit(lambda x, w: jnp.dot(x, w.dequantize(jnp.bfloat16).T)), (x, w))
    bf16_weight = 4096 * 4096 * 2
    assert even_odd.memory_analysis().temp_size_in_bytes < bf16_weight
    assert interleaved.memory_analysis().temp_size_in_bytes > 4 * bf16_weight


def test_from_even_odd_undoes_even_odd():
    from qst_jax.quant.matmul import even_odd, from_even_odd

    x = jnp.arange(24.0).reshape(2, 12)
    np.testing.assert_array_equal(np.asarray(even_odd(x)[0]), [0, 2, 4, 6, 8, 10, 1, 3, 5, 7, 9, 11])
    np.testing.assert_array_equal(np.asarray(from_even_odd(even_odd(x))), np.asarray(x))
