"""Losses, accumulated in float32 and returned as (sum, count) for token weighting.

`chunked_lm_loss` never materialises the full `[B, T, vocab]` float32 logits:
it scans over chunks of tokens, and its backward pass recomputes each chunk's
logits (`jax.checkpoint`), so only one chunk's logits exist at a time. With a
frozen head (`frozen_head=True`, every method's LM head) each chunk's
gradient with respect to the hidden states is computed in the forward pass
instead (`frozen_head_nll`): the backward keeps `[chunk, d]`, never the
logits, and runs no LM-head matmul again.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from qst_jax.models import loops


def shift_targets(input_ids: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Next-token targets `[B, T]` and their float32 weights (0 at the last slot).

    Position t predicts `input_ids[t + 1]`, counted when `loss_mask[t + 1]`.
    """
    targets = jnp.concatenate([input_ids[:, 1:], jnp.zeros_like(input_ids[:, :1])], axis=1)
    weights = jnp.concatenate([loss_mask[:, 1:], jnp.zeros_like(loss_mask[:, :1])], axis=1)
    return targets, weights.astype(jnp.float32)


def _nll_sum(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> jax.Array:
    logits = logits.astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.sum((logz - target_logit) * weights)


def frozen_head_nll(head: Callable[[jax.Array], jax.Array], hidden: jax.Array, targets: jax.Array,
                    weights: jax.Array) -> jax.Array:
    """`_nll_sum(head(hidden), ...)`, differentiable in `hidden` only; `head`'s own params get no gradient.

    The forward pass also computes d loss / d hidden = ((softmax - onehot) *
    weight) pulled back through `head`, and keeps only that (shape of
    `hidden`) for the backward pass, which scales it by the cotangent.
    """
    converted, consts = jax.closure_convert(head, hidden)
    specs = tuple(jax.ShapeDtypeStruct(c.shape, c.dtype) for c in consts)
    return _fused_nll((converted, specs), hidden, targets, weights, *consts)


def _zero_cotangent(spec: Any) -> Any:
    if jnp.issubdtype(spec.dtype, jnp.inexact):
        return jnp.zeros(spec.shape, spec.dtype)
    return np.zeros(spec.shape, jax.dtypes.float0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused_nll(head: tuple[Callable, tuple], h: jax.Array, targets: jax.Array, weights: jax.Array, *consts):
    return _nll_sum(head[0](h, *consts), targets, weights)


def _fused_nll_forward(head: tuple[Callable, tuple], h: jax.Array, targets: jax.Array, weights: jax.Array, *consts):
    logits, pullback = jax.vjp(lambda x: head[0](x, *consts), h)
    logits32 = logits.astype(jnp.float32)
    logz = jax.nn.logsumexp(logits32, axis=-1, keepdims=True)
    target_logit = jnp.take_along_axis(logits32, targets[..., None], axis=-1)[..., 0]
    total = jnp.sum((logz[..., 0] - target_logit) * weights)
    onehot = jax.nn.one_hot(targets, logits.shape[-1], dtype=jnp.float32)
    dlogits = (jnp.exp(logits32 - logz) - onehot) * weights[..., None]
    (dh,) = pullback(dlogits.astype(logits.dtype))
    return total, dh


def _fused_nll_backward(head: tuple[Callable, tuple], dh: jax.Array, g: jax.Array):
    """Only `h` gets a gradient: targets and weights none, the head's params (`head[1]` their shapes) zeros."""
    return ((dh.astype(jnp.float32) * g).astype(dh.dtype), None, None, *(_zero_cotangent(s) for s in head[1]))


_fused_nll.defvjp(_fused_nll_forward, _fused_nll_backward)


def lm_loss(
    hidden: jax.Array, head: Callable[[jax.Array], jax.Array], targets: jax.Array, weights: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Plain next-token cross-entropy: (sum of weighted NLL, sum of weights)."""
    return _nll_sum(head(hidden), targets, weights), jnp.sum(weights)


def chunked_lm_loss(
    hidden: jax.Array,
    head: Callable[[jax.Array], jax.Array],
    targets: jax.Array,
    weights: jax.Array,
    chunk_size: int = 1024,
    frozen_head: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """`lm_loss` over chunks of `chunk_size` tokens; same value and gradient.

    Args:
      hidden: `[B, T, d]` final states; `head` maps `[..., d]` to logits.
      targets, weights: `[B, T]` from `shift_targets`.
      frozen_head: `head` has no trainable params: each chunk's gradient is
        computed in the forward pass (`frozen_head_nll`), not recomputed.
    """
    b, t, d = hidden.shape
    n = b * t
    if n <= chunk_size:
        if frozen_head:
            return frozen_head_nll(head, hidden, targets, weights), jnp.sum(weights)
        return lm_loss(hidden, head, targets, weights)
    chunks = -(-n // chunk_size)
    pad = chunks * chunk_size - n
    flat_h = jnp.pad(hidden.reshape(n, d), ((0, pad), (0, 0))).reshape(chunks, chunk_size, d)
    flat_t = jnp.pad(targets.reshape(n), (0, pad)).reshape(chunks, chunk_size)
    flat_w = jnp.pad(weights.reshape(n), (0, pad)).reshape(chunks, chunk_size)

    @jax.checkpoint
    def chunk_loss(h: jax.Array, tgt: jax.Array, w: jax.Array) -> jax.Array:
        return _nll_sum(head(h), tgt, w)

    if frozen_head:
        chunk_loss = lambda h, tgt, w: frozen_head_nll(head, h, tgt, w)  # noqa: E731

    def body(total: jax.Array, xs: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[jax.Array, None]:
        return total + chunk_loss(*xs), None

    total, _ = loops.scan(body, jnp.zeros((), jnp.float32), (flat_h, flat_t, flat_w))
    return total, jnp.sum(weights)


def last_token_index(attention_mask: jax.Array) -> jax.Array:
    """Index `[B]` of each row's last real token (left or right padding)."""
    t = attention_mask.shape[-1]
    return t - 1 - jnp.argmax(jnp.flip(attention_mask.astype(jnp.int32), axis=-1), axis=-1)


def classification_loss(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Cross-entropy (several classes) or MSE (one regression output).

    Args:
      logits: `[B, C]`; C == 1 means regression.
      labels: `[B]` int class ids, or float targets for regression.
      weights: `[B]` 1 for real examples, 0 for padding rows.
    """
    logits = logits.astype(jnp.float32)
    weights = weights.astype(jnp.float32)
    if logits.shape[-1] == 1:
        per_example = jnp.square(logits[:, 0] - labels.astype(jnp.float32))
    else:
        per_example = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(
            logits, labels.astype(jnp.int32)[:, None], axis=-1
        )[:, 0]
    return jnp.sum(per_example * weights), jnp.sum(weights)
