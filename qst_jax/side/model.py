"""Tuning methods over a frozen backbone: QST (side network) and the QLoRA baseline.

Both expose the same functional interface, so one train step serves both:
  init(key) -> trainable params (float32 pytree)
  loss(params, backbone_params, batch) -> (loss sum, (weight sum, aux))
  logits(params, backbone_params, input_ids, attention_mask) -> float32 logits
A batch is a dict of `input_ids` and `attention_mask` `[B, T]` plus either
`loss_mask` `[B, T]` (LM: which tokens are targets) or `labels` and
`example_mask` `[B]` (classification).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from qst_jax.models.config import ModelConfig
from qst_jax.models.decoder import forward, lm_head
from qst_jax.models.layers import Params
from qst_jax.quant.matmul import LoRAWeight, linear
from qst_jax.side.config import SideConfig
from qst_jax.side.network import init_side_params, qst_hidden
from qst_jax.train.losses import chunked_lm_loss, classification_loss, last_token_index, shift_targets

Batch = dict[str, jax.Array]


def _task_loss(
    hidden: jax.Array, params: Params, backbone_params: Params, cfg: ModelConfig, batch: Batch, task: str, chunk: int
) -> tuple[jax.Array, tuple[jax.Array, dict[str, jax.Array]]]:
    if task == "lm":
        targets, weights = shift_targets(batch["input_ids"], batch["loss_mask"])
        total, count = chunked_lm_loss(hidden, lambda h: lm_head(backbone_params, cfg, h), targets, weights, chunk)
        return total, (count, {})
    logits = _score(hidden, params, batch["attention_mask"])
    total, count = classification_loss(logits, batch["labels"], batch["example_mask"])
    if logits.shape[-1] > 1:
        correct = jnp.sum((jnp.argmax(logits, -1) == batch["labels"]) * batch["example_mask"])
    else:
        correct = jnp.zeros((), jnp.float32)
    return total, (count, {"correct": correct.astype(jnp.float32)})


def _score(hidden: jax.Array, params: Params, attention_mask: jax.Array) -> jax.Array:
    last = last_token_index(attention_mask)
    pooled = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
    return linear(pooled, params["score"]["w"].astype(hidden.dtype)).astype(jnp.float32)


class _Heads:
    """Loss and logits from a method's `hidden` (the final states `o`)."""

    def loss(self, params: Params, backbone_params: Params, batch: Batch):
        hidden = self.hidden(params, backbone_params, batch["input_ids"], batch["attention_mask"])
        return _task_loss(hidden, params, backbone_params, self.cfg, batch, self.task, self.ce_chunk)

    def logits(self, params: Params, backbone_params: Params, input_ids: jax.Array, mask: jax.Array) -> jax.Array:
        hidden = self.hidden(params, backbone_params, input_ids, mask)
        if self.task == "lm":
            return lm_head(backbone_params, self.cfg, hidden).astype(jnp.float32)
        return _score(hidden, params, mask)


@dataclasses.dataclass(frozen=True)
class QSTModel(_Heads):
    """Quantized Side Tuning over a frozen backbone.

    Attributes:
      cfg: the backbone's ModelConfig.
      side: the SideConfig.
      dtype: compute dtype.
      ce_chunk: tokens per chunk of the LM cross-entropy.
      remat_side: recompute side blocks in the backward pass.
      attention_impl: passed to `jax.nn.dot_product_attention`.
      hidden_store: how the backward keeps backbone states ("compute", "fp8").
    """

    cfg: ModelConfig
    side: SideConfig
    dtype: Any = jnp.bfloat16
    ce_chunk: int = 1024
    remat_side: bool = False
    attention_impl: str | None = None
    hidden_store: str = "compute"

    @property
    def task(self) -> str:
        return self.side.task

    def init(self, key: jax.Array) -> Params:
        return init_side_params(self.cfg, self.side, key)

    def hidden(self, params: Params, backbone_params: Params, input_ids: jax.Array, mask: jax.Array) -> jax.Array:
        return qst_hidden(
            params,
            backbone_params,
            self.cfg,
            self.side,
            input_ids,
            mask,
            dtype=self.dtype,
            attention_impl=self.attention_impl,
            remat_side=self.remat_side,
            hidden_store=self.hidden_store,
        )



@dataclasses.dataclass(frozen=True)
class FrozenModel(_Heads):
    """The backbone alone (LM tasks): the reference every method must beat."""

    cfg: ModelConfig
    dtype: Any = jnp.bfloat16
    ce_chunk: int = 1024
    attention_impl: str | None = None
    task: str = "lm"

    def init(self, key: jax.Array) -> Params:
        return {}

    def hidden(self, params: Params, backbone_params: Params, input_ids: jax.Array, mask: jax.Array) -> jax.Array:
        out = forward(backbone_params, self.cfg, input_ids, mask, dtype=self.dtype, attention_impl=self.attention_impl)
        return out.hidden



LORA_TARGETS = {
    "llama": (("attn", "q"), ("attn", "k"), ("attn", "v"), ("attn", "o"), ("mlp", "gate"), ("mlp", "up"), ("mlp", "down")),
    "opt": (("attn", "q"), ("attn", "k"), ("attn", "v"), ("attn", "o"), ("mlp", "fc1"), ("mlp", "fc2")),
}


@dataclasses.dataclass(frozen=True)
class QLoRAModel(_Heads):
    """The QLoRA baseline: LoRA on every linear of the NF4 backbone.

    Gradients flow through the frozen backbone (that is QLoRA's cost);
    `remat` recomputes each layer in the backward pass to save memory.
    """

    cfg: ModelConfig
    rank: int = 16
    alpha: float = 16.0
    task: str = "lm"
    num_labels: int = 2
    dtype: Any = jnp.bfloat16
    ce_chunk: int = 1024
    remat: bool = True
    attention_impl: str | None = None

    def init(self, key: jax.Array) -> Params:
        shapes = _layer_linear_shapes(self.cfg)
        keys = jax.random.split(key, len(shapes) + 1)
        lora: Params = {}
        for k, (path, (out_dim, in_dim)) in zip(keys, shapes.items()):
            bound = 1.0 / in_dim**0.5
            a = jax.random.uniform(k, (self.cfg.num_layers, self.rank, in_dim), jnp.float32, -bound, bound)
            lora["/".join(path)] = {"a": a, "b": jnp.zeros((self.cfg.num_layers, out_dim, self.rank), jnp.float32)}
        params: Params = {"lora": lora}
        if self.task == "classification":
            d = self.cfg.hidden_size
            params["score"] = {"w": jax.random.normal(keys[-1], (self.num_labels, d), jnp.float32) * 0.02}
        return params

    def merged(self, params: Params, backbone_params: Params) -> Params:
        """Backbone params with each targeted linear wrapped as a LoRAWeight."""
        layers = dict(backbone_params["layers"])
        for key, ab in params["lora"].items():
            module_name, linear_name = key.split("/")
            module = dict(layers[module_name])
            lin = dict(module[linear_name])
            lin["w"] = LoRAWeight(base=lin["w"], a=ab["a"], b=ab["b"], scale=self.alpha / self.rank)
            module[linear_name] = lin
            layers[module_name] = module
        return {**backbone_params, "layers": layers}

    def hidden(self, params: Params, backbone_params: Params, input_ids: jax.Array, mask: jax.Array) -> jax.Array:
        merged = self.merged(params, backbone_params)
        out = forward(
            merged, self.cfg, input_ids, mask, dtype=self.dtype, attention_impl=self.attention_impl, remat=self.remat
        )
        return out.hidden



def _layer_linear_shapes(cfg: ModelConfig) -> dict[tuple[str, str], tuple[int, int]]:
    from qst_jax.models.loader import layer_specs

    shapes = {}
    for path, _, shape, is_linear in layer_specs(cfg):
        if is_linear and path[:2] in LORA_TARGETS[cfg.family]:
            shapes[path[:2]] = shape
    return shapes


__all__ = ["LORA_TARGETS", "FrozenModel", "QLoRAModel", "QSTModel"]
