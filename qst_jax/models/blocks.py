"""One decoder block per family, for the backbone and the side network alike.

A block is a pure function `block(p, x, cfg, ctx, kv=None) -> (x, kv)` over
one layer's params (`kv`: that layer's KV cache when decoding). Its linears are `{"w": Weight, "b"?: Array}` where `Weight` is a dense
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
from qst_jax.models.layers import KVCache, Params, activation, attention, norm
from qst_jax.quant.matmul import linear


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockContext:
    """What every layer of one forward pass shares.

    Attributes:
      mask: boolean `[B, 1, T, S]` attention mask.
      rope: (cos, sin) `[B, T, head_dim]` or None (OPT).
      cache_index: where this pass's T tokens go in the KV caches (decoding).
      attention_impl: `jax.nn.dot_product_attention` implementation.
    """

    mask: jax.Array
    rope: tuple[jax.Array, jax.Array] | None
    cache_index: jax.Array | None = None
    attention_impl: str | None = dataclasses.field(default=None, metadata={"static": True})


def _mlp_llama(p: Params, x: jax.Array, cfg: ModelConfig) -> jax.Array:
    gate = activation(cfg.activation, linear(x, p["gate"]["w"], p["gate"].get("b")))
    up = linear(x, p["up"]["w"], p["up"].get("b"))
    return linear(gate * up, p["down"]["w"], p["down"].get("b"))


def _mlp_opt(p: Params, x: jax.Array, cfg: ModelConfig) -> jax.Array:
    hidden = activation(cfg.activation, linear(x, p["fc1"]["w"], p["fc1"].get("b")))
    return linear(hidden, p["fc2"]["w"], p["fc2"].get("b"))


def _attend(p: Params, x: jax.Array, cfg: ModelConfig, ctx: BlockContext, kv: KVCache | None, rope: bool):
    return attention(
        p["attn"], x, cfg, ctx.mask, ctx.rope if rope else None, ctx.attention_impl, kv, ctx.cache_index
    )


def llama_block(
    p: Params, x: jax.Array, cfg: ModelConfig, ctx: BlockContext, kv: KVCache | None = None
) -> tuple[jax.Array, KVCache | None]:
    """Pre-norm residual block: RMSNorm, RoPE GQA attention, SwiGLU MLP."""
    attn, kv = _attend(p, norm(p["attn_norm"], x, cfg.norm_eps), cfg, ctx, kv, rope=True)
    h = x + attn
    return h + _mlp_llama(p["mlp"], norm(p["mlp_norm"], h, cfg.norm_eps), cfg), kv


def opt_block(
    p: Params, x: jax.Array, cfg: ModelConfig, ctx: BlockContext, kv: KVCache | None = None
) -> tuple[jax.Array, KVCache | None]:
    """OPT block: LayerNorm before (pre-LN) or after (post-LN) each residual."""
    if cfg.do_layer_norm_before:
        attn, kv = _attend(p, norm(p["attn_norm"], x, cfg.norm_eps), cfg, ctx, kv, rope=False)
        h = x + attn
        return h + _mlp_opt(p["mlp"], norm(p["mlp_norm"], h, cfg.norm_eps), cfg), kv
    attn, kv = _attend(p, x, cfg, ctx, kv, rope=False)
    h = norm(p["attn_norm"], x + attn, cfg.norm_eps)
    return norm(p["mlp_norm"], h + _mlp_opt(p["mlp"], h, cfg), cfg.norm_eps), kv


Block = Callable[..., tuple[jax.Array, KVCache | None]]


BLOCKS: dict[str, Block] = {
    "llama": llama_block,
    "opt": opt_block,
}


def block_fn(cfg: ModelConfig) -> Block:
    return BLOCKS[cfg.family]
