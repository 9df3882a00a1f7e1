"""The param schema of a decoder: each tensor's path in the params pytree, its HF name and its shape.

The loaders read checkpoints by it, the random backbones and the side
network's blocks are built by it; nothing here reads a file.
"""

from __future__ import annotations

from qst_jax.models.config import ModelConfig

# (param path, HF name suffix, shape function, is a quantizable linear weight)
Spec = tuple[tuple[str, ...], str, tuple[int, ...], bool]


def _linear(path: tuple[str, ...], hf: str, out_dim: int, in_dim: int, bias: bool) -> list[Spec]:
    specs: list[Spec] = [((*path, "w"), f"{hf}.weight", (out_dim, in_dim), True)]
    if bias:
        specs.append(((*path, "b"), f"{hf}.bias", (out_dim,), False))
    return specs


def layer_specs(cfg: ModelConfig) -> list[Spec]:
    """HF names and shapes of one decoder layer's tensors."""
    d, n, k, h, i = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    if cfg.family == "llama":
        specs = [(("attn_norm", "scale"), "input_layernorm.weight", (d,), False)]
        specs += _linear(("attn", "q"), "self_attn.q_proj", n * h, d, cfg.qkv_bias)
        specs += _linear(("attn", "k"), "self_attn.k_proj", k * h, d, cfg.qkv_bias)
        specs += _linear(("attn", "v"), "self_attn.v_proj", k * h, d, cfg.qkv_bias)
        specs += _linear(("attn", "o"), "self_attn.o_proj", d, n * h, cfg.o_bias)
        specs += [(("mlp_norm", "scale"), "post_attention_layernorm.weight", (d,), False)]
        specs += _linear(("mlp", "gate"), "mlp.gate_proj", i, d, cfg.mlp_bias)
        specs += _linear(("mlp", "up"), "mlp.up_proj", i, d, cfg.mlp_bias)
        specs += _linear(("mlp", "down"), "mlp.down_proj", d, i, cfg.mlp_bias)
        return specs
    specs = [
        (("attn_norm", "scale"), "self_attn_layer_norm.weight", (d,), False),
        (("attn_norm", "bias"), "self_attn_layer_norm.bias", (d,), False),
    ]
    specs += _linear(("attn", "q"), "self_attn.q_proj", d, d, cfg.qkv_bias)
    specs += _linear(("attn", "k"), "self_attn.k_proj", d, d, cfg.qkv_bias)
    specs += _linear(("attn", "v"), "self_attn.v_proj", d, d, cfg.qkv_bias)
    specs += _linear(("attn", "o"), "self_attn.out_proj", d, d, cfg.o_bias)
    specs += [
        (("mlp_norm", "scale"), "final_layer_norm.weight", (d,), False),
        (("mlp_norm", "bias"), "final_layer_norm.bias", (d,), False),
    ]
    specs += _linear(("mlp", "fc1"), "fc1", i, d, cfg.mlp_bias)
    specs += _linear(("mlp", "fc2"), "fc2", d, i, cfg.mlp_bias)
    return specs


def global_specs(cfg: ModelConfig) -> list[Spec]:
    """HF names (without the model prefix) and shapes of the non-layer tensors."""
    d, e, v = cfg.hidden_size, cfg.embed_dim, cfg.vocab_size
    if cfg.family == "llama":
        specs: list[Spec] = [(("embed",), "embed_tokens.weight", (v, d), False)]
        if cfg.final_norm:
            specs.append((("final_norm", "scale"), "norm.weight", (d,), False))
    else:
        specs = [
            (("embed",), "embed_tokens.weight", (v, e), False),
            (("pos_embed",), "embed_positions.weight", (cfg.max_position_embeddings + 2, d), False),
        ]
        if e != d:
            specs += [
                (("project_in", "w"), "project_in.weight", (d, e), False),
                (("project_out", "w"), "project_out.weight", (e, d), False),
            ]
        if cfg.final_norm:
            specs += [
                (("final_norm", "scale"), "final_layer_norm.weight", (d,), False),
                (("final_norm", "bias"), "final_layer_norm.bias", (d,), False),
            ]
    return specs
