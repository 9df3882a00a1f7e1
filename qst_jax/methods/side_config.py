"""Configuration of the QST side network (docs/qst-method.md)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from qst_jax.methods.base import POOLS, TASKS
from qst_jax.methods.settings import field_problems, setting, settings
from qst_jax.models.config import ConfigError, ModelConfig

DOWNSAMPLERS = ("adapter", "lora", "linear", "maxpool", "avgpool")
OUTPUT_MIXES = ("gated", "residual")
HEAD_LAYOUTS = ("wide", "official")
INPUT_NORMS = ("none", "backbone")
INIT_SCHEMES = ("fixed", "fan_in")
HIDDEN_STORES = ("auto", "compute", "fp8")
WIDE_HEAD_DIM = 64


@dataclasses.dataclass(frozen=True, kw_only=True)
class SideConfig:
    """What the side network looks like, independent of the backbone's weights (docs/qst-method.md).

    The one definition of every side-network setting: the run config's
    `side` section, its validation, the sweepable, shape-changing and
    init-only key sets are derived from these fields' `setting`s.
    """

    # r: the side width is d / r.
    reduction_factor: int = setting(16, key="side.reduction_factor", minimum=1, sweep=True, shape=True)
    # k of the `adapter` and `lora` downsamplers.
    adapter_rank: int = setting(16, key="side.adapter_rank", minimum=1, sweep=True, shape=True)
    # D_i, backbone state to side width: adapter | lora | linear | maxpool | avgpool.
    downsampler: str = setting("adapter", key="side.downsampler", choices=DOWNSAMPLERS, sweep=True, shape=True)
    # Attention heads of the side blocks; 0: as head_layout says.
    side_heads: int = setting(0, key="side.side_heads", minimum=0, sweep=True, shape=True)
    # The side heads when side_heads is 0: "wide" (heads of 64 dims, or one head when the width is narrower)
    # or "official" (the backbone's head count, as the official code: head_dim 4 on SmolLM2, 8 on LLaMA-2).
    head_layout: str = setting("wide", key="side.head_layout", choices=HEAD_LAYOUTS, sweep=True, shape=True)
    # Initial per-layer gate logit z_i (sigmoid taken).
    gate_init: float = setting(0.5, key="side.gate_init", sweep=True, init_only=True)
    # Initial output gate logit z_out ("gated" mix).
    output_gate_init: float = setting(1.0, key="side.output_gate_init", sweep=True, init_only=True)
    # How the side output meets the backbone's final state: "residual", o = Norm(h_L) + Up(s) with Up zero at
    # init, so the model starts exactly at the backbone (the paper's intent); "gated" (the official code):
    # o = a * Norm(h_L) + (1 - a) * Up(s), a = sigmoid(z_out). docs/quality.md has the measurements.
    output_mix: str = setting("residual", key="side.output_mix", choices=OUTPUT_MIXES, sweep=True, shape=True)
    # What D_i reads: "none" (the official code: the raw residual state h_i) or "backbone" (h_i through the
    # norm the backbone's next block applies to it). LLaMA-family residual states carry a few massive
    # dimensions; the backbone's own norms tame them.
    input_norm: str = setting("none", key="side.input_norm", choices=INPUT_NORMS, sweep=True, shape=True)
    # "lm" (the frozen LM head) or "classification" (a trainable score); from the run's `task`.
    task: str = setting("lm", choices=TASKS, shape=True)
    # Classes for classification (1: regression, MSE).
    num_labels: int = setting(2, key="data.num_labels", minimum=1, shape=True)
    # Classification: which states of o the score reads, each row's "last" real token or the "mean".
    pool: str = setting("last", key="data.pool", choices=POOLS, sweep=True, shape=True)
    # Standard deviation of the side linears' normal init ("fixed"), and of the score head's.
    init_std: float = setting(0.02, key="side.init_std", sweep=True, init_only=True)
    # "fixed" (the official code: every side linear drawn with init_std) or "fan_in" (each side-block and
    # downsampler linear drawn with std 1 / sqrt(its input width)).
    init_scheme: str = setting("fixed", key="side.init_scheme", choices=INIT_SCHEMES, sweep=True, init_only=True)

    def __post_init__(self) -> None:
        object.__setattr__(self, "side_heads", self.side_heads or 0)  # None (older records) is 0
        problems = field_problems(self, prefix="side.")
        if problems:
            raise ConfigError(problems[0])

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], **overrides: Any) -> SideConfig:
        """A SideConfig from a config section or an export (other keys, such as `remat`, are ignored).

        A record without `head_layout`, `output_mix` or `input_norm` (an
        export made before they existed) gets the layout it was trained with:
        "official", "gated" and "none".
        """
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {"head_layout": "official", "output_mix": "gated", "input_norm": "none"}
        kwargs.update({k: values[k] for k in values if k in names})
        kwargs.update(overrides)
        return cls(**kwargs)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SideOptions:
    """How a side network runs, not what it is (not stored with its params): the rest of the `side` section."""

    # Recompute side blocks in the backward pass (each layer keeps only its side-width inputs).
    remat: bool = setting(True, key="side.remat")
    # How the backward keeps backbone states for trainable downsamplers: "fp8", "compute" (bf16), or "auto":
    # fp8 on a GPU (half the bytes), compute on a CPU (XLA emulates fp8 there, slowly).
    hidden_store: str = setting("auto", key="side.hidden_store", choices=HIDDEN_STORES)


def init_only_fields() -> tuple[str, ...]:
    """SideConfig fields that change the init, never the forward."""
    return tuple(f.name for f in settings(SideConfig) if f.metadata["init_only"])


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
