"""`Backbone`: a frozen decoder's config and params, as a loader hands it over."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from qst_jax.models.axes import logical_axes
from qst_jax.models.config import ModelConfig
from qst_jax.models.decoder import logits_fn
from qst_jax.quant.nf4 import NF4Weight


@dataclasses.dataclass
class Backbone:
    """A frozen decoder: config, params (a pytree) and where it came from.

    Attributes:
      cfg: the ModelConfig.
      params: the parameter pytree (decoder.py documents its layout); linear
        weights are NF4Weight when quantized.
      dtype: compute dtype.
      source: the path it was loaded from.
      axes: logical axis names of every parameter (`models.axes`).
    """

    cfg: ModelConfig
    params: dict[str, Any]
    dtype: Any = jnp.bfloat16
    source: str = ""
    axes: dict[str, tuple[str | None, ...]] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.axes:
            self.axes = logical_axes(self.params)
        self._logits = jax.jit(logits_fn(self.cfg, dtype=self.dtype))

    def logits(self, input_ids: Any, attention_mask: Any = None) -> jax.Array:
        """Float32 logits `[B, T, vocab]` of `input_ids` `[B, T]`."""
        input_ids = jnp.asarray(input_ids, jnp.int32)
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        return self._logits(self.params, input_ids, jnp.asarray(attention_mask, jnp.int32))

    @property
    def quantized(self) -> bool:
        return isinstance(self.params["layers"]["attn"]["q"]["w"], NF4Weight)
