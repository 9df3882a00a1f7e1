"""Rebuilding a tuned model from `qst-train`'s export (side.safetensors + qst_config.json)."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from qst_jax.models.loader import Backbone
from qst_jax.side.config import SideConfig
from qst_jax.side.model import QLoRAModel, QSTModel
from qst_jax.train.checkpoint import load_side


def load_tuned(directory: str, backbone: Backbone) -> tuple[QSTModel | QLoRAModel, dict[str, Any], dict[str, Any]]:
    """(model, params, info) of an exported run, checked against `backbone`.

    Raises:
      ExportError: missing files or a side network trained for another backbone.
    """
    params, info = load_side(directory, backbone.cfg)
    params = _to_jnp(params)
    task = "classification" if info["task"] == "classification" else "lm"
    if info["method"] == "qlora":
        q = info["qlora"]
        model: QSTModel | QLoRAModel = QLoRAModel(
            backbone.cfg, rank=q["rank"], alpha=q["alpha"], task=task, num_labels=info["num_labels"],
            dtype=backbone.dtype, remat=False,
        )
    else:
        s = info["side"]
        side = SideConfig(
            reduction_factor=s["reduction_factor"], adapter_rank=s["adapter_rank"], downsampler=s["downsampler"],
            side_heads=s["side_heads"] or None, gate_init=s["gate_init"], output_gate_init=s["output_gate_init"],
            task=task, num_labels=info["num_labels"], init_std=s["init_std"],
        )
        model = QSTModel(backbone.cfg, side, dtype=backbone.dtype)
        params.setdefault("down", {})  # pooling downsamplers have no params (and no tensors in the file)
    return model, params, info


def _to_jnp(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _to_jnp(v) for k, v in tree.items()}
    return jnp.asarray(tree)
