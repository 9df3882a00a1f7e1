"""The QST forward pass: backbone layer i, then side layer i, in one `lax.scan` step.

    o, caches = qst_pass(side_params, backbone_params, cfg, side, ids, mask)

The backbone runs under `stop_gradient` and its params are never
differentiated, so the backward pass keeps only what the side network needs:
each layer's hidden state h_i (for a trainable downsampler) and the side
activations.

`joint_pass` is the scan; it runs any number of side-network *groups* over
one backbone pass. A group is anything with the `SideGroup` protocol's three
methods: `init` (s_0 and the per-layer inputs the scan hands it), `step`
(one side layer) and `finish` (o from the last side state). `OneSide`, here,
is QST's own group; `side_groups.py` holds the groups of many side networks
(K members stacked, or a member per row).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import jax
import jax.numpy as jnp

from qst_jax.methods.downsamplers import make_downsampler
from qst_jax.methods.side_config import SideConfig, side_model_config
from qst_jax.methods.side_params import PER_LAYER, cast_params
from qst_jax.models import loops
from qst_jax.models.blocks import BlockContext, block_fn
from qst_jax.models.config import ModelConfig
from qst_jax.models.decoder import embed, final_norm, make_context
from qst_jax.models.layers import Params, norm, positions_from_mask
from qst_jax.quant.matmul import linear


@dataclasses.dataclass(frozen=True)
class SideRun:
    """What every side network of one pass shares: the tokens' masks and positions, and the runtime options.

    Attributes:
      backbone: the backbone's ModelConfig.
      key_mask: `[B, S]` real key slots (S = T, or the cache length).
      positions: `[B, T]` the pass's token positions.
      cache_index: the pass's first cache slot (scalar or `[B]`), or None.
      dtype, attention_impl, remat, hidden_store: as `QSTModel`.
    """

    backbone: ModelConfig
    key_mask: jax.Array
    positions: jax.Array
    cache_index: jax.Array | None
    dtype: Any
    attention_impl: str | None
    remat: bool
    hidden_store: str
    _layers: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def layer(self, side: SideConfig) -> SideLayer:
        """The side layer of `side`'s shape in this pass; built (mask, RoPE) on the first call, before the scan."""
        if side not in self._layers:
            cfg = side_model_config(self.backbone, side)
            ctx = make_context(cfg, self.key_mask, self.positions, self.dtype, self.attention_impl, self.cache_index)
            self._layers[side] = SideLayer(side, cfg, ctx, self.dtype, self.remat, self.hidden_store)
        return self._layers[side]


@dataclasses.dataclass(frozen=True)
class SideLayer:
    """Side layer i: s_i = f_i((1 - b_i) * D_i(h_i) + b_i * s_{i-1}), b_i = sigmoid(z_i); and the output mix.

    With `remat`, the gate mix and the block f_i are recomputed in the
    backward pass, so what layer i keeps for it is its side-width inputs
    (D_i(h_i), s_{i-1}). The downsampler D_i stays outside that boundary: it
    keeps what `make_downsampler`'s store says (h_i in bf16 or fp8 for a
    trainable one, nothing for pooling), never a second copy of h_i.

    Attributes:
      side: the side network's config; cfg: its blocks' ModelConfig (width d/r).
      ctx: the side blocks' mask, RoPE and cache slot.
    """

    side: SideConfig
    cfg: ModelConfig
    ctx: BlockContext
    dtype: Any
    remat: bool
    hidden_store: str

    def down(self, p: Params, h: jax.Array) -> jax.Array:
        """D_i(h_i): `[B, T, d]` to `[B, T, d/r]`, its params cast to the compute dtype."""
        return make_downsampler(self.side, self.cfg.hidden_size, self.hidden_store)(cast_params(p, self.dtype), h)

    def __call__(self, layer: Params, down: Params, gate: jax.Array, h: jax.Array, s: jax.Array,
                 kv: Params | None, ctx: BlockContext | None = None) -> tuple[jax.Array, Params | None]:
        """(s_i, kv) from layer i's params, the backbone state h_i and s_{i-1}."""
        ctx = self.ctx if ctx is None else ctx
        block = block_fn(self.cfg)

        def mixed_block(layer: Params, gate: jax.Array, x: jax.Array, s: jax.Array, kv: Params | None):
            b = jax.nn.sigmoid(gate.astype(jnp.float32)).astype(self.dtype)
            return block(cast_params(layer, self.dtype), (1 - b) * x + b * s, self.cfg, ctx, kv)

        if self.remat:
            mixed_block = jax.checkpoint(mixed_block)
        return mixed_block(layer, gate, self.down(down, h), s, kv)

    def mix(self, base: jax.Array, params: Params, s_last: jax.Array) -> jax.Array:
        """o from the backbone's final state `base` `[B, T, d]` and the last side state.

        "residual": o = base + Up(Norm_side(s_L)); "gated": o = a * base +
        (1 - a) * Up(Norm_side(s_L)), a = sigmoid(z_out).
        """
        once = cast_params({k: params[k] for k in ("norm", "up")}, self.dtype)
        side_out = linear(norm(once["norm"], s_last, self.cfg.norm_eps), once["up"]["w"], once["up"]["b"])
        if self.side.output_mix == "residual":
            return base + side_out
        a = jax.nn.sigmoid(params["out_gate"].astype(jnp.float32)).astype(self.dtype)
        return a * base + (1 - a) * side_out


class SideGroup(Protocol):
    """Side networks that run together over one backbone pass (one shape; `side` is that shape).

    `joint_pass` calls `init` once before its scan, `step` once per layer
    inside it (h_i as the group's `side.input_norm` reads it), `finish`
    after it. `xs` is whatever `init` returned for the scan to slice by layer.
    """

    side: SideConfig

    def init(self, h0: jax.Array, run: SideRun) -> tuple[jax.Array, Any]:
        """(s_0, the per-layer inputs, leaves `[L, ...]`)."""

    def step(self, xs: Any, h: jax.Array, s: jax.Array, kv: Params | None,
             run: SideRun) -> tuple[jax.Array, Params | None]:
        """(s_i, the side KV cache of layer i) from layer i's slice of `xs`."""

    def finish(self, base: jax.Array, s_last: jax.Array, run: SideRun) -> jax.Array:
        """o from the backbone's final state `[B, T, d]` and the last side state."""


@dataclasses.dataclass(frozen=True)
class OneSide:
    """One side network: QST's own group. `params` as `side_params.py` lays them out."""

    side: SideConfig
    params: Params

    def init(self, h0: jax.Array, run: SideRun) -> tuple[jax.Array, Any]:
        first_down = jax.tree.map(lambda x: x[0], self.params["down"])
        return run.layer(self.side).down(first_down, h0), tuple(self.params[k] for k in PER_LAYER)

    def step(self, xs: Any, h: jax.Array, s: jax.Array, kv: Params | None,
             run: SideRun) -> tuple[jax.Array, Params | None]:
        down, gate, layer = xs
        return run.layer(self.side)(layer, down, gate, h, s, kv)

    def finish(self, base: jax.Array, s_last: jax.Array, run: SideRun) -> jax.Array:
        return run.layer(self.side).mix(base, self.params, s_last)


def qst_pass(
    side_params: Params,
    backbone_params: Params,
    backbone_cfg: ModelConfig,
    side: SideConfig,
    input_ids: jax.Array,
    token_mask: jax.Array,
    *,
    caches: Params | None = None,
    **options: Any,
) -> tuple[jax.Array, Params | None]:
    """One joint pass of the backbone and one side network over `input_ids` `[B, T]`.

    `joint_pass` with one `OneSide` group; `options` are its keyword arguments.

    Args:
      caches: `{"backbone": kv, "side": kv}` stacked KV caches (decoding).

    Returns:
      (o `[B, T, d]`: the final state the frozen LM head or the score head
      reads, updated caches or None).
    """
    group_caches = None if caches is None else {"backbone": caches["backbone"], "side": (caches["side"],)}
    _, (o,), new = joint_pass(backbone_params, backbone_cfg, (OneSide(side, side_params),), input_ids, token_mask,
                              caches=group_caches, **options)
    return o, None if new is None else {"backbone": new["backbone"], "side": new["side"][0]}


def joint_pass(
    backbone_params: Params,
    backbone_cfg: ModelConfig,
    groups: tuple[SideGroup, ...],
    input_ids: jax.Array,
    token_mask: jax.Array,
    *,
    positions: jax.Array | None = None,
    key_mask: jax.Array | None = None,
    caches: Params | None = None,
    cache_index: jax.Array | None = None,
    dtype: Any = jnp.bfloat16,
    attention_impl: str | None = None,
    remat_side: bool = True,
    hidden_store: str = "auto",
) -> tuple[jax.Array, list[jax.Array], Params | None]:
    """One backbone pass feeding every group: backbone layer i runs once, then each group's side layer i.

    Args:
      groups: `SideGroup`s (`OneSide`, `side_groups.StackedSides`, `side_groups.RowSides`).
      token_mask: `[B, T]` which of this pass's tokens are real.
      positions: `[B, T]` their positions (default: from `token_mask`).
      key_mask: `[B, S]` real key slots (S = T, or the cache length;
        default `token_mask`).
      caches: `{"backbone": kv, "side": (kv per group,)}` stacked KV caches,
        written at `cache_index`.
      hidden_store: how the backward pass keeps each h_i (`make_downsampler`).

    Returns:
      (Norm(h_L) `[B, T, d]`: the frozen backbone's own final state, each
      group's output o (its `finish`), updated caches or None).
    """
    positions = positions_from_mask(token_mask) if positions is None else positions
    key_mask = token_mask if key_mask is None else key_mask
    run = SideRun(backbone_cfg, key_mask, positions, cache_index, dtype, attention_impl, remat_side, hidden_store)
    bp = jax.lax.stop_gradient(backbone_params)
    norms_after = reader_norms(bp, backbone_cfg) if any(g.side.input_norm == "backbone" for g in groups) else None
    backbone_ctx = make_context(backbone_cfg, key_mask, positions, dtype, attention_impl, cache_index)
    backbone_block = block_fn(backbone_cfg)

    def reads(h: jax.Array, normed: jax.Array) -> list[jax.Array]:
        """h_i as each group reads it: raw, or through the backbone's next norm."""
        return [normed if g.side.input_norm == "backbone" else h for g in groups]

    h0 = jax.lax.stop_gradient(embed(bp, backbone_cfg, input_ids, positions, token_mask, dtype))
    h0_normed = h0 if norms_after is None else norm(norms_after[0], h0, backbone_cfg.norm_eps)
    s0s, side_xs = zip(*(g.init(h, run) for g, h in zip(groups, reads(h0, h0_normed)))) if groups else ((), ())

    def body(carry: tuple[jax.Array, tuple[jax.Array, ...]], layer: Params, xs: tuple[Any, ...]):
        h, states = carry
        next_norm, kv, group_xs, group_kvs = xs
        h, kv = backbone_block(layer, h, backbone_cfg, backbone_ctx, kv)
        h = jax.lax.stop_gradient(h)
        normed = h if next_norm is None else norm(next_norm, h, backbone_cfg.norm_eps)
        stepped = [g.step(x, h_read, s, g_kv, run)
                   for g, x, h_read, s, g_kv in zip(groups, group_xs, reads(h, normed), states, group_kvs)]
        return (h, tuple(s for s, _ in stepped)), (kv, tuple(g_kv for _, g_kv in stepped))

    backbone_kv = None if caches is None else caches["backbone"]
    group_kvs = (None,) * len(groups) if caches is None else tuple(caches["side"])
    xs = (None if norms_after is None else norms_after[1], backbone_kv, tuple(side_xs), group_kvs)
    (h_last, s_lasts), (backbone_kv, group_kvs) = loops.scan_over_layers(body, (h0, tuple(s0s)), bp["layers"], xs)
    base = final_norm(bp, backbone_cfg, h_last)
    outs = [g.finish(base, s_last, run) for g, s_last in zip(groups, s_lasts)]
    return base, outs, None if caches is None else {"backbone": backbone_kv, "side": group_kvs}


def reader_norms(bp: Params, cfg: ModelConfig) -> tuple[Params, Params] | None:
    """The norms the backbone applies to h_0 and to each layer's output (what `input_norm="backbone"` reads).

    Returns (layer 0's input norm, the stacked norms `[L, d]` read after
    layer i: layer i+1's input norm, the final norm after the last), or None
    when the family's blocks are post-norm (their states are normed already).
    """
    if cfg.family == "opt" and not cfg.do_layer_norm_before:
        return None
    attn_norms = bp["layers"]["attn_norm"]
    first = jax.tree.map(lambda a: a[0], attn_norms)
    after = jax.tree.map(lambda a, f: jnp.concatenate([a[1:], f[None].astype(a.dtype)]), attn_norms,
                         bp["final_norm"])
    return first, after
