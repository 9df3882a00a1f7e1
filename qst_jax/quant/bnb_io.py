"""Reading and writing bitsandbytes' serialized NF4 form, key by key.

For a quantized linear `<m>` a checkpoint holds (docs/nf4-format.md):

    <m>.weight                               uint8 [(out*in+1)//2, 1] packed codes
    <m>.weight.absmax                        uint8 [n/64] (nested) or float32
    <m>.weight.quant_map                     float32 [16], the NF4 table
    <m>.weight.nested_absmax                 float32 [ceil(n/64/256)] (nested only)
    <m>.weight.nested_quant_map              float32 [256] (nested only)
    <m>.weight.quant_state.bitsandbytes__nf4 uint8 UTF-8 JSON

When the checkpoint's `bnb_4bit_quant_storage` is not uint8, the packed bytes
are stored viewed as that dtype; they are reinterpreted here as uint8.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy for safetensors)
import numpy as np

from qst_jax.errors import InputError
from qst_jax.files import write_atomic
from qst_jax.quant.nf4 import DYNAMIC_MAP, NESTED_BLOCKSIZE, NF4_TABLE, NF4Weight, QuantizationError

QUANT_STATE_KEY = "weight.quant_state.bitsandbytes__"
_QUANT_STATE_MARK = ".weight.quant_state.bitsandbytes__"



class SafetensorsView(Mapping):
    """A read-only Mapping over an open safetensors file (tensors read lazily).

    Missing keys raise KeyError, so `read_nf4` can name them.
    """

    def __init__(self, handle: Any):
        self._handle = handle
        self._keys = list(handle.keys())
        self._key_set = set(self._keys)

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._key_set:
            raise KeyError(key)
        return self._handle.get_tensor(key)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def quantized_prefixes(keys: Iterable[str]) -> dict[str, str]:
    """Maps each quantized module prefix `<m>` to its quant type ("nf4", "fp4", ...)."""
    found = {}
    for key in keys:
        if _QUANT_STATE_MARK in key:
            prefix, quant_type = key.split(_QUANT_STATE_MARK, 1)
            found[prefix] = quant_type
    return found


def _as_uint8_bytes(array: np.ndarray) -> np.ndarray:
    array = np.ascontiguousarray(array)
    return array.reshape(-1).view(np.uint8)


def _parse_quant_state(raw: np.ndarray, key: str, source: str) -> dict[str, Any]:
    try:
        state = json.loads(_as_uint8_bytes(raw).tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise QuantizationError(f"{source}{key}: quant_state is not valid UTF-8 JSON ({err})") from err
    if not isinstance(state, dict):
        raise QuantizationError(f"{source}{key}: quant_state JSON is not an object")
    missing = [k for k in ("quant_type", "blocksize", "shape") if k not in state]
    if missing:
        raise QuantizationError(f"{source}{key}: quant_state lacks {missing}")
    return state


def read_nf4(prefix: str, tensors: Mapping[str, np.ndarray], *, source: str = "") -> NF4Weight:
    """Builds an NF4Weight from the bitsandbytes tensors of module `prefix`.

    Args:
      prefix: module name, e.g. `model.layers.0.mlp.down_proj`.
      tensors: full key -> numpy tensor (a dict, or a SafetensorsView).
      source: prefix for error messages (usually the file name and ": ").

    Raises:
      QuantizationError: a missing or inconsistent tensor, an unsupported
        quant type (FP4), or a non-bitsandbytes code table; the message names
        the key.
    """
    def fetch(suffix: str) -> np.ndarray:
        key = f"{prefix}.{suffix}"
        try:
            return np.asarray(tensors[key])
        except KeyError as err:
            raise QuantizationError(f"{source}{key}: tensor missing from checkpoint") from err

    state_key = None
    for quant_type in ("nf4", "fp4"):
        try:
            raw_state = np.asarray(tensors[f"{prefix}.{QUANT_STATE_KEY}{quant_type}"])
            state_key = f"{prefix}.{QUANT_STATE_KEY}{quant_type}"
            break
        except KeyError:
            continue
    if state_key is None:
        raise QuantizationError(f"{source}{prefix}.{QUANT_STATE_KEY}nf4: tensor missing from checkpoint")
    state = _parse_quant_state(raw_state, state_key, source)
    if state["quant_type"] != "nf4" or not state_key.endswith("nf4"):
        raise QuantizationError(
            f"{source}{state_key}: quant_type {state['quant_type']!r} is not supported; qst_jax reads "
            "bitsandbytes NF4 only (FP4 uses a different code table). Re-quantize with "
            "bnb_4bit_quant_type='nf4' or load the unquantized model and let qst_jax quantize it."
        )
    try:
        blocksize = int(state["blocksize"])
        out_dim, in_dim = (int(s) for s in state["shape"])
    except (TypeError, ValueError) as err:
        raise QuantizationError(f"{source}{state_key}: bad blocksize/shape in quant_state: {state}") from err
    if in_dim % blocksize or blocksize % 2:
        raise QuantizationError(
            f"{source}{state_key}: shape {(out_dim, in_dim)} with blocksize {blocksize} does not split rows "
            "into whole blocks; qst_jax needs in % blocksize == 0"
        )
    n = out_dim * in_dim
    packed = _as_uint8_bytes(fetch("weight"))
    if packed.size != n // 2:
        raise QuantizationError(
            f"{source}{prefix}.weight: {packed.size} packed bytes, expected {n // 2} for shape {(out_dim, in_dim)}"
        )
    quant_map = fetch("weight.quant_map").astype(np.float32).reshape(-1)
    if quant_map.shape != NF4_TABLE.shape or not np.array_equal(quant_map, NF4_TABLE):
        raise QuantizationError(f"{source}{prefix}.weight.quant_map: not the NF4 table")
    nblocks = n // blocksize
    absmax = fetch("weight.absmax").reshape(-1)
    if absmax.size != nblocks:
        raise QuantizationError(f"{source}{prefix}.weight.absmax: {absmax.size} scales, expected {nblocks}")
    nested = "nested_offset" in state
    if nested:
        nested_blocksize = int(state.get("nested_blocksize", NESTED_BLOCKSIZE))
        if nested_blocksize != NESTED_BLOCKSIZE:
            raise QuantizationError(
                f"{source}{state_key}: nested_blocksize {nested_blocksize} is not supported (only {NESTED_BLOCKSIZE})"
            )
        nested_map = fetch("weight.nested_quant_map").astype(np.float32).reshape(-1)
        if nested_map.shape != DYNAMIC_MAP.shape or not np.array_equal(nested_map, DYNAMIC_MAP):
            raise QuantizationError(f"{source}{prefix}.weight.nested_quant_map: not bitsandbytes' dynamic map")
        nested_absmax = fetch("weight.nested_absmax").astype(np.float32).reshape(-1)
        if nested_absmax.size != math.ceil(nblocks / NESTED_BLOCKSIZE):
            raise QuantizationError(
                f"{source}{prefix}.weight.nested_absmax: {nested_absmax.size} scales, expected "
                f"{math.ceil(nblocks / NESTED_BLOCKSIZE)}"
            )
        if absmax.dtype != np.uint8:
            raise QuantizationError(f"{source}{prefix}.weight.absmax: expected uint8 codes, got {absmax.dtype}")
        offset = np.float32(state["nested_offset"])
    else:
        nested_absmax = offset = None
        absmax = absmax.astype(np.float32)
    return NF4Weight(
        packed=packed.reshape(out_dim, in_dim // 2),
        absmax=absmax.reshape(out_dim, in_dim // blocksize),
        nested_absmax=nested_absmax,
        offset=None if offset is None else np.asarray(offset, np.float32),
        shape=(out_dim, in_dim),
        blocksize=blocksize,
        dtype=str(state.get("dtype", "bfloat16")).removeprefix("torch."),
    )


def to_bnb_tensors(prefix: str, w: NF4Weight) -> dict[str, np.ndarray]:
    """The bitsandbytes tensors (HF `save_pretrained` layout) of one NF4Weight."""
    if w.lead_shape:
        raise InputError(f"{prefix}: to_bnb_tensors takes one matrix, got stacked leading axes {w.lead_shape}")
    out_dim, in_dim = w.shape
    state: dict[str, Any] = {
        "quant_type": "nf4",
        "blocksize": w.blocksize,
        "dtype": w.dtype,
        "shape": [out_dim, in_dim],
    }
    tensors = {
        f"{prefix}.weight": np.asarray(w.packed, np.uint8).reshape(-1, 1),
        f"{prefix}.weight.absmax": np.asarray(w.absmax).reshape(-1),
        f"{prefix}.weight.quant_map": NF4_TABLE.copy(),
    }
    if w.double_quant:
        state.update(
            nested_blocksize=NESTED_BLOCKSIZE,
            nested_dtype="float32",
            nested_offset=float(np.asarray(w.offset)),
        )
        tensors[f"{prefix}.weight.nested_absmax"] = np.asarray(w.nested_absmax, np.float32).reshape(-1)
        tensors[f"{prefix}.weight.nested_quant_map"] = DYNAMIC_MAP.copy()
    tensors[f"{prefix}.{QUANT_STATE_KEY}nf4"] = np.frombuffer(json.dumps(state).encode("utf-8"), np.uint8).copy()
    return tensors


def save_safetensors(path: str | os.PathLike, tensors: Mapping[str, Any]) -> None:
    """Writes NF4Weights (as bitsandbytes keys `<name>.weight...`) and plain arrays.

    An NF4Weight under key `<m>.weight` (or `<m>`) is expanded to the keys of
    module `<m>`. The file is written to a temporary name and renamed, so a
    failure never leaves a partial checkpoint.
    """
    from safetensors.numpy import save_file

    flat: dict[str, np.ndarray] = {}
    for key, value in tensors.items():
        if isinstance(value, NF4Weight):
            flat.update(to_bnb_tensors(key.removesuffix(".weight"), value))
        else:
            flat[key] = np.ascontiguousarray(np.asarray(value))
    write_atomic(path, lambda tmp: save_file(flat, tmp, metadata={"format": "pt"}))


def load_safetensors(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a safetensors file: NF4 modules as NF4Weight under `<m>.weight`."""
    from safetensors import safe_open

    source = f"{os.fspath(path)}: "
    result: dict[str, Any] = {}
    with safe_open(os.fspath(path), framework="numpy") as f:
        view = SafetensorsView(f)
        owned = set()
        for prefix in quantized_prefixes(view):
            result[f"{prefix}.weight"] = read_nf4(prefix, view, source=source)
            owned.update(k for k in view if k == f"{prefix}.weight" or k.startswith(f"{prefix}.weight."))
        for key in view:
            if key not in owned:
                result[key] = view[key]
    return result
