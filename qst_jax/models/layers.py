"""Building blocks shared by every decoder: norms, RoPE, masks, attention.

Shapes: B batch, T query length, S key length, N query heads, K KV heads,
H head_dim, D model width. Activations are in the compute dtype; norms and
softmax accumulate in float32.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qst_jax.errors import InputError
from qst_jax.models.config import ModelConfig
from qst_jax.quant.matmul import linear
from qst_jax.models import loops
from qst_jax.platform import target_platform

Params = dict[str, Any]


def norm(p: Params, x: jax.Array, eps: float) -> jax.Array:
    """RMSNorm (`p` has only `scale`) or LayerNorm (`scale` and `bias`).

    RMSNorm follows HF LLaMA exactly: normalise in float32, cast back to the
    input dtype, then multiply by the scale.
    """
    x32 = x.astype(jnp.float32)
    if "bias" not in p:
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
        return p["scale"].astype(x.dtype) * y.astype(x.dtype)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    return (y * p["scale"].astype(jnp.float32) + p["bias"].astype(jnp.float32)).astype(x.dtype)


def activation(name: str, x: jax.Array) -> jax.Array:
    if name == "silu":
        return jax.nn.silu(x)
    if name == "relu":
        return jax.nn.relu(x)
    if name in ("gelu", "gelu_pytorch_tanh", "gelu_new"):
        return jax.nn.gelu(x, approximate=name != "gelu")
    raise InputError(f"unsupported activation {name!r}")


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """HF-style positions: 0 at each row's first real token, counting real tokens.

    Left padding therefore does not shift a sequence's positions. Padded slots
    get position 0 (before the first token) or the last position (after it).
    """
    mask = attention_mask.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)


def attention_mask_4d(
    attention_mask: jax.Array, *, sliding_window: int | None = None, q_positions: jax.Array | None = None
) -> jax.Array:
    """Boolean `[B, 1, T, S]`: key s visible from query t (causal, not padding).

    Args:
      attention_mask: `[B, S]` with 1 for real tokens.
      sliding_window: Mistral's window; keys further back are hidden.
      q_positions: `[T]` (or `[B, T]`, one row each) absolute slot index of
        each query among the S keys (default: `arange(S)`, T = S).
    """
    s = attention_mask.shape[-1]
    if q_positions is None:
        q_positions = jnp.arange(s)
    k_positions = jnp.arange(s)
    visible = k_positions <= q_positions[..., None]  # [T, S], or [B, T, S] with a slot index per row
    if sliding_window is not None:
        visible &= k_positions > q_positions[..., None] - sliding_window
    visible = visible[None, None] if visible.ndim == 2 else visible[:, None]
    return visible & attention_mask.astype(bool)[:, None, None, :]


def _llama3_inv_freq(inv_freq: np.ndarray, rope: dict[str, Any], max_pos: int) -> np.ndarray:
    factor = rope["factor"]
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_len = rope.get("original_max_position_embeddings", max_pos)
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(cfg: ModelConfig, positions: jax.Array, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """cos and sin `[B, T, H]` for HF's rotate-half RoPE at `positions` `[B, T]`.

    Frequencies are computed in float32 as HF does; "dynamic" NTK scaling
    switches on when the largest position exceeds the original context.
    """
    dim = cfg.head_dim
    rope = cfg.rope
    rope_type = rope.get("rope_type", "default")
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (1.0 / (np.float32(cfg.rope_theta) ** exponents)).astype(np.float32)
    if rope_type == "linear":
        inv_freq = (inv_freq / np.float32(rope["factor"])).astype(np.float32)
    elif rope_type == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, rope, cfg.max_position_embeddings)
    inv = jnp.asarray(inv_freq)
    if rope_type == "dynamic":
        factor = rope["factor"]
        original = rope.get("original_max_position_embeddings", cfg.max_position_embeddings)
        seq_len = (jnp.max(positions) + 1).astype(jnp.float32)
        base = cfg.rope_theta * ((factor * seq_len / original) - (factor - 1)) ** (dim / (dim - 2))
        dynamic = 1.0 / (base ** jnp.asarray(exponents))
        inv = jnp.where(seq_len > original, dynamic, inv).astype(jnp.float32)
    freqs = positions.astype(jnp.float32)[..., None] * inv
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE on `x` `[B, T, heads, H]` with cos/sin `[B, T, H]`."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


KVCache = dict[str, jax.Array]
"""One layer's cache: `{"k", "v"}` `[B, S_max, kv_heads, head_dim]`."""


def write_cache(cache: jax.Array, new: jax.Array, index: jax.Array) -> jax.Array:
    """`cache` `[B, S, ...]` with `new` `[B, T, ...]` written at slot `index` (scalar), or row b's at `index[b]`."""
    new = new.astype(cache.dtype)
    zeros = (0,) * (cache.ndim - 2)
    if jnp.ndim(index) == 0:
        return jax.lax.dynamic_update_slice(cache, new, (0, index, *zeros))
    return jax.vmap(lambda c, x, i: jax.lax.dynamic_update_slice(c, x, (i, *zeros)))(cache, new, index)


def attention(
    p: Params,
    x: jax.Array,
    cfg: ModelConfig,
    mask: jax.Array,
    rope: tuple[jax.Array, jax.Array] | None,
    implementation: str | None = None,
    kv: KVCache | None = None,
    cache_index: jax.Array | None = None,
) -> tuple[jax.Array, KVCache | None]:
    """Multi-head (grouped-query) self-attention over `x` `[B, T, D]`.

    Args:
      p: `{"q","k","v","o"}`, each `{"w": [out, in] dense or NF4, "b"?}`.
      mask: boolean `[B, 1, T, S]` from `attention_mask_4d` (S = T without a
        cache, S = S_max with one).
      rope: (cos, sin) from `rope_cos_sin`, or None (OPT).
      implementation: `jax.nn.dot_product_attention`'s (None, "xla", "cudnn").
      kv: this layer's cache; the new keys and values are written at
        `cache_index` (a scalar, or `[B]`: each row's own slot) and attention
        runs over the whole cache.

    Returns:
      (`[B, T, D]`, the updated cache or None).
    """
    b, t, _ = x.shape
    n, k, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q = linear(x, p["q"]["w"], p["q"].get("b")).reshape(b, t, n, h)
    key = linear(x, p["k"]["w"], p["k"].get("b")).reshape(b, t, k, h)
    value = linear(x, p["v"]["w"], p["v"].get("b")).reshape(b, t, k, h)
    if rope is not None:
        q, key = apply_rope(q, *rope), apply_rope(key, *rope)
    if kv is not None:
        key, value = write_cache(kv["k"], key, cache_index), write_cache(kv["v"], value, cache_index)
        kv = {"k": key, "v": value}
    out = chunked_attention(q, key, value, mask, h**-0.5, implementation)
    return linear(out.reshape(b, t, n * h), p["o"]["w"], p["o"].get("b")), kv


SCORE_BLOCK = 1 << 24
"""Most elements of one `[B, N, T_chunk, S]` block of attention scores (64 MiB in float32)."""


def query_chunk(batch: int, heads: int, queries: int, keys: int) -> int:
    """Queries per block so that one block of scores holds at most `SCORE_BLOCK` elements.

    Halves T while it is even and above 16; T itself when the whole score
    tensor fits (every short or cached pass).
    """
    chunk = queries
    while batch * heads * chunk * keys > SCORE_BLOCK and chunk % 2 == 0 and chunk > 16:
        chunk //= 2
    return chunk


def single_query_attention(q: jax.Array, key: jax.Array, value: jax.Array, mask: jax.Array,
                           scale: float) -> jax.Array:
    """One query per row (a decode step) as two einsums, float32 scores and softmax.

    What `jax.nn.dot_product_attention`'s XLA path computes; on a GPU the
    decode step uses this form because XLA refuses that call with one query
    in float16 on a T4 ("Unsupported dot precision algorithm").

    Args:
      q: `[B, 1, N, H]`; key, value: `[B, S, K, H]` (N = K * groups); mask: boolean `[B, 1, 1, S]`.
    """
    b, t, n, h = q.shape
    groups = n // key.shape[2]
    qg = q.reshape(b, t, key.shape[2], groups, h)
    scores = jnp.einsum("btkgh,bskh->bkgts", qg, key, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(value.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, value, preferred_element_type=jnp.float32)
    return out.reshape(b, t, n, h).astype(q.dtype)


def chunked_attention(q: jax.Array, key: jax.Array, value: jax.Array, mask: jax.Array, scale: float,
                      implementation: str | None) -> jax.Array:
    """`jax.nn.dot_product_attention` over blocks of queries, one block at a time.

    Each query's softmax reads only its own row of scores, so a block gives
    exactly the rows the whole would, while the float32 scores, their bf16
    copy and the broadcast mask exist for one block of queries at a time
    (`query_chunk` picks the block). cuDNN's fused attention
    never materialises the scores, so it runs whole.

    Args:
      q: `[B, T, N, H]`; key, value: `[B, S, K, H]`; mask: boolean `[B, 1, T, S]`.

    Returns:
      `[B, T, N, H]`.
    """
    b, t, n, h = q.shape
    if t == 1 and implementation is None and target_platform() == "gpu":
        return single_query_attention(q, key, value, mask, scale)
    chunk = query_chunk(b, n, t, key.shape[1])
    if chunk == t or implementation == "cudnn":
        return jax.nn.dot_product_attention(q, key, value, mask=mask, scale=scale, implementation=implementation)
    blocks = t // chunk
    q_blocks = jnp.moveaxis(q.reshape(b, blocks, chunk, n, h), 1, 0)
    m_blocks = jnp.moveaxis(mask.reshape(*mask.shape[:2], blocks, chunk, mask.shape[-1]), 2, 0)
    out = loops.map(lambda qm: jax.nn.dot_product_attention(qm[0], key, value, mask=qm[1], scale=scale,
                                                              implementation=implementation), (q_blocks, m_blocks))
    return jnp.moveaxis(out, 0, 1).reshape(b, t, n, h)
