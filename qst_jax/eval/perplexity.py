"""Perplexity of a causal LM on local text, in fixed windows.

The text is tokenized once, cut into non-overlapping windows of `seq_len`
tokens, and every token after the first of each window is scored. Losses
accumulate in float32; perplexity is `exp(total NLL / scored tokens)`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np


def token_windows(ids: np.ndarray | list[int], seq_len: int, max_windows: int | None = None) -> np.ndarray:
    """`[W, seq_len]` int32 windows of `ids` (the ragged tail is dropped)."""
    ids = np.asarray(ids, np.int32).reshape(-1)
    count = len(ids) // seq_len
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise ValueError(f"text has {len(ids)} tokens, fewer than one window of {seq_len}")
    return ids[: count * seq_len].reshape(count, seq_len)


def next_token_nll(logits: jax.Array, input_ids: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Summed float32 NLL of tokens 1..T-1 given their prefixes, and their count.

    Args:
      logits: `[B, T, V]` (any float dtype).
      input_ids: `[B, T]`.
      mask: `[B, T]`, 1 where a token is real; a target counts when it and
        its predecessor are real.
    """
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    targets = input_ids[:, 1:]
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    valid = (mask[:, 1:] * mask[:, :-1]).astype(jnp.float32)
    return jnp.sum(nll * valid), jnp.sum(valid)


def perplexity(
    logits: Callable[[jax.Array, jax.Array], jax.Array],
    windows: np.ndarray,
    *,
    batch_size: int = 4,
    progress: Callable[[int, int], None] | None = None,
) -> float:
    """Perplexity over `windows` `[W, T]` with `logits(input_ids, mask) -> [B, T, V]`.

    Batches are padded to `batch_size` with masked rows, so one shape compiles.
    """
    score = jax.jit(next_token_nll)
    total, count = 0.0, 0.0
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size]
        mask = np.ones_like(batch)
        if len(batch) < batch_size:
            pad = batch_size - len(batch)
            batch = np.concatenate([batch, np.zeros((pad, batch.shape[1]), batch.dtype)])
            mask = np.concatenate([mask, np.zeros((pad, mask.shape[1]), mask.dtype)])
        nll, n = score(logits(batch, mask), jnp.asarray(batch), jnp.asarray(mask))
        total += float(nll)
        count += float(n)
        if progress is not None:
            progress(min(start + batch_size, len(windows)), len(windows))
    return math.exp(total / count)
