"""The QST side network's params: their layout and their random init.

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

`PER_LAYER` names the entries stacked on the layer axis: the joint scan hands
layer i of each to side layer i; the rest is read once, after the scan.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from qst_jax.methods.side_config import SideConfig, side_model_config
from qst_jax.models.config import ModelConfig
from qst_jax.models.layers import Params
from qst_jax.models.params import layer_specs
from qst_jax.tree import set_path

PER_LAYER = ("down", "gates", "layers")


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


def _norm_params(cfg: ModelConfig, width: int) -> Params:
    p = {"scale": jnp.ones((width,), jnp.float32)}
    if cfg.family == "opt":
        p["bias"] = jnp.zeros((width,), jnp.float32)
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
