"""The functional decoder: embed, scan the stacked layers, norm, LM head.

Params (a plain pytree of dicts):
  embed:        [vocab, embed_dim]              compute dtype
  pos_embed:    [max_pos + 2, hidden]           OPT only (learned, offset 2)
  project_in:   {w: [hidden, embed_dim]}        OPT when embed_dim != hidden
  layers:       one layer's params (blocks.py), every leaf stacked on a leading
                `layers` axis of size num_layers; linears dense or NF4
  final_norm:   {scale[, bias]}                 when cfg.final_norm
  project_out:  {w: [embed_dim, hidden]}        OPT when embed_dim != hidden
  lm_head:      {w: [vocab, embed_dim]}         absent when embeddings are tied

The layers run under `jax.lax.scan`, so a model compiles one layer and only
one layer's dequantized weights are alive at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from qst_jax.models.blocks import BlockContext, block_fn
from qst_jax.models.config import ModelConfig
from qst_jax.models.layers import Params, attention_mask_4d, norm, positions_from_mask, rope_cos_sin
from qst_jax.quant.matmul import linear, matmul
from qst_jax.models import loops

OPT_POSITION_OFFSET = 2


def make_context(
    cfg: ModelConfig,
    attention_mask: jax.Array,
    positions: jax.Array,
    dtype: Any,
    attention_impl: str | None = None,
    cache_index: jax.Array | None = None,
) -> BlockContext:
    """The mask and RoPE tables every layer of one forward pass shares.

    Args:
      attention_mask: `[B, S]` over every key slot (S = T without a cache,
        S = the cache length when decoding).
      positions: `[B, T]` RoPE positions of this pass's tokens.
      cache_index: slot of this pass's first token in the caches (decoding):
        a scalar, or `[B]`, one per row.
    """
    q_slots = None
    if cache_index is not None:  # a scalar, or `[B]`: each row's own cache slot (continuous batching)
        q_slots = jnp.asarray(cache_index)[..., None] + jnp.arange(positions.shape[-1])
    mask = attention_mask_4d(attention_mask, sliding_window=cfg.sliding_window, q_positions=q_slots)
    rope = rope_cos_sin(cfg, positions, dtype) if cfg.family == "llama" else None
    return BlockContext(mask=mask, rope=rope, cache_index=cache_index, attention_impl=attention_impl)


def embed(
    params: Params, cfg: ModelConfig, input_ids: jax.Array, positions: jax.Array, token_mask: jax.Array, dtype: Any
) -> jax.Array:
    """Token (and, for OPT, learned position) embeddings: h_0 `[B, T, hidden]`.

    OPT's position ids are HF's `cumsum(mask) * mask - 1 + 2`: the real-token
    position plus 2, and 1 for padding.
    """
    h = jnp.take(params["embed"], input_ids, axis=0).astype(dtype)
    if cfg.family == "opt":
        if "project_in" in params:
            h = linear(h, params["project_in"]["w"])
        opt_positions = jnp.where(token_mask.astype(bool), positions + OPT_POSITION_OFFSET, OPT_POSITION_OFFSET - 1)
        h = h + jnp.take(params["pos_embed"], opt_positions, axis=0).astype(dtype)
    return h


def scan_layers(
    layers: Params,
    h: jax.Array,
    cfg: ModelConfig,
    ctx: BlockContext,
    *,
    remat: bool = False,
    caches: Params | None = None,
    collect: Callable[[jax.Array, jax.Array], Any] | None = None,
) -> tuple[jax.Array, Params | None] | tuple[jax.Array, Params | None, Any]:
    """Runs the stacked layers.

    Args:
      remat: recompute each layer in the backward pass (only matters when
        something differentiates through the layers, as QLoRA does).
      caches: stacked KV caches `{"k","v"}` `[L, B, S, K, H]` (decoding).
      collect: `(i, h_i) -> pytree`, called on layer i's output (i from 0, a
        traced int32) inside the scan; what it returns comes back stacked on
        a leading `[L]` axis (per-layer diagnostics without a second loop).

    Returns:
      (h_L, updated caches or None); with `collect`, also its stacked results.
    """
    plain = block_fn(cfg)

    def block(layer, h, cfg, ctx, kv):  # a streamed layer is copied in here, so remat re-streams, never keeps it
        return plain(loops.layer_to_device(layer), h, cfg, ctx, kv)

    if remat:
        block = jax.checkpoint(block, static_argnums=(2,))

    def body(carry: jax.Array, layer: Params, xs: tuple[Params | None, jax.Array]):
        kv, index = xs
        out, kv = block(layer, carry, cfg, ctx, kv)
        return out, (kv, None if collect is None else collect(index, out))

    indices = jnp.arange(jax.tree.leaves(layers)[0].shape[0], dtype=jnp.int32)
    if remat:  # differentiated through (QLoRA): each layer copied in inside its checkpointed block, not carried
        h, (caches, collected) = loops.scan(lambda c, xs: body(c, xs[0], xs[1:]), h, (layers, caches, indices))
    else:  # forward only: a streamed backbone one layer ahead
        h, (caches, collected) = loops.scan_over_layers(body, h, layers, (caches, indices))
    return (h, caches) if collect is None else (h, caches, collected)


def final_norm(params: Params, cfg: ModelConfig, h: jax.Array) -> jax.Array:
    return norm(params["final_norm"], h, cfg.norm_eps) if cfg.final_norm else h


def forward(
    params: Params,
    cfg: ModelConfig,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    *,
    dtype: Any = jnp.bfloat16,
    positions: jax.Array | None = None,
    key_mask: jax.Array | None = None,
    caches: Params | None = None,
    cache_index: jax.Array | None = None,
    attention_impl: str | None = None,
    remat: bool = False,
) -> tuple[jax.Array, Params | None]:
    """The decoder over `input_ids` `[B, T]`: training, evaluation and cached decoding alike.

    Args:
      attention_mask: `[B, T]`, 1 for this pass's real tokens (left or right
        padding); default all ones.
      dtype: compute dtype (weights are cast or dequantized to it).
      positions: `[B, T]` RoPE positions; default from the mask, as HF does
        when generating (left padding does not shift a sequence).
      key_mask: `[B, S]` real key slots; default `attention_mask` (S = T).
        When decoding, S is the cache length.
      caches: stacked KV caches `{"k","v"}` `[L, B, S, K, H]`; this pass's
        keys and values are written at slot `cache_index`.
      remat: recompute layers in the backward pass (see `scan_layers`).

    Returns:
      (final states `[B, T, hidden]` after the final norm, updated caches or None).
    """
    if attention_mask is None:
        attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    if positions is None:
        positions = positions_from_mask(attention_mask)
    if key_mask is None:
        key_mask = attention_mask
    ctx = make_context(cfg, key_mask, positions, dtype, attention_impl, cache_index)
    h0 = embed(params, cfg, input_ids, positions, attention_mask, dtype)
    h_last, caches = scan_layers(params["layers"], h0, cfg, ctx, remat=remat, caches=caches)
    return final_norm(params, cfg, h_last), caches


def init_caches(cfg: ModelConfig, batch: int, length: int, dtype: Any) -> Params:
    """Empty stacked KV caches `{"k","v"}` `[L, B, length, K, H]` for `forward(..., caches=)`."""
    shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def lm_head(params: Params, cfg: ModelConfig, hidden: jax.Array) -> jax.Array:
    """Logits `[..., vocab]` in the compute dtype from final hidden states."""
    if "project_out" in params:
        hidden = linear(hidden, params["project_out"]["w"])
    w = params["lm_head"]["w"] if "lm_head" in params else params["embed"]
    return matmul(hidden, w)


def logits_fn(
    cfg: ModelConfig, *, dtype: Any = jnp.bfloat16, attention_impl: str | None = None
) -> Callable[[Params, jax.Array, jax.Array], jax.Array]:
    """A jittable `(params, input_ids, attention_mask) -> float32 logits`."""

    def fn(params: Params, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        hidden, _ = forward(params, cfg, input_ids, attention_mask, dtype=dtype, attention_impl=attention_impl)
        return lm_head(params, cfg, hidden).astype(jnp.float32)

    return fn
