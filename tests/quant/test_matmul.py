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
