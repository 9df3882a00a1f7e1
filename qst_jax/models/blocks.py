"""One decoder block per family, for the backbone and the side network alike.

A block is a pure function `block(p, x, cfg, ctx) -> x` over one layer's
params. Its linears are `{"w": Weight, "b"?: Array}` where `Weight` is a dense
array (side network, bf16) or an NF4Weight (frozen backbone): the matmul entry
point dispatches, so there is exactly one attention and one MLP per family.

Param layout of one layer:
  llama: attn_norm{scale}, attn{q,k,v,o}, mlp_norm{scale}, mlp{gate,up,down}
  opt:   attn_norm{scale,bias}, attn{q,k,v,o}, mlp_norm{scale,bias}, mlp{fc1,fc2}
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax

from qst_jax.models.config import ModelConfig
from qst_jax.models.layers import Params, activation, attention, norm
from qst_jax.quant.matmul import linear


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockContext:
    """What every layer of one forward pass shares.

    Attributes:
      mask: boolean `[B, 1, T, S]` attention mask.
      rope: (cos, sin) `[B, T, head_dim]` or None (OPT).
      attention_impl: `jax.nn.dot_product_attention` implementation.
    """

    mask: jax.Array
    rope: tuple[jax.Array, jax.Array] | None
    attention_impl: str | None = dataclasses.field(default=None, metadata={"static": True})


def _mlp_llama(p: Params, x: jax.Array, cfg: ModelConfig) -> jax.Array:
    gate = activation(cfg.activation, linear(x, p["gate"]["w"], p["gate"].get("b")))
    up = linear(x, p["up"]["w"], p["up"].get("b"))
    return linear(gate * up, p["down"]["w"], p["down"].get("b"))


def _mlp_opt(p: Params, x: jax.Array, cfg: ModelConfig) -> jax.Array:
    hidden = activation(cfg.activation, linear(x, p["fc1"]["w"], p["fc1"].get("b")))
    return linear(hidden, p["fc2"]["w"], p["fc2"].get("b"))


def llama_block(p: Params, x: jax.Array, cfg: ModelConfig, ctx: BlockContext) -> jax.Array:
    """Pre-norm residual block: RMSNorm, RoPE GQA attention, SwiGLU MLP."""
    h = x + attention(p["attn"], norm(p["attn_norm"], x, cfg.norm_eps), cfg, ctx.mask, ctx.rope, ctx.attention_impl)
    return h + _mlp_llama(p["mlp"], norm(p["mlp_norm"], h, cfg.norm_eps), cfg)


def opt_block(p: Params, x: jax.Array, cfg: ModelConfig, ctx: BlockContext) -> jax.Array:
    """OPT block: LayerNorm before (pre-LN) or after (post-LN) each residual."""
    if cfg.do_layer_norm_before:
        h = x + attention(p["attn"], norm(p["attn_norm"], x, cfg.norm_eps), cfg, ctx.mask, None, ctx.attention_impl)
        return h + _mlp_opt(p["mlp"], norm(p["mlp_norm"], h, cfg.norm_eps), cfg)
    h = norm(p["attn_norm"], x + attention(p["attn"], x, cfg, ctx.mask, None, ctx.attention_impl), cfg.norm_eps)
    return norm(p["mlp_norm"], h + _mlp_opt(p["mlp"], h, cfg), cfg.norm_eps)


BLOCKS: dict[str, Callable[[Params, jax.Array, ModelConfig, BlockContext], jax.Array]] = {
    "llama": llama_block,
    "opt": opt_block,
}


def block_fn(cfg: ModelConfig) -> Callable[[Params, jax.Array, ModelConfig, BlockContext], jax.Array]:
    return BLOCKS[cfg.family]
