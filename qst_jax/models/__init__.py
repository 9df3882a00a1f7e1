"""Frozen LLM backbones (LLaMA family, OPT) as pure functions over pytrees."""

from qst_jax.models.axes import logical_axes
from qst_jax.models.blocks import BlockContext, block_fn
from qst_jax.models.weight_sources import CheckpointError
from qst_jax.models.config import ConfigError, ModelConfig, from_hf_config
from qst_jax.models.decoder import forward, init_caches, lm_head, logits_fn
from qst_jax.models.backbone import Backbone
from qst_jax.models.loader import load_backbone, load_config, load_tokenizer

__all__ = [
    "Backbone",
    "BlockContext",
    "CheckpointError",
    "ConfigError",
    "ModelConfig",
    "block_fn",
    "forward",
    "from_hf_config",
    "init_caches",
    "lm_head",
    "load_backbone",
    "load_config",
    "load_tokenizer",
    "logical_axes",
    "logits_fn",
]
