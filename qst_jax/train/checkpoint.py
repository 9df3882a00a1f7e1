"""Orbax checkpoints of the train state, and the exported side network.

A checkpoint holds the TrainState (trainable params, optimizer state, step,
RNG) and a JSON record (data position, config fingerprint). Orbax writes each
step to a temporary folder and renames it when complete, so a crash never
leaves a half-written checkpoint that `--resume` would pick up. Saves are
synchronous: the train step donates the state's buffers, so they must be
written before the next step reuses them.

The export is framework-neutral: `side.safetensors` (float32 params keyed by
their pytree path) and `qst_config.json` (method, side config, backbone
config and its fingerprint).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from qst_jax.models.config import ModelConfig


class Checkpointer:
    """Keeps the last `keep` checkpoints under `directory`."""

    def __init__(self, directory: str, keep: int = 2):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False, create=True)
        self.manager = ocp.CheckpointManager(os.path.abspath(directory), options=options)

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self.manager.save(step, args=args, force=True)
        self.manager.wait_until_finished()

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError("no checkpoint to resume from")
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
        restored = self.manager.restore(step, args=args)
        return restored["state"], restored["meta"]

    def close(self) -> None:
        self.manager.close()


def backbone_fingerprint(cfg: ModelConfig) -> str:
    """A stable hash of the backbone's architecture (not its weights)."""
    text = json.dumps(cfg.to_dict(), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _flatten(params: Any) -> dict[str, np.ndarray]:
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        key = "/".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)
        flat[key] = np.asarray(leaf, np.float32)
    return flat


def _unflatten(flat: dict[str, np.ndarray]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        node = tree
        parts = key.split("/")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return tree


def export_side(directory: str, params: Any, info: dict[str, Any]) -> None:
    """Writes `side.safetensors` and `qst_config.json` (atomically, each)."""
    from safetensors.numpy import save_file

    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".side.safetensors.tmp-{os.getpid()}")
    save_file(_flatten(params), tmp, metadata={"format": "qst_jax"})
    os.replace(tmp, os.path.join(directory, "side.safetensors"))
    tmp = os.path.join(directory, f".qst_config.json.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(info, f, indent=2, default=str)
    os.replace(tmp, os.path.join(directory, "qst_config.json"))


class ExportError(ValueError):
    pass


def load_side(directory: str, backbone_cfg: ModelConfig | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Reads an exported side network; checks it was trained for `backbone_cfg`.

    Raises:
      ExportError: missing files, or a backbone fingerprint mismatch.
    """
    from safetensors.numpy import load_file

    config_path = os.path.join(directory, "qst_config.json")
    weights_path = os.path.join(directory, "side.safetensors")
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise ExportError(f"{path}: missing (expected an exported side network from qst-train)")
    with open(config_path) as f:
        info = json.load(f)
    if backbone_cfg is not None and info.get("backbone_fingerprint") != backbone_fingerprint(backbone_cfg):
        raise ExportError(
            f"{directory}: this side network was trained for another backbone "
            f"({info.get('backbone', {}).get('model_type')}, {info.get('backbone', {}).get('num_layers')} layers, "
            f"hidden {info.get('backbone', {}).get('hidden_size')}); fingerprint {info.get('backbone_fingerprint')} "
            f"!= {backbone_fingerprint(backbone_cfg)}"
        )
    return _unflatten(load_file(weights_path)), info
