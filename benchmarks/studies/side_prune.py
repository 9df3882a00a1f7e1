"""Side blocks initialised from the backbone's own weights by structured pruning (Ladder Side-Tuning).

A measured candidate of docs/quality.md (`benchmarks/studies/quality.py --only
qst-pruned-official`), not a library option: on SST-2 it learned no better
than the random init, so it stays here with its measurement.

Each side block i is backbone block i cut down to the side's widths:
  hidden dims  S: the d/r dims with the largest input weight norms, summed
               over every layer (one S for all layers: the side stream is one
               space), in their original order;
  heads        evenly spaced backbone heads (all of them when the side keeps
               the backbone's head count, as `head_layout="official"` does);
               in each, the dims whose RoPE frequency the side's head_dim
               has: side dim j (j < h_s / 2) is backbone dim j * h_b / h_s,
               and its rotation partner j + h_s / 2 is j * h_b / h_s + h_b / 2;
  MLP units    per layer, the I/r units with the largest
               |gate row| * |up row| * |down column|.
Norm scales are the backbone's at S. Downsamplers, gates and Up keep their
random (or zero) init; `selecting_downsamplers` gives `linear` downsamplers
that start by picking S of each h_i, so the side stream starts in the space
its pruned blocks were cut for (`quality.py --only qst-pruned-select`).
LLaMA family only.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qst_jax.methods.side_config import SideConfig, side_model_config
from qst_jax.models.config import ConfigError, ModelConfig
from qst_jax.models.layers import Params
from qst_jax.quant.nf4 import NF4Weight


def _dense(w: Any) -> np.ndarray:
    return np.asarray(w.dequantize(jnp.float32) if isinstance(w, NF4Weight) else w, np.float32)


def _head_rows(heads: list[int], backbone_dim: int, side_dim: int) -> np.ndarray:
    """Backbone rows `[len(heads) * side_dim]` of the chosen heads' RoPE-matched dims."""
    step, half, side_half = backbone_dim // side_dim, backbone_dim // 2, side_dim // 2
    within = [j * step for j in range(side_half)] + [j * step + half for j in range(side_half)]
    return np.array([h * backbone_dim + j for h in heads for j in within])


def dense_weights(backbone_params: Params) -> dict[str, np.ndarray]:
    """Every layer's q, k, v, o, gate, up, down weights, dequantized: `{name: float32 [L, out, in]}`."""
    layers = backbone_params["layers"]
    return {name: _dense(layers[mod][name]["w"]) for mod, names in (("attn", "qkvo"), ("mlp", ("gate", "up", "down")))
            for name in names}


def pruned_dims(backbone_params: Params, width: int, weights: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """S: the `width` hidden dims with the largest input-weight norms over every layer, in order."""
    w = dense_weights(backbone_params) if weights is None else weights
    layers = backbone_params["layers"]
    attn_scale = np.asarray(layers["attn_norm"]["scale"], np.float32)
    mlp_scale = np.asarray(layers["mlp_norm"]["scale"], np.float32)
    importance = (np.linalg.norm(w["q"], axis=1) + np.linalg.norm(w["k"], axis=1) + np.linalg.norm(w["v"], axis=1)) \
        * np.abs(attn_scale) + (np.linalg.norm(w["gate"], axis=1) + np.linalg.norm(w["up"], axis=1)) * np.abs(mlp_scale)
    return np.sort(np.argsort(-importance.sum(0))[:width])


def selecting_downsamplers(dims: np.ndarray, num_layers: int, hidden_size: int) -> Params:
    """`linear` downsampler params `{w [L, |S|, d]}` that pick the dims S of every h_i (one-hot rows)."""
    w = np.zeros((num_layers, len(dims), hidden_size), np.float32)
    w[:, np.arange(len(dims)), dims] = 1.0
    return {"w": jnp.asarray(w)}


def pruned_side_layers(backbone_params: Params, cfg: ModelConfig, side: SideConfig,
                       weights: dict[str, np.ndarray] | None = None) -> tuple[Params, Params]:
    """The side blocks (stacked `[L, ...]`, float32) and the side final norm pruned from the backbone.

    `weights` (from `dense_weights`) saves dequantizing the backbone again when the caller has them.

    Raises:
      ConfigError: a non-LLaMA backbone, or a side head_dim that does not divide the backbone's.
    """
    scfg = side_model_config(cfg, side)
    if cfg.family != "llama":
        raise ConfigError(f"side.init_scheme 'pruned' needs a LLaMA-family backbone, not {cfg.family!r}")
    if cfg.head_dim % scfg.head_dim or scfg.head_dim % 2:
        raise ConfigError(f"side.init_scheme 'pruned' needs the side head_dim ({scfg.head_dim}) to divide the "
                          f"backbone's ({cfg.head_dim}); try side.head_layout=official")
    w = dense_weights(backbone_params) if weights is None else weights
    layers = backbone_params["layers"]
    attn_scale = np.asarray(layers["attn_norm"]["scale"], np.float32)
    mlp_scale = np.asarray(layers["mlp_norm"]["scale"], np.float32)
    dims = pruned_dims(backbone_params, scfg.hidden_size, w)
    q_heads = [int(round(x)) for x in np.linspace(0, cfg.num_heads - 1, scfg.num_heads)] \
        if scfg.num_heads < cfg.num_heads else list(range(cfg.num_heads))
    group = cfg.num_heads // cfg.num_kv_heads
    kv_heads = list(range(cfg.num_kv_heads)) if scfg.num_kv_heads == cfg.num_kv_heads else [h // group for h in q_heads]
    q_rows = _head_rows(q_heads, cfg.head_dim, scfg.head_dim)
    kv_rows = _head_rows(kv_heads, cfg.head_dim, scfg.head_dim)
    units = scfg.intermediate_size
    strength = np.linalg.norm(w["gate"], axis=2) * np.linalg.norm(w["up"], axis=2) * np.linalg.norm(w["down"], axis=1)
    mlp_units = np.sort(np.argsort(-strength, axis=1)[:, :units], axis=1)  # [L, I / r]
    take = lambda x, rows, cols: x[:, rows][:, :, cols]  # noqa: E731
    per_layer = lambda x, idx, axis: np.stack([np.take(x[i], idx[i], axis=axis) for i in range(len(idx))])  # noqa
    side_layers = {
        "attn_norm": {"scale": attn_scale[:, dims]},
        "attn": {"q": {"w": take(w["q"], q_rows, dims)}, "k": {"w": take(w["k"], kv_rows, dims)},
                 "v": {"w": take(w["v"], kv_rows, dims)}, "o": {"w": take(w["o"], dims, q_rows)}},
        "mlp_norm": {"scale": mlp_scale[:, dims]},
        "mlp": {"gate": {"w": per_layer(w["gate"][:, :, dims], mlp_units, 0)},
                "up": {"w": per_layer(w["up"][:, :, dims], mlp_units, 0)},
                "down": {"w": per_layer(w["down"][:, dims, :], mlp_units, 1)}},
    }
    final = {"scale": np.asarray(backbone_params["final_norm"]["scale"], np.float32)[dims]}
    return jax.tree.map(jnp.asarray, side_layers), jax.tree.map(jnp.asarray, final)
