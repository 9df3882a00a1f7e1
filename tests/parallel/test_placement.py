"""Loading onto a mesh streams layers to their shards: the host never stacks the model."""

from __future__ import annotations

import json
import tracemalloc

import jax
import numpy as np
from safetensors.numpy import save_file

from qst_jax.models import load_backbone
from qst_jax.parallel import ShardedPlacement, make_mesh

LAYERS, EMBED, MLP, VOCAB = 48, 128, 512, 256


def _write_llama(directory) -> None:
    """A random 48-layer LLaMA in float16 safetensors (a deep, narrow model)."""
    rng = np.random.default_rng(0)

    def w(*shape):
        return (rng.standard_normal(shape) * 0.05).astype(np.float16)

    tensors = {"model.embed_tokens.weight": w(VOCAB, EMBED), "model.norm.weight": np.ones(EMBED, np.float16),
               "lm_head.weight": w(VOCAB, EMBED)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for name in ("q", "k", "v", "o"):
            tensors[f"{p}self_attn.{name}_proj.weight"] = w(EMBED, EMBED)
        tensors[f"{p}mlp.gate_proj.weight"] = w(MLP, EMBED)
        tensors[f"{p}mlp.up_proj.weight"] = w(MLP, EMBED)
        tensors[f"{p}mlp.down_proj.weight"] = w(EMBED, MLP)
        tensors[f"{p}input_layernorm.weight"] = np.ones(EMBED, np.float16)
        tensors[f"{p}post_attention_layernorm.weight"] = np.ones(EMBED, np.float16)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": EMBED,
              "intermediate_size": MLP, "num_hidden_layers": LAYERS, "num_attention_heads": 4,
              "num_key_value_heads": 4, "vocab_size": VOCAB, "max_position_embeddings": 128,
              "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
              "torch_dtype": "float16"}
    (directory / "config.json").write_text(json.dumps(config))


def _peak_host_bytes(fn):
    tracemalloc.start()
    try:
        result = fn()
        jax.block_until_ready(jax.tree_util.tree_leaves(result.params))
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_sharded_load_never_stacks_the_model_on_the_host(tmp_path):
    _write_llama(tmp_path)
    host, host_peak = _peak_host_bytes(lambda: load_backbone(tmp_path))
    mesh = make_mesh()
    load_backbone(tmp_path, placement=ShardedPlacement(mesh))  # compiles the writers: tracing allocates, but holds no weights
    sharded, sharded_peak = _peak_host_bytes(lambda: load_backbone(tmp_path, placement=ShardedPlacement(mesh)))
    stacked_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(host.params["layers"]))
    assert host_peak > stacked_bytes  # the measure sees the host-stacked path hold every layer
    assert sharded_peak < 0.25 * stacked_bytes, (sharded_peak, stacked_bytes)  # ~one layer in flight
    for a, b in zip(jax.tree_util.tree_leaves(host.params), jax.tree_util.tree_leaves(sharded.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ids = np.arange(16).reshape(2, 8)
    np.testing.assert_array_equal(np.asarray(host.logits(ids)), np.asarray(sharded.logits(ids)))
