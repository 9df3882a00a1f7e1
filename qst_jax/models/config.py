"""Decoder configuration, read from HF `config.json` files (v4 and v5 layouts).

One frozen dataclass describes every supported family. `family` picks the
decoder block: "llama" (LLaMA 1/2/3.x, Mistral, Qwen2/2.5, SmolLM2: RMSNorm,
RoPE, SwiGLU, GQA) or "opt" (learned positions, LayerNorm, ReLU, biases).
The side network builds its own `ModelConfig` at reduced width with
`dataclasses.replace`, so one block implementation serves both.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any
from qst_jax.errors import QSTError

LLAMA_TYPES = ("llama", "mistral", "qwen2", "smollm2")
OPT_TYPES = ("opt",)
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


class ConfigError(QSTError, ValueError):
    """A model configuration that qst_jax cannot run."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shapes and numerics of a decoder-only LM.

    Attributes:
      family: "llama" or "opt" (which block implementation runs).
      model_type: the HF `model_type` it came from.
      vocab_size, hidden_size, intermediate_size, num_layers: sizes.
      num_heads, num_kv_heads, head_dim: attention layout; `num_heads %
        num_kv_heads == 0`.
      norm_eps: RMSNorm / LayerNorm epsilon.
      rope_theta, rope_scaling: RoPE base and HF scaling dict (llama family);
        `rope_scaling["rope_type"]` in SUPPORTED_ROPE_TYPES.
      max_position_embeddings: context length (OPT: learned table size - 2).
      tie_word_embeddings: LM head shares the embedding matrix.
      qkv_bias, o_bias, mlp_bias: which linears carry biases.
      activation: MLP activation ("silu", "relu", "gelu", "gelu_new").
      sliding_window: Mistral-style window (None: full causal attention).
      word_embed_proj_dim: OPT's embedding width (project_in/out when it
        differs from hidden_size).
      do_layer_norm_before: OPT pre-LN (True) or post-LN (False).
      final_norm: apply the decoder's final norm.
      pad_token_id, bos_token_id, eos_token_id: special tokens (may be None).
    """

    family: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] = (("rope_type", "default"),)
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    activation: str = "silu"
    sliding_window: int | None = None
    word_embed_proj_dim: int | None = None
    do_layer_norm_before: bool = True
    final_norm: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.family not in ("llama", "opt"):
            raise ConfigError(f"unknown family {self.family!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        rope_type = self.rope.get("rope_type", "default")
        if self.family == "llama" and rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(f"RoPE scaling type {rope_type!r} is not supported (supported: {SUPPORTED_ROPE_TYPES})")

    @property
    def rope(self) -> dict[str, Any]:
        return dict(self.rope_scaling)

    @property
    def embed_dim(self) -> int:
        """Width of the token embedding table (OPT may project it)."""
        return self.word_embed_proj_dim or self.hidden_size

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["rope_scaling"] = dict(self.rope_scaling)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        d = dict(d)
        d["rope_scaling"] = tuple(sorted(dict(d.get("rope_scaling") or {"rope_type": "default"}).items()))
        if isinstance(d.get("eos_token_id"), list):
            d["eos_token_id"] = tuple(d["eos_token_id"])
        return cls(**d)


def _freeze_rope(scaling: Mapping[str, Any] | None) -> tuple[tuple[str, Any], ...]:
    scaling = dict(scaling or {})
    scaling.pop("rope_theta", None)
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    scaling.setdefault("rope_type", "default")
    frozen = []
    for key, value in sorted(scaling.items()):
        frozen.append((key, tuple(value) if isinstance(value, list) else value))
    return tuple(frozen)


def from_hf_config(hf: Mapping[str, Any], *, source: str = "config.json") -> ModelConfig:
    """Builds a ModelConfig from a HF `config.json` dict (transformers v4 or v5).

    Raises:
      ConfigError: unsupported `model_type` or missing fields, naming `source`.
    """
    model_type = hf.get("model_type")
    eos = hf.get("eos_token_id")
    if isinstance(eos, list):
        eos = tuple(eos)
    common = dict(
        model_type=model_type,
        pad_token_id=hf.get("pad_token_id"),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=eos,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", model_type == "opt")),
    )
    try:
        if model_type in LLAMA_TYPES:
            heads = hf["num_attention_heads"]
            hidden = hf["hidden_size"]
            rope_params = hf.get("rope_parameters") or {}
            theta = rope_params.get("rope_theta", hf.get("rope_theta", 10000.0))
            scaling = rope_params if rope_params else hf.get("rope_scaling")
            qkv_bias = model_type == "qwen2" or bool(hf.get("attention_bias", False))
            window = hf.get("sliding_window")
            if model_type == "qwen2" and not hf.get("use_sliding_window", False):
                window = None
            return ModelConfig(
                family="llama",
                vocab_size=hf["vocab_size"],
                hidden_size=hidden,
                intermediate_size=hf["intermediate_size"],
                num_layers=hf["num_hidden_layers"],
                num_heads=heads,
                num_kv_heads=hf.get("num_key_value_heads") or heads,
                head_dim=hf.get("head_dim") or hidden // heads,
                norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                rope_theta=float(theta),
                rope_scaling=_freeze_rope(scaling),
                max_position_embeddings=hf.get("max_position_embeddings", 2048),
                qkv_bias=qkv_bias,
                o_bias=bool(hf.get("attention_bias", False)),
                mlp_bias=bool(hf.get("mlp_bias", False)),
                activation=hf.get("hidden_act", "silu"),
                sliding_window=window,
                **common,
            )
        if model_type in OPT_TYPES:
            heads = hf["num_attention_heads"]
            hidden = hf["hidden_size"]
            bias = bool(hf.get("enable_bias", True))
            pre_ln = bool(hf.get("do_layer_norm_before", True))
            proj = hf.get("word_embed_proj_dim") or hidden
            return ModelConfig(
                family="opt",
                vocab_size=hf["vocab_size"],
                hidden_size=hidden,
                intermediate_size=hf["ffn_dim"],
                num_layers=hf["num_hidden_layers"],
                num_heads=heads,
                num_kv_heads=heads,
                head_dim=hidden // heads,
                norm_eps=1e-5,
                max_position_embeddings=hf.get("max_position_embeddings", 2048),
                qkv_bias=bias,
                o_bias=bias,
                mlp_bias=bias,
                activation=hf.get("activation_function", "relu"),
                word_embed_proj_dim=proj,
                do_layer_norm_before=pre_ln,
                final_norm=pre_ln and not hf.get("_remove_final_layer_norm", False),
                **common,
            )
    except KeyError as err:
        raise ConfigError(f"{source}: missing field {err.args[0]!r} for model_type {model_type!r}") from err
    raise ConfigError(
        f"{source}: model_type {model_type!r} is not supported (supported: {', '.join(LLAMA_TYPES + OPT_TYPES)})"
    )
