"""PEFT's LoRA adapter layout, both ways: a QLoRA export that `peft.PeftModel.from_pretrained` loads, and a
PEFT LoRA adapter (local or on the Hub) as a QLoRA model's params.

    adapter_config.json          peft_type LORA, base_model_name_or_path, r, lora_alpha, target_modules, ...
    adapter_model.safetensors    base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight  [r, in]
                                 base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight  [out, r]

(OPT: `base_model.model.model.decoder.layers.{i}.` and `fc1` / `fc2`.) PEFT
scales the update by `lora_alpha / r` as `QLoRAModel` does (rsLoRA is
refused). A PEFT adapter on fewer linears than `QLoRAModel` targets gets
zeros for the others: B = 0 is no update, exactly.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from qst_jax.errors import QSTError
from qst_jax.methods.qlora import LORA_TARGETS
from qst_jax.models.config import ModelConfig
from qst_jax.models.params import layer_specs

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_LAYERS = {"llama": "base_model.model.model.layers", "opt": "base_model.model.model.decoder.layers"}


class PeftFormatError(QSTError, ValueError):
    """A PEFT adapter qst_jax cannot read (another PEFT type, options it does not implement, a shape that differs)."""


def _hf_names(cfg: ModelConfig) -> dict[tuple[str, str], str]:
    """(module, linear) of each LoRA target -> its HF module name within a layer ("self_attn.q_proj")."""
    names = {}
    for path, hf, _, is_linear in layer_specs(cfg):
        if is_linear and path[:2] in LORA_TARGETS[cfg.family]:
            names[path[:2]] = hf.removesuffix(".weight")
    return names


def to_peft(params: dict[str, Any], cfg: ModelConfig, rank: int, alpha: float,
            base_model: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(adapter_config.json, adapter_model.safetensors tensors) of QLoRA params `{"lora": ...}` (LM task)."""
    names = _hf_names(cfg)
    tensors = {}
    for (module, linear), hf in names.items():
        ab = params["lora"][module][linear]
        a, b = np.asarray(ab["a"], np.float32), np.asarray(ab["b"], np.float32)  # [L, r, in], [L, out, r]
        for i in range(cfg.num_layers):
            tensors[f"{_LAYERS[cfg.family]}.{i}.{hf}.lora_A.weight"] = np.ascontiguousarray(a[i])
            tensors[f"{_LAYERS[cfg.family]}.{i}.{hf}.lora_B.weight"] = np.ascontiguousarray(b[i])
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "r": int(rank),
        "lora_alpha": float(alpha), "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "inference_mode": True, "init_lora_weights": True,
        "target_modules": sorted({hf.split(".")[-1] for hf in names.values()}), "modules_to_save": None,
        "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {},
    }
    return config, tensors


def is_peft_adapter(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, ADAPTER_CONFIG))


def from_peft(directory: str, cfg: ModelConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """(adapter_config.json, QLoRA params `{"lora": ...}`) of a PEFT LoRA adapter folder, for backbone `cfg`.

    Raises:
      PeftFormatError: not a LoRA adapter, options qst_jax does not implement
        (rsLoRA, DoRA, per-module ranks, bias, modules to save), a module
        outside QLoRA's targets, or a tensor of another shape (named).
    """
    from safetensors.numpy import load_file

    config_path = os.path.join(directory, ADAPTER_CONFIG)
    with open(config_path) as f:
        config = json.load(f)
    where = f"{config_path}"
    if config.get("peft_type") != "LORA":
        raise PeftFormatError(f"{where}: peft_type {config.get('peft_type')!r}; only LORA adapters load")
    unsupported = [k for k in ("use_rslora", "use_dora", "rank_pattern", "alpha_pattern", "modules_to_save",
                               "layers_to_transform") if config.get(k)]
    if config.get("bias", "none") != "none":
        unsupported.append("bias")
    if unsupported:
        raise PeftFormatError(f"{where}: {', '.join(unsupported)} set; qst_jax's LoRA implements none of them")
    rank, names = int(config["r"]), _hf_names(cfg)
    by_hf = {hf: key for key, hf in names.items()}
    tensors = load_file(os.path.join(directory, ADAPTER_WEIGHTS))
    lora: dict[str, Any] = {}
    for (module, linear), hf in names.items():
        out_dim, in_dim = next(s for p, _, s, lin in layer_specs(cfg) if lin and p[:2] == (module, linear))
        a = np.zeros((cfg.num_layers, rank, in_dim), np.float32)
        b = np.zeros((cfg.num_layers, out_dim, rank), np.float32)
        for i in range(cfg.num_layers):
            for part, dest, shape in (("A", a, (rank, in_dim)), ("B", b, (out_dim, rank))):
                key = f"{_LAYERS[cfg.family]}.{i}.{hf}.lora_{part}.weight"
                if key in tensors:
                    if tuple(tensors[key].shape) != shape:
                        raise PeftFormatError(f"{os.path.join(directory, ADAPTER_WEIGHTS)}: {key} has shape "
                                              f"{tuple(tensors[key].shape)}; this backbone needs {shape}")
                    dest[i] = tensors[key].astype(np.float32)
        lora.setdefault(module, {})[linear] = {"a": a, "b": b}
    known = {f"{_LAYERS[cfg.family]}.{i}.{hf}.lora_{p}.weight" for i in range(cfg.num_layers) for hf in by_hf
             for p in "AB"}
    other = sorted(set(tensors) - known)
    if other:
        raise PeftFormatError(f"{os.path.join(directory, ADAPTER_WEIGHTS)}: {other[0]} is not a LoRA weight of a "
                              f"linear QLoRA targets on this {cfg.family} backbone ({len(other)} such keys)")
    return config, {"lora": lora}
