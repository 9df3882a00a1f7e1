"""Choosing the next token: greedy, temperature, top-k, top-p."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from qst_jax.errors import InputError


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How tokens are drawn.

    Attributes:
      temperature: 0 means greedy (argmax); otherwise logits are divided by it.
      top_k: keep the k most likely tokens (0: all).
      top_p: keep the smallest set whose probability reaches p (1.0: all).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise InputError(f"bad sampling settings {self}: temperature >= 0, top_k >= 0, 0 < top_p <= 1")


def sample_rows(logits: jax.Array, seeds: jax.Array, steps: jax.Array, temperature: jax.Array, top_k: jax.Array,
                top_p: jax.Array) -> jax.Array:
    """Next tokens `[B]` with each row's own settings (a decode slot each), float32 logits `[B, V]`.

    Row b draws with key `fold_in(PRNGKey(seeds[b]), steps[b])`, so its
    tokens depend on its own seed and position only, never on the other
    rows; temperature 0 is greedy (argmax), top_k 0 keeps every token,
    top_p 1.0 keeps the whole distribution.
    """
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
    ordered = -jnp.sort(-scaled, axis=-1)  # descending
    vocab = logits.shape[-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jnp.take_along_axis(ordered, (k - 1)[:, None], axis=-1)
    ordered = jnp.where(ordered < kth, -jnp.inf, ordered)
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
    kept = jnp.where(before < top_p[:, None], ordered, jnp.inf)
    threshold = jnp.maximum(jnp.min(kept, axis=-1, keepdims=True), kth)  # in the top k and the top-p set
    scaled = jnp.where(scaled < threshold, -jnp.inf, scaled)
    keys = jax.vmap(lambda s, t: jax.random.fold_in(jax.random.PRNGKey(s), t))(seeds, steps)
    drawn = jax.vmap(lambda key, row: jax.random.categorical(key, row))(keys, scaled).astype(jnp.int32)
    return jnp.where(temperature > 0, drawn, greedy)
