"""A tuned model's export: `side.safetensors` + `qst_config.json`, written and read back.

The export is framework-neutral:
  side.safetensors   float32 trainable params keyed by their pytree path
                     (`"layers/attn/q/w"`, `"lora/mlp/up/a"`)
  qst_config.json    `model` (the method's `to_dict()`: method, task, label
                     count, side or LoRA settings), the backbone's config and
                     its fingerprint, and what the run adds (step, seq_len,
                     the whole run config)

    export_side(directory, model, params, {"step": 200, ...})
    model, params, info = load_tuned(directory, backbone)
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qst_jax.hub import download, is_repo_id
from qst_jax.errors import QSTError
from qst_jax.files import write_atomic, write_json_atomic
from qst_jax.methods.base import Method
from qst_jax.methods.build import head_task, model_from_dict
from qst_jax.methods.peft_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, from_peft, is_peft_adapter, to_peft
from qst_jax.methods.qlora import QLoRAModel
from qst_jax.models.config import ModelConfig
from qst_jax.tree import first_non_finite, flatten, unflatten

CONFIG_FILE = "qst_config.json"
WEIGHTS_FILE = "side.safetensors"


class ExportError(QSTError, ValueError):
    """An export that is missing, unreadable, or does not fit the backbone or its own config."""


def backbone_fingerprint(cfg: ModelConfig) -> str:
    """A stable hash of the backbone's architecture (not its weights)."""
    text = json.dumps(cfg.to_dict(), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def export_side(directory: str, model: Method, params: Any, backbone_cfg: ModelConfig,
                extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Writes `side.safetensors` and `qst_config.json` (each atomically); returns the record written."""
    from safetensors.numpy import save_file

    os.makedirs(directory, exist_ok=True)
    info = {
        "method": model.name,
        "model": model.to_dict(),
        "backbone": backbone_cfg.to_dict(),
        "backbone_fingerprint": backbone_fingerprint(backbone_cfg),
        **(extra or {}),
    }
    flat = {key: np.asarray(leaf, np.float32) for key, leaf in flatten(params).items()}
    write_atomic(os.path.join(directory, WEIGHTS_FILE), lambda p: save_file(flat, p, metadata={"format": "qst_jax"}))
    if model.name == "qlora" and model.task == "lm":  # PEFT's layout too: peft.PeftModel and vLLM load it
        config, tensors = to_peft(params, backbone_cfg, model.rank, model.alpha, str(info.get("model_path", "")))
        write_atomic(os.path.join(directory, ADAPTER_WEIGHTS), lambda p: save_file(tensors, p, metadata={"format": "pt"}))
        write_json_atomic(os.path.join(directory, ADAPTER_CONFIG), config, indent=2)
    write_json_atomic(os.path.join(directory, CONFIG_FILE), info, indent=2, default=str)
    return info


def _legacy_record(info: dict[str, Any]) -> dict[str, Any]:
    """The `model` record of an export written before it had one (top-level side/qlora keys)."""
    record = {"method": info.get("method"), "task": head_task(info.get("task", "lm")),
              "num_labels": info.get("num_labels", 2)}
    if record["method"] == "qst":
        record["side"] = info["side"]
    else:
        record["qlora"] = info["qlora"]
    return record


def side_directory(directory: str) -> str:
    """`directory`, or, when no such path exists and it reads `org/name`, that Hub repo's export made local."""
    if not os.path.exists(os.path.expanduser(directory)) and is_repo_id(directory):
        return download(directory, allow_patterns=[WEIGHTS_FILE, CONFIG_FILE, ADAPTER_CONFIG, ADAPTER_WEIGHTS,
                                                   "README.md"], field="side")
    return os.path.expanduser(directory)


def load_side(directory: str, backbone_cfg: ModelConfig | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The exported params (nested numpy arrays) and `qst_config.json`; checks the backbone.

    `directory` is an export's folder, or a Hub repo `org/name` holding one
    (`side_directory`: downloaded into the Hub cache).

    Raises:
      ExportError: missing or unreadable files, a backbone fingerprint mismatch, or a tensor
        holding NaN or infinity (named).
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    directory = side_directory(directory)
    config_path = os.path.join(directory, CONFIG_FILE)
    weights_path = os.path.join(directory, WEIGHTS_FILE)
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise ExportError(f"{path}: missing (expected an exported side network from qst-train)")
    try:
        with open(config_path) as f:
            info = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ExportError(f"{config_path}: not valid JSON ({err})") from err
    if backbone_cfg is not None and info.get("backbone_fingerprint") != backbone_fingerprint(backbone_cfg):
        b = info.get("backbone", {})
        raise ExportError(
            f"{directory}: this side network was trained for another backbone "
            f"({b.get('model_type')}, {b.get('num_layers')} layers, hidden {b.get('hidden_size')}); "
            f"fingerprint {info.get('backbone_fingerprint')} != {backbone_fingerprint(backbone_cfg)}"
        )
    try:
        flat = load_file(weights_path)
    except (SafetensorError, OSError, ValueError) as err:
        raise ExportError(f"{weights_path}: cannot read as safetensors ({err})") from err
    bad = first_non_finite(flat)
    if bad is not None:
        raise ExportError(f"{weights_path}: tensor {bad!r} holds NaN or infinite values; this side network "
                          "cannot be used (retrain it, or export an earlier checkpoint)")
    if "model" not in info:
        info["model"] = _legacy_record(info)
    return unflatten(flat), info


def load_tuned(directory: str, backbone: Any) -> tuple[Method, Any, dict[str, Any]]:
    """(model, params, info) of an exported run, checked against `backbone` (a `models.Backbone`).

    The params are checked leaf by leaf against the structure the model's
    `init` gives, so a weights file that does not fit its `qst_config.json`
    is named, not silently half-loaded.

    Raises:
      ExportError: missing or unreadable files, another backbone, or
        weights that do not fit the recorded method.
    """
    directory = side_directory(directory)
    if not os.path.isfile(os.path.join(directory, CONFIG_FILE)) and is_peft_adapter(directory):
        return _load_peft(directory, backbone)
    nested, info = load_side(directory, backbone.cfg)
    model = model_from_dict(info["model"], backbone.cfg, dtype=backbone.dtype)
    expected = jax.eval_shape(model.init, jax.random.PRNGKey(0))
    flat, found = flatten(expected), flatten(nested)
    weights_path = os.path.join(directory, WEIGHTS_FILE)
    missing, unexpected = sorted(set(flat) - set(found)), sorted(set(found) - set(flat))
    if missing or unexpected:
        raise ExportError(
            f"{weights_path}: does not fit the {model.name} model in {CONFIG_FILE}: "
            f"missing {missing[:4]}, unexpected {unexpected[:4]}"
        )
    for key, spec in flat.items():
        if tuple(found[key].shape) != tuple(spec.shape):
            raise ExportError(
                f"{weights_path}: {key} has shape {tuple(found[key].shape)}, {CONFIG_FILE} implies {tuple(spec.shape)}"
            )
    treedef = jax.tree_util.tree_structure(expected)
    params = jax.tree_util.tree_unflatten(treedef, [jnp.asarray(found[key]) for key in flat])
    return model, params, info


def _load_peft(directory: str, backbone: Any) -> tuple[Method, Any, dict[str, Any]]:
    """A PEFT LoRA adapter folder as a QLoRA language model over `backbone` (`peft_format.from_peft`)."""
    config, params = from_peft(directory, backbone.cfg)
    model = QLoRAModel(backbone.cfg, rank=int(config["r"]), alpha=float(config["lora_alpha"]), task="lm",
                       dtype=backbone.dtype)
    info = {"method": model.name, "model": model.to_dict(), "peft": config,
            "model_path": config.get("base_model_name_or_path", "")}
    return model, jax.tree.map(jnp.asarray, params), info
