"""The backbone alone: the reference every method must beat, plain generation, and the linear probe.

With `task="classification"` the frozen backbone gets a trainable score
head on its final state at each row's last real token: a linear probe, the
reference that shows how much a side network adds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from qst_jax.methods.base import TaskHeads, score_init
from qst_jax.models.config import ModelConfig
from qst_jax.models.decoder import forward, init_caches
from qst_jax.models.layers import Params


@dataclasses.dataclass(frozen=True)
class FrozenModel(TaskHeads):
    """The frozen backbone with its LM head (no trainable params), or a linear probe.

    Attributes:
      cfg: the backbone's ModelConfig.
      dtype: compute dtype.
      task, num_labels: "lm" (nothing to train), or "classification" (a
        trainable score over `num_labels` classes).
      pool: which states the score reads ("last" or "mean"; classification).
      ce_chunk: tokens per chunk of the LM cross-entropy.
      attention_impl: passed to `jax.nn.dot_product_attention`.
    """

    name: ClassVar[str] = "frozen"
    cfg: ModelConfig
    dtype: Any = jnp.bfloat16
    ce_chunk: int = 1024
    attention_impl: str | None = None
    task: str = "lm"
    num_labels: int = 0
    pool: str = "last"

    def init(self, key: jax.Array) -> Params:
        if self.task == "classification":
            return score_init(key, self.num_labels, self.cfg.hidden_size)
        return {}

    def hidden(self, params: Params, backbone_params: Params, ids: jax.Array, mask: jax.Array, *,
               positions: jax.Array | None = None, key_mask: jax.Array | None = None,
               caches: Params | None = None, cache_index: jax.Array | None = None):
        return forward(
            backbone_params, self.cfg, ids, mask, dtype=self.dtype, positions=positions, key_mask=key_mask,
            caches=caches, cache_index=cache_index, attention_impl=self.attention_impl,
        )

    def init_caches(self, batch: int, length: int) -> Params:
        return init_caches(self.cfg, batch, length, self.dtype)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.name, "task": self.task, "num_labels": self.num_labels, "pool": self.pool}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], cfg: ModelConfig, **options: Any) -> FrozenModel:
        return cls(cfg, task=values.get("task", "lm"), num_labels=int(values.get("num_labels", 0)),
                   pool=values.get("pool", "last"), **options)
