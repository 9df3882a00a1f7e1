"""Random backbones built directly on the device, NF4 or dense (benchmarks, tests).

No checkpoint and no float copy of the weights: NF4 leaves are drawn as random
codes and scales with the right shapes and dtypes, so a 70B-shaped backbone
costs only its 4-bit bytes.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from qst_jax.models.config import ModelConfig
from qst_jax.models.layers import Params
from qst_jax.models.params import global_specs, layer_specs
from qst_jax.quant.nf4 import NESTED_BLOCKSIZE, NF4Weight
from qst_jax.tree import set_path

LLAMA2_SHAPES = {
    "tiny": dict(hidden_size=256, intermediate_size=704, num_layers=4, num_heads=8, num_kv_heads=8, vocab_size=1024),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32, num_kv_heads=32, vocab_size=32000),
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40, num_kv_heads=40, vocab_size=32000),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64, num_kv_heads=8, vocab_size=32000),
}


def llama2_config(size: str) -> ModelConfig:
    """A LLaMA-2-shaped ModelConfig ("tiny", "7b", "13b", "70b")."""
    shape = LLAMA2_SHAPES[size]
    return ModelConfig(
        family="llama", model_type="llama", head_dim=shape["hidden_size"] // shape["num_heads"],
        max_position_embeddings=4096, norm_eps=1e-5, **shape,
    )


def random_nf4(key: jax.Array, lead: tuple[int, ...], shape: tuple[int, int], blocksize: int = 64) -> NF4Weight:
    """A valid double-quantized NF4Weight with random codes, scales of about 0.02."""
    out_dim, in_dim = shape
    nblocks = out_dim * in_dim // blocksize
    k1, k2 = jax.random.split(key)
    packed = jax.random.bits(k1, (*lead, out_dim, in_dim // 2), jnp.uint8)
    absmax = jax.random.randint(k2, (*lead, out_dim, in_dim // blocksize), 100, 156).astype(jnp.uint8)
    nested = jnp.full((*lead, math.ceil(nblocks / NESTED_BLOCKSIZE)), 0.01, jnp.float32)
    offset = jnp.full(lead, 0.04, jnp.float32)
    return NF4Weight(packed, absmax, nested, offset, shape=shape, blocksize=blocksize, dtype="bfloat16")


def random_params(cfg: ModelConfig, key: jax.Array, *, quantized: bool = True, dtype: Any = jnp.bfloat16) -> Params:
    """Backbone params of `cfg` with random values (layout of decoder.py)."""
    params: Params = {}
    specs = [(path, shape, linear, ()) for path, _, shape, linear in global_specs(cfg)]
    if not cfg.tie_word_embeddings:
        specs.append((("lm_head", "w"), (cfg.vocab_size, cfg.embed_dim), False, ()))
    specs += [(("layers", *path), shape, linear, (cfg.num_layers,)) for path, _, shape, linear in layer_specs(cfg)]
    keys = jax.random.split(key, len(specs))

    for k, (path, shape, linear, lead) in zip(keys, specs):
        full = (*lead, *shape)
        if linear and quantized:
            value: Any = jax.jit(random_nf4, static_argnums=(1, 2))(k, lead, shape)
        elif path[-1] == "scale":
            value = jnp.ones(full, dtype)
        elif path[-1] in ("bias", "b"):
            value = jnp.zeros(full, dtype)
        else:
            value = jax.jit(lambda k, s=full: (jax.random.normal(k, s, jnp.float32) * 0.02).astype(dtype))(k)
        set_path(params, path, value)
    return params
