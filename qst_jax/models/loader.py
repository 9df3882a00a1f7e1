"""`load_backbone`: a frozen decoder from local files, quantized while streaming.

Accepted inputs:
  * an HF directory (`config.json` + safetensors, sharded or not) in
    bf16/fp16/fp32: each linear is read, quantized to NF4 and dropped before
    the next is read, so host memory stays near one tensor's float32 copy plus
    the 4-bit result;
  * a bitsandbytes NF4 directory (`quantization_config` in config.json): the
    4-bit tensors are taken as they are, never requantized;
  * a `.gguf` file of a llama-architecture model.
Embeddings, norms, biases and the LM head stay in the compute dtype.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401
import numpy as np

from qst_jax.models.backbone import Backbone
from qst_jax.models.weight_sources import CheckpointError, GGUFSource, SafetensorsSource, read_json
from qst_jax.models.config import ConfigError, ModelConfig, from_hf_config
from qst_jax.models.host_layers import host_placement
from qst_jax.models.hub import is_hub_id, resolve_model
from qst_jax.models.params import Spec, global_specs, layer_specs
from qst_jax.quant.bnb_io import quantized_prefixes, read_nf4
from qst_jax.quant.nf4 import QuantizationError, check_finite, quantize_jit
from qst_jax.tree import set_path


class _Reader:
    """Reads, checks, converts and quantizes tensors from one source."""

    def __init__(self, source: Mapping[str, np.ndarray], dtype: Any, quantize_linears: bool):
        self.source = source
        self.dtype = np.dtype(dtype)
        self.quantize_linears = quantize_linears
        self.nf4_prefixes = quantized_prefixes(source)

    def _where(self, key: str) -> str:
        return f"{self.source.file_of(key)}: {key}"

    def fetch(self, key: str, shape: tuple[int, ...], linear: bool) -> Any:
        prefix = key.removesuffix(".weight")
        if linear and prefix in self.nf4_prefixes:
            w = read_nf4(prefix, self.source, source=f"{self.source.file_of(key)}: ")
            if w.shape != shape:
                raise CheckpointError(f"{self._where(key)}: NF4 shape {w.shape} does not match config {shape}")
            return w if self.quantize_linears else np.asarray(w.dequantize(self.dtype))
        try:
            array = self.source[key]
        except KeyError as err:
            raise CheckpointError(f"{self._where(key)}: tensor missing from checkpoint") from err
        if tuple(array.shape) != shape:
            raise CheckpointError(f"{self._where(key)}: shape {tuple(array.shape)} does not match config {shape}")
        if linear and self.quantize_linears:
            try:
                check_finite(array, key)
                q = quantize_jit(array)  # `name` is static: passing it would recompile per tensor
            except QuantizationError as err:
                raise CheckpointError(f"{self.source.file_of(key)}: {err}") from err
            return jax.tree.map(np.asarray, q)
        return np.asarray(array).astype(self.dtype)


def _find_prefix(source: Mapping[str, np.ndarray], cfg: ModelConfig) -> str:
    first = "embed_tokens.weight"
    candidates = ["model.", ""] if cfg.family == "llama" else ["model.decoder.", "decoder.", ""]
    for prefix in candidates:
        if f"{prefix}{first}" in source:
            return prefix
    raise CheckpointError(
        f"{source.file_of(candidates[0] + first)}: no {first!r} under any of the prefixes {candidates}"
    )


class Placement(Protocol):
    """Where the loader puts a backbone's pieces as it reads them.

    `place(tree)` takes the non-layer entries (embeddings, final norm, LM
    head) and returns them placed; `add_layer(index, num_layers, layer)`
    takes one layer's host params; `finish()` returns the stacked layers
    `[num_layers, ...]`. `HostPlacement` stacks on the host;
    `qst_jax.parallel.ShardedPlacement` sends each piece to its device shards.
    """

    def place(self, tree: dict[str, Any]) -> dict[str, Any]: ...

    def add_layer(self, index: int, num_layers: int, layer: Any) -> None: ...

    def finish(self) -> Any: ...


class HostPlacement:
    """Stacks layers on the host: leaves preallocated after layer 0, filled in place."""

    def __init__(self) -> None:
        self._leaves: list[np.ndarray] | None = None
        self._treedef: Any = None

    def place(self, tree: dict[str, Any]) -> dict[str, Any]:
        return tree

    def add_layer(self, index: int, num_layers: int, layer: Any) -> None:
        leaves, self._treedef = jax.tree_util.tree_flatten(layer)
        if self._leaves is None:
            self._leaves = [np.empty((num_layers, *np.shape(x)), np.asarray(x).dtype) for x in leaves]
        for target, leaf in zip(self._leaves, leaves):
            target[index] = leaf

    def finish(self) -> Any:
        return jax.tree_util.tree_unflatten(self._treedef, self._leaves)


def read_params(source: Mapping[str, np.ndarray], cfg: ModelConfig, *, dtype: Any, quantize_linears: bool,
                placement: Placement | None = None) -> dict:
    """Builds the decoder params from `source`, one layer at a time.

    Args:
      placement: where the pieces go as they are read; default: stacked on the
        host (`HostPlacement`), so the host holds the 4-bit result plus one
        layer in flight. A `parallel.ShardedPlacement` sends each piece to its
        device shards instead, so no host or device holds the whole model.
    """
    placement = placement or HostPlacement()
    reader = _Reader(source, dtype, quantize_linears)
    prefix = _find_prefix(source, cfg)
    params: dict[str, Any] = {}
    for path, name, shape, linear in global_specs(cfg):
        set_path(params, path, reader.fetch(prefix + name, shape, linear))
    head_key = "lm_head.weight"
    if not cfg.tie_word_embeddings:
        set_path(params, ("lm_head", "w"), reader.fetch(head_key, (cfg.vocab_size, cfg.embed_dim), False))
    params = placement.place(params)

    layer_prefix = f"{prefix}layers."
    treedef = None
    for index in range(cfg.num_layers):
        layer: dict[str, Any] = {}
        for path, name, shape, linear in layer_specs(cfg):
            set_path(layer, path, reader.fetch(f"{layer_prefix}{index}.{name}", shape, linear))
        this_def = jax.tree_util.tree_structure(layer)
        if treedef is None:
            treedef = this_def
        elif this_def != treedef:
            raise CheckpointError(f"{source.file_of(layer_prefix)}: layer {index} differs in structure from layer 0")
        placement.add_layer(index, cfg.num_layers, layer)
        del layer
    params["layers"] = placement.finish()
    return params


OFFLOAD_MODES = ("none", "weights", "weights+states")  # weights+states: also the backbone states the backward keeps


def layers_in_host_memory() -> Any:
    """The sharding that keeps an array in the default device's pinned host memory (a streamed backbone's layers)."""
    from jax.sharding import SingleDeviceSharding

    return SingleDeviceSharding(jax.devices()[0], memory_kind="pinned_host")


def _layer_leaf_to(x: Any, host: Any) -> Any:
    """One stacked layer leaf placed as `host_layers.host_placement` says for the default device (host or device)."""
    return jax.device_put(x, host_placement(np.shape(x), x.dtype, host, jax.devices()[0].platform))


def offload_layers(params: dict[str, Any]) -> dict[str, Any]:
    """`params` with the stacked `layers` moved to pinned host memory, streamed to the device a layer at a time
    by every layer loop (`models.loops.layer_to_device`); embeddings, the LM head and (on a TPU) the layers'
    1-D and 2-D leaves stay on the device (`models.host_layers`)."""
    host = layers_in_host_memory()
    layers = jax.tree.map(lambda x: _layer_leaf_to(x, host), params["layers"])
    return {**params, "layers": layers}


def _to_device(params: dict[str, Any], offload: str = "none") -> dict[str, Any]:
    """Moves host arrays to the default device one leaf at a time (with `offload="weights"`, the layers to its
    pinned host memory instead: they never occupy the device whole).

    Each host leaf is released as soon as its device copy exists, so the host
    never holds the whole model twice.
    """
    host = layers_in_host_memory() if offload != "none" else None
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    del params
    leaves = [leaf for _, leaf in flat]
    for i, (path, _) in enumerate(flat):
        in_layers = host is not None and getattr(path[0], "key", None) == "layers"
        placed = _layer_leaf_to(leaves[i], host) if in_layers else jax.device_put(leaves[i])
        leaves[i] = placed.block_until_ready()
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _check_quantization_config(hf: Mapping[str, Any], path: str) -> bool:
    qc = hf.get("quantization_config")
    if not qc:
        return False
    where = f"{path}: quantization_config"
    if qc.get("quant_method") != "bitsandbytes" or not qc.get("load_in_4bit", qc.get("_load_in_4bit")):
        raise CheckpointError(f"{where}: only bitsandbytes 4-bit checkpoints are supported, got {qc}")
    if qc.get("bnb_4bit_quant_type", "fp4") != "nf4":
        raise CheckpointError(
            f"{where}: bnb_4bit_quant_type {qc.get('bnb_4bit_quant_type', 'fp4')!r} is not supported; "
            "qst_jax reads NF4 only (FP4 uses another code table)"
        )
    return True


def resolve_path(path: str | os.PathLike) -> str:
    """A local path: `path` itself, or the Hub snapshot an `org/name` (or `org/name:file.gguf`) names (`models.hub`)."""
    path = os.path.expanduser(os.fspath(path))
    if not os.path.exists(path) and is_hub_id(path):
        path = resolve_model(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or directory")
    return path


def _read_hf_config(path: str) -> tuple[dict[str, Any], str]:
    """(config.json as a dict, its path) of a resolved HF directory."""
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise CheckpointError(f"{path}: no config.json (expected a HF model directory or a .gguf file)")
    return read_json(config_path), config_path


def load_config(path: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of a checkpoint directory or GGUF file."""
    path = resolve_path(path)
    if path.endswith(".gguf"):
        return from_hf_config(GGUFSource(path).hf_config, source=path)
    hf, config_path = _read_hf_config(path)
    return from_hf_config(hf, source=config_path)


def load_backbone(path: str | os.PathLike, *, quantize: bool = True, dtype: Any = jnp.bfloat16,
                  placement: Placement | None = None, offload: str = "none") -> Backbone:
    """Loads a frozen backbone from a local directory or `.gguf` file, or one named on the Hub.

    Args:
      path: HF directory (float or bitsandbytes NF4) or a `.gguf` file, or
        a Hub repo `org/name` (`org/name:file.gguf`; `models.hub`).
      quantize: hold linear weights as NF4 (bnb checkpoints are read as they
        are); False keeps them dense in `dtype` (a bnb checkpoint is then
        dequantized).
      dtype: compute dtype of activations, embeddings, norms and LM head.
      placement: where each piece goes as it is read (see `Placement`).
        None: stacked on the host, then moved to the default device leaf by
        leaf. `qst_jax.parallel.ShardedPlacement(mesh)` sends each layer to
        its device shards as it is read, so no host or device ever holds the
        whole model.
      offload: "weights": the stacked layers go to the device's pinned host
        memory and every layer loop streams them in one layer at a time
        (`offload_layers`); "none" (default): all on the device.

    Raises:
      CheckpointError / ConfigError: a missing path, an unsupported
        `model_type` or quantization, a missing tensor or a shape that does
        not match the config; the message names the file and key.
    """
    path = resolve_path(path)
    if path.endswith(".gguf"):
        source: Any = GGUFSource(path)
        cfg = from_hf_config(source.hf_config, source=path)
    else:
        hf, config_path = _read_hf_config(path)
        cfg = from_hf_config(hf, source=config_path)
        _check_quantization_config(hf, config_path)
        source = SafetensorsSource(path)
    if placement is None:
        params = _to_device(read_params(source, cfg, dtype=dtype, quantize_linears=quantize), offload)
    else:
        params = read_params(source, cfg, dtype=dtype, quantize_linears=quantize, placement=placement)
    return Backbone(cfg=cfg, params=params, dtype=dtype, source=path)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")


def load_tokenizer(path: str | os.PathLike) -> Any:
    """The tokenizer of a local HF directory or GGUF file, or of a Hub repo (`models.hub`).

    Raises:
      CheckpointError: the directory has no tokenizer files, or they do not load.
    """
    from transformers import AutoTokenizer

    path = resolve_path(path)
    if path.endswith(".gguf"):
        from qst_jax.models.gguf_tokenizer import tokenizer_from_gguf

        return tokenizer_from_gguf(path)  # transformers' own GGUF path needs torch
    if not any(os.path.isfile(os.path.join(path, name)) for name in TOKENIZER_FILES):
        raise CheckpointError(
            f"{path}: no tokenizer in this model directory (none of {', '.join(TOKENIZER_FILES)}); copy the "
            "model's tokenizer files beside its config.json"
        )
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: the tokenizer files do not load ({str(err).splitlines()[0]})") from None


__all__ = [
    "Backbone",
    "CheckpointError",
    "HostPlacement",
    "Placement",
    "ConfigError",
    "layer_specs",
    "load_backbone",
    "load_config",
    "load_tokenizer",
    "read_params",
]
