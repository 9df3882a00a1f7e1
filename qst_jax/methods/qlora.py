"""The QLoRA baseline: a trainable low-rank update on every linear of the NF4 backbone.

LoRA is a tree transform: `merged(params, backbone_params)` wraps each
targeted backbone linear as a `LoRAWeight` (frozen NF4 plus `B @ A`), and the
same decoder runs over the result, so there is one block implementation and
one `matmul` entry point. Gradients flow through every backbone layer (that
is QLoRA's cost); `remat` recomputes each layer in the backward pass.

Params: `{"lora": {"attn": {"q": {"a": [L, r, in], "b": [L, out, r]}, ...},
"mlp": {...}}, "score"?: {"w": [num_labels, d]}}`, nested like the backbone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from qst_jax.methods.base import TaskHeads, score_init
from qst_jax.methods.settings import field_problems, setting
from qst_jax.models.config import ConfigError, ModelConfig
from qst_jax.models.decoder import forward, init_caches
from qst_jax.models.layers import Params
from qst_jax.models.params import layer_specs
from qst_jax.quant.matmul import LoRAWeight

LORA_TARGETS = {
    "llama": (("attn", "q"), ("attn", "k"), ("attn", "v"), ("attn", "o"), ("mlp", "gate"), ("mlp", "up"), ("mlp", "down")),
    "opt": (("attn", "q"), ("attn", "k"), ("attn", "v"), ("attn", "o"), ("mlp", "fc1"), ("mlp", "fc2")),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class QLoRAConfig:
    """The QLoRA baseline's settings: the one definition of the run config's `qlora` section."""

    # LoRA's r on every targeted linear.
    rank: int = setting(16, key="qlora.rank", minimum=1, shape=True)
    # LoRA's alpha: the update B @ A is scaled by alpha / r.
    alpha: float = setting(16.0, key="qlora.alpha")
    # Recompute each layer in the backward pass (runtime only, not stored with the params).
    remat: bool = setting(True, key="qlora.remat")

    def __post_init__(self) -> None:
        problems = field_problems(self)
        if problems:
            raise ConfigError(problems[0])


@dataclasses.dataclass(frozen=True)
class QLoRAModel(TaskHeads):
    """The QLoRA baseline: LoRA on every linear of the NF4 backbone.

    Attributes:
      cfg: the backbone's ModelConfig.
      rank, alpha: LoRA's r and alpha (the update is scaled by alpha / r).
      task, num_labels: "lm" or "classification" over `num_labels` classes.
      pool: which states the score reads ("last" or "mean"; classification).
      dtype, ce_chunk, attention_impl: as for QSTModel.
      remat: recompute each layer in the backward pass.
    """

    name: ClassVar[str] = "qlora"
    cfg: ModelConfig
    rank: int = 16
    alpha: float = 16.0
    task: str = "lm"
    num_labels: int = 2
    pool: str = "last"
    dtype: Any = jnp.bfloat16
    ce_chunk: int = 1024
    remat: bool = True
    attention_impl: str | None = None

    def init(self, key: jax.Array) -> Params:
        shapes = _layer_linear_shapes(self.cfg)
        keys = jax.random.split(key, len(shapes) + 1)
        lora: Params = {}
        for k, ((module, linear), (out_dim, in_dim)) in zip(keys, shapes.items()):
            bound = 1.0 / in_dim**0.5
            a = jax.random.uniform(k, (self.cfg.num_layers, self.rank, in_dim), jnp.float32, -bound, bound)
            b = jnp.zeros((self.cfg.num_layers, out_dim, self.rank), jnp.float32)
            lora.setdefault(module, {})[linear] = {"a": a, "b": b}
        params: Params = {"lora": lora}
        if self.task == "classification":
            params.update(score_init(keys[-1], self.num_labels, self.cfg.hidden_size))
        return params

    def merged(self, params: Params, backbone_params: Params) -> Params:
        """Backbone params with each targeted linear wrapped as a LoRAWeight."""
        layers = dict(backbone_params["layers"])
        for module_name, linears in params["lora"].items():
            module = dict(layers[module_name])
            for linear_name, ab in linears.items():
                lin = dict(module[linear_name])
                lin["w"] = LoRAWeight(base=lin["w"], a=ab["a"], b=ab["b"], scale=self.alpha / self.rank)
                module[linear_name] = lin
            layers[module_name] = module
        return {**backbone_params, "layers": layers}

    def hidden(self, params: Params, backbone_params: Params, ids: jax.Array, mask: jax.Array, *,
               positions: jax.Array | None = None, key_mask: jax.Array | None = None,
               caches: Params | None = None, cache_index: jax.Array | None = None):
        return forward(
            self.merged(params, backbone_params), self.cfg, ids, mask, dtype=self.dtype, positions=positions,
            key_mask=key_mask, caches=caches, cache_index=cache_index, attention_impl=self.attention_impl,
            remat=self.remat,
        )

    def init_caches(self, batch: int, length: int) -> Params:
        return init_caches(self.cfg, batch, length, self.dtype)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.name, "task": self.task, "num_labels": self.num_labels, "pool": self.pool,
                "qlora": {"rank": self.rank, "alpha": self.alpha}}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], cfg: ModelConfig, **options: Any) -> QLoRAModel:
        q = values["qlora"]
        return cls(cfg, rank=int(q["rank"]), alpha=float(q["alpha"]), task=values["task"],
                   num_labels=int(values["num_labels"]), pool=values.get("pool", "last"), **options)


def _layer_linear_shapes(cfg: ModelConfig) -> dict[tuple[str, str], tuple[int, int]]:
    shapes = {}
    for path, _, shape, is_linear in layer_specs(cfg):
        if is_linear and path[:2] in LORA_TARGETS[cfg.family]:
            shapes[path[:2]] = shape
    return shapes
