"""The interface every tuning method offers, and the task heads they share.

A method is a frozen dataclass over a frozen backbone. Train, eval, generate
and export use only this interface, never the method's class:

  name                       "qst", "qlora" or "frozen" (the export's key)
  task, num_labels           "lm" (frozen LM head) or "classification" (a
                             trainable score over `num_labels` classes)
  init(key) -> params        trainable params (float32 pytree; {} for frozen)
  hidden(params, backbone_params, ids, mask, *, positions=None,
         key_mask=None, caches=None, cache_index=None) -> (o, caches)
                             the final states `o` `[B, T, d]` that the head
                             reads; with caches, one cached decoding pass
  init_caches(batch, length) -> empty KV caches for `hidden`
  pool                       classification: which states the score reads,
                             "last" (each row's last real token) or "mean"
                             (the mean over its real tokens)
  head(params, backbone_params, o, mask) -> float32 logits: `[B, T, vocab]`
                             (lm) or `[B, num_labels]` pooled as `pool`
                             says (classification)
  logits(params, backbone_params, ids, mask) = head(hidden(...))
  loss(params, backbone_params, batch) -> (loss sum, (weight sum, aux))
  loss_weight(batch)         that weight sum alone (float32), from the masks
  to_dict() / from_dict(d, backbone_cfg, **options): what the export holds

A batch is a dict of `input_ids` and `attention_mask` `[B, T]` plus either
`loss_mask` `[B, T]` (LM: which tokens are targets) or `labels` and
`example_mask` `[B]` (classification). Losses are sums in float32, so
micro-batches add up and every token (or example) weighs the same.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol

import jax
import jax.numpy as jnp

from qst_jax.errors import InputError
from qst_jax.methods.losses import chunked_lm_loss, classification_loss, last_token_index, shift_targets
from qst_jax.models.config import ModelConfig
from qst_jax.models.decoder import lm_head
from qst_jax.models.layers import Params
from qst_jax.quant.matmul import linear

Batch = dict[str, jax.Array]
TASKS = ("lm", "classification")
POOLS = ("last", "mean")


class Method(Protocol):
    """What train, eval, generate and export call (see the module docstring)."""

    name: ClassVar[str]
    cfg: ModelConfig
    dtype: Any

    @property
    def task(self) -> str: ...

    @property
    def num_labels(self) -> int: ...

    @property
    def pool(self) -> str: ...

    def init(self, key: jax.Array) -> Params: ...

    def hidden(self, params: Params, backbone_params: Params, ids: jax.Array, mask: jax.Array, *,
               positions: jax.Array | None = None, key_mask: jax.Array | None = None,
               caches: Params | None = None, cache_index: jax.Array | None = None) -> tuple[jax.Array, Any]: ...

    def init_caches(self, batch: int, length: int) -> Params: ...

    def head(self, params: Params, backbone_params: Params, hidden: jax.Array, mask: jax.Array) -> jax.Array: ...

    def logits(self, params: Params, backbone_params: Params, ids: jax.Array, mask: jax.Array) -> jax.Array: ...

    def loss(self, params: Params, backbone_params: Params, batch: Batch) -> tuple[jax.Array, Any]: ...

    def loss_weight(self, batch: Batch) -> jax.Array: ...

    def to_dict(self) -> dict[str, Any]: ...


def score_init(key: jax.Array, num_labels: int, width: int, std: float = 0.02) -> Params:
    """The classification head's params: `{"score": {"w": [num_labels, width]}}`."""
    return {"score": {"w": jax.random.normal(key, (num_labels, width), jnp.float32) * std}}


def score(params: Params, hidden: jax.Array, mask: jax.Array, pool: str = "last") -> jax.Array:
    """Float32 class logits `[B, C]` from `hidden` `[B, T, d]` pooled over each row's real tokens.

    Args:
      pool: "last" (each row's last real token) or "mean" (the mean over its
        real tokens, summed in float32).
    """
    if pool not in POOLS:
        raise InputError(f"pool {pool!r} is not one of {POOLS}")
    if pool == "mean":
        weights = mask.astype(jnp.float32)[..., None]
        total = jnp.sum(hidden.astype(jnp.float32) * weights, axis=1)
        pooled = (total / jnp.maximum(jnp.sum(weights, axis=1), 1.0)).astype(hidden.dtype)
    else:
        last = last_token_index(mask)
        pooled = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
    return linear(pooled, params["score"]["w"].astype(hidden.dtype)).astype(jnp.float32)


class TaskHeads:
    """`head`, `logits` and `loss` of a method, from its `hidden`.

    Subclasses provide `cfg`, `task`, `pool`, `ce_chunk` and `hidden`.
    """

    def head(self, params: Params, backbone_params: Params, hidden: jax.Array, mask: jax.Array) -> jax.Array:
        if self.task == "lm":
            return lm_head(backbone_params, self.cfg, hidden).astype(jnp.float32)
        return score(params, hidden, mask, self.pool)

    def logits(self, params: Params, backbone_params: Params, ids: jax.Array, mask: jax.Array) -> jax.Array:
        hidden, _ = self.hidden(params, backbone_params, ids, mask)
        return self.head(params, backbone_params, hidden, mask)

    def loss_weight(self, batch: Batch) -> jax.Array:
        """The float32 weight `loss` sums over: target tokens (lm) or real examples (classification)."""
        if self.task == "lm":
            return jnp.sum(shift_targets(batch["input_ids"], batch["loss_mask"])[1])
        return jnp.sum(batch["example_mask"].astype(jnp.float32))

    def loss(self, params: Params, backbone_params: Params, batch: Batch):
        hidden, _ = self.hidden(params, backbone_params, batch["input_ids"], batch["attention_mask"])
        if self.task == "lm":
            targets, weights = shift_targets(batch["input_ids"], batch["loss_mask"])
            head = lambda h: lm_head(backbone_params, self.cfg, h)  # noqa: E731
            total, count = chunked_lm_loss(hidden, head, targets, weights, self.ce_chunk, frozen_head=True)
            return total, (count, {})
        logits = score(params, hidden, batch["attention_mask"], self.pool)
        total, count = classification_loss(logits, batch["labels"], batch["example_mask"])
        if logits.shape[-1] > 1:
            correct = jnp.sum((jnp.argmax(logits, -1) == batch["labels"]) * batch["example_mask"])
        else:
            correct = jnp.zeros((), jnp.float32)
        return total, (count, {"correct": correct.astype(jnp.float32)})
