"""The QST side network: params, downsamplers, and the joint forward pass.

Side params (float32 master copy, cast to the compute dtype inside the step):
  down:     per-layer downsamplers, stacked on a leading `layers` axis
            adapter: {wa [L,k,d], wb [L,d/r,k], norm {scale,bias} [L,d/r]}
            lora:    {wa [L,k,d], wb [L,d/r,k]};  linear: {w [L,d/r,d]}
            maxpool / avgpool: {} (no params, nothing kept for backward)
  gates:    [L, d/r] gate logits z_i
  layers:   the backbone family's block at width d/r, stacked [L, ...]
  norm:     side final norm (the family's kind) [d/r]
  up:       {w [d, d/r], b [d]} (zeros at init with the "residual" mix)
  out_gate: [d] output gate logit z_out ("gated" mix only)
  score:    {w [num_labels, d]} (classification only)

The forward pass runs backbone layer i and side layer i in one `lax.scan`
step. The backbone runs under `stop_gradient` and its params are never
differentiated, so the backward pass keeps only what the side network needs:
each layer's hidden state h_i (for a trainable downsampler) and the side
activations.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from qst_jax.models.blocks import block_fn
from qst_jax.models.config import ModelConfig
from qst_jax.models.decoder import embed, final_norm, make_context
from qst_jax.models.layers import Params, norm, positions_from_mask
from qst_jax.models.loader import layer_specs
from qst_jax.quant.matmul import linear
from qst_jax.methods.downsamplers import make_downsampler
from qst_jax.methods.side_config import SideConfig, side_model_config
from qst_jax.tree import set_path
from qst_jax.models import loops


def _normal(key: jax.Array, shape: tuple[int, ...], std: float | None) -> jax.Array:
    """Normal init of a linear `[..., out, in]`; std None: 1 / sqrt(in) (fan-in)."""
    std = shape[-1] ** -0.5 if std is None else std
    return (jax.random.normal(key, shape, jnp.float32) * std).astype(jnp.float32)


def _stacked_block_params(cfg: ModelConfig, num_layers: int, key: jax.Array, std: float | None) -> Params:
    params: Params = {}
    specs = layer_specs(cfg)
    keys = jax.random.split(key, len(specs))
    for k, (path, _, shape, is_linear) in zip(keys, specs):
        full = (num_layers, *shape)
        if is_linear:
            value = _normal(k, full, std)
        elif path[-1] == "scale":
            value = jnp.ones(full, jnp.float32)
        else:
            value = jnp.zeros(full, jnp.float32)
        set_path(params, path, value)
    return params


def _norm_params(cfg: ModelConfig, width: int, lead: tuple[int, ...] = ()) -> Params:
    p = {"scale": jnp.ones((*lead, width), jnp.float32)}
    if cfg.family == "opt":
        p["bias"] = jnp.zeros((*lead, width), jnp.float32)
    return p


def init_side_params(backbone: ModelConfig, side: SideConfig, key: jax.Array) -> Params:
    """Random side-network params (float32) for `backbone`; see module doc."""
    scfg = side_model_config(backbone, side)
    d, w, k, n = backbone.hidden_size, scfg.hidden_size, side.adapter_rank, backbone.num_layers
    keys = jax.random.split(key, 6)
    std = side.init_std if side.init_scheme == "fixed" else None
    if side.downsampler in ("adapter", "lora"):
        down: Params = {"wa": _normal(keys[0], (n, k, d), std), "wb": _normal(keys[1], (n, w, k), std)}
        if side.downsampler == "adapter":
            down["norm"] = {"scale": jnp.ones((n, w), jnp.float32), "bias": jnp.zeros((n, w), jnp.float32)}
    elif side.downsampler == "linear":
        down = {"w": _normal(keys[0], (n, w, d), std)}
    else:
        down = {}
    params: Params = {
        "down": down,
        "gates": jnp.full((n, w), side.gate_init, jnp.float32),
        "layers": _stacked_block_params(scfg, n, keys[2], std),
        "norm": _norm_params(scfg, w),
        "up": {"w": _normal(keys[3], (d, w), side.init_std), "b": jnp.zeros((d,), jnp.float32)},
    }
    if side.output_mix == "gated":
        params["out_gate"] = jnp.full((d,), side.output_gate_init, jnp.float32)
    else:  # residual: Up starts at zero, so o starts at the backbone's final state
        params["up"]["w"] = jnp.zeros((d, w), jnp.float32)
    if side.task == "classification":
        params["score"] = {"w": _normal(keys[4], (side.num_labels, d), side.init_std)}
    return params


def cast_params(params: Params, dtype: Any) -> Params:
    """Float leaves cast to the compute dtype (the float32 master stays outside)."""
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


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

    o = Norm(h_L) + Up(Norm_side(s_L)) ("residual" mix), or
    o = a * Norm(h_L) + (1 - a) * Up(Norm_side(s_L)), a = sigmoid(z_out)
    ("gated"): the final state that the frozen LM head (or the score head)
    reads. `joint_pass` with one group; `options` are its keyword arguments.

    Args:
      caches: `{"backbone": kv, "side": kv}` stacked KV caches (decoding).

    Returns:
      (o `[B, T, d]`, updated caches or None).
    """
    group_caches = None if caches is None else {"backbone": caches["backbone"], "side": (caches["side"],)}
    _, (o,), new = joint_pass(backbone_params, backbone_cfg, ((side, side_params, False),), input_ids, token_mask,
                              caches=group_caches, **options)
    return o, None if new is None else {"backbone": new["backbone"], "side": new["side"][0]}


SideGroup = tuple[SideConfig, Any, bool | str]
_PER_LAYER = ("down", "gates", "layers")  # side params stacked on the layer axis, scanned over


def _cast_inputs(fn, dtype: Any):
    """`fn(p, *args)` with its params `p` cast to the compute dtype first."""
    return lambda p, *args: fn(cast_params(p, dtype), *args)


def _layer_major(tree: Params) -> Params:
    """`[K, L, ...]` leaves (members first) as `[L, K, ...]`, for the scan over layers."""
    return jax.tree.map(lambda x: jnp.moveaxis(x, 1, 0), tree)


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
    """One backbone pass feeding any number of side networks.

    Backbone layer i runs once per scan step; every group's side layer i
    reads its state h_i. A group is `(side config, params, stacked)`: with
    `stacked`, every param leaf has a leading member axis K and the group's
    members run under `vmap` with h_i shared (not copied); members of other
    shapes are other groups, run one after another in the same scan step.

    Args:
      groups: the side networks, a tuple of `(SideConfig, params, stacked)`;
        `stacked=ROWS`: params `(stack, index [B])`, row b through member
        `index[b]` of the stack (`_rows_group`: serving many side networks).
      token_mask: `[B, T]` which of this pass's tokens are real.
      positions: `[B, T]` their positions (default: from `token_mask`).
      key_mask: `[B, S]` real key slots (S = T, or the cache length;
        default `token_mask`).
      caches: `{"backbone": kv, "side": (kv per group,)}` stacked KV caches
        (a stacked group's leaves are `[L, K, ...]`), written at `cache_index`.
      hidden_store: how the backward pass keeps each h_i (`make_downsampler`).

    Returns:
      (Norm(h_L) `[B, T, d]`: the frozen backbone's own final state, the
      outputs o per group (`[K, B, T, d]` for a stacked group, else
      `[B, T, d]`), updated caches or None).
    """
    if positions is None:
        positions = positions_from_mask(token_mask)
    if key_mask is None:
        key_mask = token_mask
    bp = jax.lax.stop_gradient(backbone_params)
    wanted = any(side.input_norm == "backbone" for side, _, _ in groups)
    norms_after = reader_norms(bp, backbone_cfg) if wanted else None
    bctx = make_context(backbone_cfg, key_mask, positions, dtype, attention_impl, cache_index)
    backbone_block = block_fn(backbone_cfg)
    h0 = jax.lax.stop_gradient(embed(bp, backbone_cfg, input_ids, positions, token_mask, dtype))
    h0_normed = h0 if norms_after is None else norm(norms_after[0], h0, backbone_cfg.norm_eps)

    steps, s0s, xs_side, finals = [], [], [], []
    for side, params, stacked in groups:
        read = h0_normed if side.input_norm == "backbone" else h0
        scfg = side_model_config(backbone_cfg, side)
        if stacked == ROWS:
            step, s0, per_layer, final = _rows_group(side, scfg, params, read, key_mask, positions, cache_index,
                                                     dtype, attention_impl, remat_side, hidden_store)
            steps.append(step)
            s0s.append(s0)
            xs_side.append(per_layer)
            finals.append(final)
            continue
        # The per-layer params stay float32 into the scan and are cast one layer at a time inside its step, so
        # no bf16 copy of every layer's side weights lives across the pass (70B: 0.6 GiB).
        sp = cast_params({k: v for k, v in params.items() if k not in _PER_LAYER}, dtype)
        down_fn = _cast_inputs(make_downsampler(side, scfg.hidden_size, hidden_store), dtype)
        side_step = _side_step(down_fn, block_fn(scfg), scfg, make_context(scfg, key_mask, positions, dtype,
                                                                         attention_impl, cache_index), dtype,
                               remat_side)
        first = jax.tree.map(lambda x: x[:, 0] if stacked else x[0], params["down"])
        per_layer = tuple(params[k] for k in _PER_LAYER)
        if stacked:
            k = params["gates"].shape[0]
            side_step = jax.vmap(side_step, in_axes=(0, 0, 0, None, 0, 0), axis_size=k)
            s0s.append(jax.vmap(down_fn, in_axes=(0, None), axis_size=k)(first, read))
            per_layer = _layer_major(per_layer)
        else:
            s0s.append(down_fn(first, read))
        steps.append(lambda x, h, s, kv, side_step=side_step: side_step(x[2], x[0], x[1], h, s, kv))
        xs_side.append(per_layer)
        finals.append((side, scfg, sp, params, stacked))

    def body(carry: tuple[jax.Array, tuple[jax.Array, ...]], xs: tuple[Any, ...]):
        h, states = carry
        b_layer, next_norm, b_kv, side_xs, s_kvs = xs
        h, b_kv = backbone_block(b_layer, h, backbone_cfg, bctx, b_kv)
        h = jax.lax.stop_gradient(h)
        h_normed = h if next_norm is None else norm(next_norm, h, backbone_cfg.norm_eps)
        out_states, out_kvs = [], []
        for (side, *_), step, s, x, kv in zip(groups, steps, states, side_xs, s_kvs):
            s, kv = step(x, h_normed if side.input_norm == "backbone" else h, s, kv)
            out_states.append(s)
            out_kvs.append(kv)
        return (h, tuple(out_states)), (b_kv, tuple(out_kvs))

    b_caches = None if caches is None else caches["backbone"]
    s_caches = (None,) * len(groups) if caches is None else tuple(caches["side"])
    xs = (bp["layers"], None if norms_after is None else norms_after[1], b_caches, tuple(xs_side), s_caches)
    (h_last, s_lasts), (b_caches, s_caches) = loops.scan(body, (h0, tuple(s0s)), xs)
    base = final_norm(bp, backbone_cfg, h_last)
    outs = []
    for (side, scfg, sp, params, stacked), s_last in zip(finals, s_lasts):
        if stacked == ROWS:  # row b's own member: s_last `[B, 1, T, d/r]`
            mix = lambda sp, p, s, b, side=side, scfg=scfg: _mix(side, scfg, b, dtype, sp, p, s)  # noqa: E731
            outs.append(jax.vmap(mix)(sp, params, s_last, base[:, None])[:, 0])
            continue
        mix = functools.partial(_mix, side, scfg, base, dtype)
        outs.append(jax.vmap(mix)(sp, params, s_last) if stacked else mix(sp, params, s_last))
    new_caches = None if caches is None else {"backbone": b_caches, "side": s_caches}
    return base, outs, new_caches


ROWS = "rows"
"""A group's `stacked` value for one member per row: params `(stack [K, ...], index int32 [B])`."""


def _gather(tree: Params, index: jax.Array) -> Params:
    return jax.tree.map(lambda x: x[index], tree)


def _rows_group(side: SideConfig, scfg: ModelConfig, params: tuple[Params, jax.Array], read: jax.Array,
                key_mask: jax.Array, positions: jax.Array, cache_index: jax.Array | None, dtype: Any,
                attention_impl: str | None, remat: bool, hidden_store: str):
    """(step, s_0, per-layer xs, final) of a group whose row b runs member `index[b]` of `stack`.

    Each layer gathers its rows' params from the stack by (index, layer):
    the scan's xs are the layer numbers and the stack stays as it is, so a
    step reads B members' layer, whatever K is (moving the stack to
    layer-major order would copy all K members every call). The side layer
    runs under `vmap` over rows, each row with a batch of one and its own
    mask, RoPE and cache slot. The carried side state is `[B, 1, T, d/r]`.
    """
    stack, index = params
    rest = {k: v for k, v in stack.items() if k not in _PER_LAYER}
    raw = _gather(rest, index)
    sp = cast_params(raw, dtype)
    down_fn = _cast_inputs(make_downsampler(side, scfg.hidden_size, hidden_store), dtype)
    ctx = make_context(scfg, key_mask, positions, dtype, attention_impl, cache_index)
    rows = index.shape[0]
    row_index = None if ctx.cache_index is None else jnp.broadcast_to(ctx.cache_index, (rows,))
    ctx = dataclasses.replace(ctx, mask=ctx.mask[:, None], cache_index=row_index,
                              rope=None if ctx.rope is None else tuple(r[:, None] for r in ctx.rope))
    block = block_fn(scfg)

    def one_row(layer, down, gate, h, s, kv, row_ctx):
        return _side_step(down_fn, block, scfg, row_ctx, dtype, remat)(layer, down, gate, h, s, kv)

    rows_step = jax.vmap(one_row)

    down_all, gates_all, layers_all = (stack[k] for k in _PER_LAYER)
    of_rows = lambda tree, layer: jax.tree.map(lambda x: x[index, layer], tree)  # noqa: E731 leaves [B, ...]

    def step(layer, h, s, kv):
        kv_rows = None if kv is None else jax.tree.map(lambda x: x[:, None], kv)
        s, kv_rows = rows_step(of_rows(layers_all, layer), of_rows(down_all, layer), gates_all[index, layer],
                               h[:, None], s, kv_rows, ctx)
        return s, (None if kv_rows is None else jax.tree.map(lambda x: x[:, 0], kv_rows))

    s0 = jax.vmap(down_fn)(of_rows(down_all, 0), read[:, None])
    return step, s0, jnp.arange(gates_all.shape[1], dtype=jnp.int32), (side, scfg, sp, raw, ROWS)


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


def _side_step(down_fn, side_block, scfg: ModelConfig, sctx: Any, dtype: Any, remat: bool = False):
    """Side layer i: s_i = f_i((1 - b_i) * D_i(h_i) + b_i * s_{i-1}), b_i = sigmoid(z_i).

    With `remat`, the gate mix and the block f_i are recomputed in the
    backward pass, so what layer i keeps for it is its side-width inputs
    (D_i(h_i), s_{i-1}). The downsampler D_i stays outside that boundary: it
    keeps what `make_downsampler`'s store says (h_i in bf16 or fp8 for a
    trainable one, nothing for pooling), never a second copy of h_i.
    """

    def mixed_block(layer: Params, gate: jax.Array, x: jax.Array, s: jax.Array, kv: Params | None):
        b = jax.nn.sigmoid(gate.astype(jnp.float32)).astype(dtype)
        return side_block(cast_params(layer, dtype), (1 - b) * x + b * s, scfg, sctx, kv)

    if remat:
        mixed_block = jax.checkpoint(mixed_block)

    def step(layer: Params, down: Params, gate: jax.Array, h: jax.Array, s: jax.Array, kv: Params | None):
        return mixed_block(layer, gate, down_fn(down, h), s, kv)

    return step


def _mix(side: SideConfig, scfg: ModelConfig, base: jax.Array, dtype: Any, sp: Params, params: Params,
         s_last: jax.Array) -> jax.Array:
    """o from the backbone's final state `base` and one member's last side state."""
    side_out = linear(norm(sp["norm"], s_last, scfg.norm_eps), sp["up"]["w"], sp["up"]["b"])
    if side.output_mix == "residual":
        return base + side_out
    a = jax.nn.sigmoid(params["out_gate"].astype(jnp.float32)).astype(dtype)
    return a * base + (1 - a) * side_out
