"""Quantized Side Tuning: a small side network over the frozen NF4 backbone (docs/qst-method.md)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from qst_jax.methods.base import TaskHeads
from qst_jax.methods.side_config import SideConfig, side_model_config
from qst_jax.methods.side_network import qst_pass
from qst_jax.methods.side_params import init_side_params
from qst_jax.models.config import ModelConfig
from qst_jax.models.decoder import init_caches
from qst_jax.models.layers import Params


@dataclasses.dataclass(frozen=True)
class QSTModel(TaskHeads):
    """Quantized Side Tuning over a frozen backbone.

    The side network's params are the only trainable ones; the backbone runs
    under `stop_gradient` in the same `lax.scan` as the side blocks
    (`side_network.qst_pass`).

    Attributes:
      cfg: the backbone's ModelConfig.
      side: the SideConfig (it holds the task and label count).
      dtype: compute dtype.
      ce_chunk: tokens per chunk of the LM cross-entropy.
      remat_side: recompute side blocks in the backward pass.
      attention_impl: passed to `jax.nn.dot_product_attention`.
      hidden_store: how the backward keeps backbone states ("compute", "fp8", or
        "auto": fp8 on a GPU, compute elsewhere), any of them with the suffix
        "@host" to keep them in host memory (`model.offload="weights+states"`).
    """

    name: ClassVar[str] = "qst"
    cfg: ModelConfig
    side: SideConfig
    dtype: Any = jnp.bfloat16
    ce_chunk: int = 1024
    remat_side: bool = True
    attention_impl: str | None = None
    hidden_store: str = "auto"

    @property
    def task(self) -> str:
        return self.side.task

    @property
    def num_labels(self) -> int:
        return self.side.num_labels

    @property
    def pool(self) -> str:
        return self.side.pool

    def init(self, key: jax.Array) -> Params:
        return init_side_params(self.cfg, self.side, key)

    def hidden(self, params: Params, backbone_params: Params, ids: jax.Array, mask: jax.Array, *,
               positions: jax.Array | None = None, key_mask: jax.Array | None = None,
               caches: Params | None = None, cache_index: jax.Array | None = None):
        return qst_pass(
            params, backbone_params, self.cfg, self.side, ids, mask, positions=positions, key_mask=key_mask,
            caches=caches, cache_index=cache_index, dtype=self.dtype, attention_impl=self.attention_impl,
            remat_side=self.remat_side, hidden_store=self.hidden_store,
        )

    def init_caches(self, batch: int, length: int) -> Params:
        side_cfg = side_model_config(self.cfg, self.side)
        return {
            "backbone": init_caches(self.cfg, batch, length, self.dtype),
            "side": init_caches(side_cfg, batch, length, self.dtype),
        }

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.name, "task": self.task, "num_labels": self.num_labels, "pool": self.pool,
                "side": self.side.to_dict()}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], cfg: ModelConfig, **options: Any) -> QSTModel:
        side = SideConfig.from_dict(values["side"], task=values["task"], num_labels=values["num_labels"],
                                    pool=values.get("pool", "last"))
        return cls(cfg, side, **options)
