"""Configuration of the QST side network (docs/qst-method.md)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from qst_jax.methods.base import POOLS
from qst_jax.models.config import ConfigError, ModelConfig

DOWNSAMPLERS = ("adapter", "lora", "linear", "maxpool", "avgpool")
OUTPUT_MIXES = ("gated", "residual")
HEAD_LAYOUTS = ("wide", "official")
INPUT_NORMS = ("none", "backbone")
INIT_SCHEMES = ("fixed", "fan_in")
WIDE_HEAD_DIM = 64
TASKS = ("lm", "classification")


@dataclasses.dataclass(frozen=True)
class SideConfig:
    """What the side network looks like, independent of the backbone's weights.

    Attributes:
      reduction_factor: r; the side width is d / r.
      adapter_rank: k of the `adapter` and `lora` downsamplers.
      downsampler: one of DOWNSAMPLERS.
      side_heads: attention heads of the side blocks (None: as `head_layout` says).
      head_layout: the side heads when `side_heads` is None: "wide" (the
        default: heads of 64 dims, or one head over the whole width when it
        is narrower) or "official" (the backbone's head count, as the
        official code: head_dim 4 on SmolLM2, 8 on LLaMA-2).
      gate_init: initial per-layer gate logit z_i (sigmoid taken).
      output_gate_init: initial output gate logit z_out ("gated" mix).
      output_mix: how the side output meets the backbone's final state:
        "residual" (the default): o = Norm(h_L) + Up(s) with Up initialised
        to zero, so the model starts exactly at the backbone (the paper's
        intent); "gated" (the official code): o = a * Norm(h_L) + (1 - a) *
        Up(s), a = sigmoid(z_out). docs/quality.md has the measurements.
      input_norm: what each downsampler D_i reads: "none" (the official
        code: the raw residual state h_i) or "backbone" (h_i through the norm
        the backbone's next block applies to it: layer i+1's input norm, the
        final norm after the last layer). Residual states of LLaMA-family
        models carry a few massive dimensions (up to 25,984 on SmolLM2 where
        the typical state is about 6); the backbone's own norms tame them.
      task: "lm" (frozen LM head) or "classification" (trainable score).
      num_labels: classes for classification (1: regression, MSE).
      pool: classification: which states of o the score head reads, "last"
        (each row's last real token) or "mean" (over its real tokens).
      init_std: standard deviation of the side linears' normal init
        ("fixed"), and of the score head's.
      init_scheme: "fixed" (the official code: every side linear drawn with
        `init_std`) or "fan_in" (each side-block and downsampler linear drawn
        with std 1 / sqrt(its input width), so narrow side blocks start as
        working layers rather than near-identities).
    """

    reduction_factor: int = 16
    adapter_rank: int = 16
    downsampler: str = "adapter"
    side_heads: int | None = None
    head_layout: str = "wide"
    gate_init: float = 0.5
    output_gate_init: float = 1.0
    output_mix: str = "residual"
    input_norm: str = "none"
    task: str = "lm"
    num_labels: int = 2
    pool: str = "last"
    init_std: float = 0.02
    init_scheme: str = "fixed"

    def __post_init__(self) -> None:
        if self.downsampler not in DOWNSAMPLERS:
            raise ConfigError(f"side.downsampler {self.downsampler!r} is not one of {DOWNSAMPLERS}")
        if self.head_layout not in HEAD_LAYOUTS:
            raise ConfigError(f"side.head_layout {self.head_layout!r} is not one of {HEAD_LAYOUTS}")
        if self.output_mix not in OUTPUT_MIXES:
            raise ConfigError(f"side.output_mix {self.output_mix!r} is not one of {OUTPUT_MIXES}")
        if self.input_norm not in INPUT_NORMS:
            raise ConfigError(f"side.input_norm {self.input_norm!r} is not one of {INPUT_NORMS}")
        if self.task not in TASKS:
            raise ConfigError(f"side.task {self.task!r} is not one of {TASKS}")
        if self.init_scheme not in INIT_SCHEMES:
            raise ConfigError(f"side.init_scheme {self.init_scheme!r} is not one of {INIT_SCHEMES}")
        if self.pool not in POOLS:
            raise ConfigError(f"pool {self.pool!r} is not one of {POOLS}")
        if self.reduction_factor < 1 or self.adapter_rank < 1:
            raise ConfigError("side.reduction_factor and side.adapter_rank must be positive")
        if self.task == "classification" and self.num_labels < 1:
            raise ConfigError("side.num_labels must be >= 1 (1 means regression)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], **overrides: Any) -> SideConfig:
        """A SideConfig from a config section or an export (other keys, such as `remat`, are ignored).

        `side_heads` 0 (the config's "unset") means None. A record without
        `head_layout`, `output_mix` or `input_norm` (an export made before
        they existed) gets the layout it was trained with: "official",
        "gated" and "none".
        """
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {"head_layout": "official", "output_mix": "gated", "input_norm": "none"}
        kwargs.update({k: values[k] for k in values if k in names})
        kwargs.update(overrides)
        kwargs["side_heads"] = kwargs.get("side_heads") or None
        return cls(**kwargs)


def side_model_config(backbone: ModelConfig, side: SideConfig) -> ModelConfig:
    """The backbone family's block config at width d / r, MLP width I / r.

    Raises:
      ConfigError: widths or head counts that do not divide.
    """
    r = side.reduction_factor
    d = backbone.hidden_size
    if d % r or backbone.intermediate_size % r:
        raise ConfigError(
            f"reduction_factor {r} must divide hidden_size {d} and intermediate_size {backbone.intermediate_size}"
        )
    width = d // r
    if side.side_heads:
        heads = side.side_heads
    elif side.head_layout == "official":
        heads = backbone.num_heads
    else:
        heads = max(1, width // WIDE_HEAD_DIM)
        while width % heads:
            heads -= 1
    if width % heads:
        raise ConfigError(f"side width {width} is not divisible by side_heads {heads}")
    head_dim = width // heads
    if backbone.family == "llama" and head_dim % 2:
        raise ConfigError(f"side head_dim {head_dim} must be even for RoPE (width {width}, {heads} heads)")
    kv_heads = heads
    if backbone.num_kv_heads != backbone.num_heads and heads == backbone.num_heads:
        kv_heads = backbone.num_kv_heads
    return dataclasses.replace(
        backbone,
        hidden_size=width,
        intermediate_size=backbone.intermediate_size // r,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        word_embed_proj_dim=None,
        qkv_bias=backbone.qkv_bias,
    )
