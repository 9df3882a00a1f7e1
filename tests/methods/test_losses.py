"""Losses: chunked cross-entropy equals the plain one; classification by hand."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qst_jax.methods.losses import (
    chunked_lm_loss,
    classification_loss,
    last_token_index,
    lm_loss,
    shift_targets,
)


@pytest.mark.parametrize("chunk", [7, 16, 64])
def test_chunked_equals_plain_in_value_and_gradient(chunk):
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.standard_normal((3, 10, 8)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((50, 8)), jnp.float32)
    ids = jnp.asarray(rng.integers(0, 50, (3, 10)), jnp.int32)
    mask = jnp.asarray(rng.integers(0, 2, (3, 10)), jnp.int32)
    targets, weights = shift_targets(ids, mask)

    def loss(fn, h, w):
        total, count = fn(h, lambda x: x @ w.T, targets, weights)
        return total / count

    plain = jax.value_and_grad(lambda h, w: loss(lm_loss, h, w), argnums=(0, 1))(hidden, w)
    chunked = jax.value_and_grad(
        lambda h, w: loss(lambda *a: chunked_lm_loss(*a, chunk_size=chunk), h, w), argnums=(0, 1)
    )(hidden, w)
    np.testing.assert_allclose(float(chunked[0]), float(plain[0]), rtol=1e-6)
    for a, b in zip(chunked[1], plain[1]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_shift_targets():
    ids = jnp.array([[5, 6, 7, 8]])
    mask = jnp.array([[1, 1, 0, 1]])
    targets, weights = shift_targets(ids, mask)
    assert targets.tolist() == [[6, 7, 8, 0]] and weights.tolist() == [[1.0, 0.0, 1.0, 0.0]]


def test_classification_cross_entropy_by_hand():
    logits = jnp.array([[2.0, 0.0], [0.0, 0.0], [5.0, 5.0]])
    labels = jnp.array([0, 1, 0])
    weights = jnp.array([1.0, 1.0, 0.0])  # the third row is padding
    total, count = classification_loss(logits, labels, weights)
    expected = np.log(1 + np.exp(-2.0)) + np.log(2.0)
    assert float(count) == 2.0
    np.testing.assert_allclose(float(total), expected, rtol=1e-6)


def test_regression_mse_by_hand():
    total, count = classification_loss(jnp.array([[1.5], [0.0]]), jnp.array([1.0, 2.0]), jnp.array([1.0, 1.0]))
    np.testing.assert_allclose(float(total), 0.25 + 4.0)
    assert float(count) == 2.0


def test_last_token_index_left_and_right_padding():
    mask = jnp.array([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert last_token_index(mask).tolist() == [2, 4, 4]


@pytest.mark.parametrize("chunk", [7, 64])
def test_frozen_head_loss_equals_the_plain_one_in_value_and_hidden_gradient(chunk):
    """The gradient computed in the forward pass equals autodiff's, under jit, vmap and a scaled cotangent."""
    rng = np.random.default_rng(1)
    hidden = jnp.asarray(rng.standard_normal((2, 3, 10, 8)), jnp.float32)  # [members, B, T, d]
    w = jnp.asarray(rng.standard_normal((50, 8)), jnp.float32)
    ids = jnp.asarray(rng.integers(0, 50, (3, 10)), jnp.int32)
    targets, weights = shift_targets(ids, jnp.asarray(rng.integers(0, 2, (3, 10)), jnp.int32))
    head = lambda x: x @ w.T  # noqa: E731

    def total(h, frozen):
        losses = jax.vmap(lambda o: chunked_lm_loss(o, head, targets, weights, chunk, frozen_head=frozen)[0])(h)
        return 0.5 * jnp.sum(losses * jnp.asarray([1.0, 3.0]))

    fused = jax.jit(jax.value_and_grad(lambda h: total(h, True)))(hidden)
    plain = jax.value_and_grad(lambda h: total(h, False))(hidden)
    np.testing.assert_allclose(float(fused[0]), float(plain[0]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(fused[1]), np.asarray(plain[1]), rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(fused[1]).max()) > 0
