"""Where weights come from: HF safetensors directories and GGUF files.

Each source is a read-only Mapping from HF tensor names to numpy arrays, read
lazily one tensor at a time, that can say which file a key lives in (for error
messages). The GGUF source renames llama.cpp's tensors to HF names, converts
them to float32 and undoes the converter's q/k row permutation.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

import ml_dtypes  # noqa: F401  (bf16 for safetensors' numpy reader)
import numpy as np

from qst_jax.errors import QSTError
from qst_jax.quant.bnb_io import SafetensorsView


class CheckpointError(QSTError, ValueError):
    """A checkpoint that is missing, incomplete or inconsistent with its config."""


def read_json(path: str) -> Any:
    """A JSON file's content; a file that does not parse is a CheckpointError naming file and line."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        where = f"{path}:{err.lineno}" if isinstance(err, json.JSONDecodeError) else path
        raise CheckpointError(f"{where}: not valid JSON ({getattr(err, 'msg', err)})") from None


class SafetensorsSource(Mapping):
    """All tensors of an HF directory (`model.safetensors` or a sharded index)."""

    def __init__(self, directory: str):
        self.directory = directory
        index = os.path.join(directory, "model.safetensors.index.json")
        single = os.path.join(directory, "model.safetensors")
        if os.path.isfile(index):
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: no 'weight_map' object")
            files = sorted(set(weight_map.values()))
        elif os.path.isfile(single):
            files = ["model.safetensors"]
        else:
            found = sorted(n for n in os.listdir(directory) if n.endswith(".safetensors"))
            if not found:
                raise CheckpointError(
                    f"{directory}: no model.safetensors or model.safetensors.index.json "
                    "(PyTorch .bin checkpoints are not read; convert them to safetensors)"
                )
            files = found
        from safetensors import safe_open

        self._views: dict[str, SafetensorsView] = {}
        self._file_of: dict[str, str] = {}
        self._handles = []
        for name in files:
            path = os.path.join(directory, name)
            if not os.path.isfile(path):
                raise CheckpointError(f"{path}: listed in the index but missing")
            try:
                handle = safe_open(path, framework="numpy")
            except Exception as err:  # noqa: BLE001 - SafetensorError, OSError: a truncated or corrupt file
                raise CheckpointError(f"{path}: cannot read as safetensors ({err}); the file is truncated or "
                                      "corrupt") from None
            self._handles.append(handle)
            view = SafetensorsView(handle)
            self._views[name] = view
            for key in view:
                self._file_of[key] = name

    def file_of(self, key: str) -> str:
        return os.path.join(self.directory, self._file_of.get(key, "model.safetensors"))

    def __getitem__(self, key: str) -> np.ndarray:
        name = self._file_of.get(key)
        if name is None:
            raise KeyError(key)
        try:
            return self._views[name][key]
        except Exception as err:  # noqa: BLE001 - the header was read, the data is damaged
            raise CheckpointError(f"{self.file_of(key)}: cannot read tensor {key} ({err})") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._file_of)

    def __len__(self) -> int:
        return len(self._file_of)


_GGUF_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def gguf_field(reader: Any, key: str, default: Any = None) -> Any:
    """A GGUF metadata value, or `default` when the key is absent."""
    field = reader.fields.get(key)
    return default if field is None else field.contents()



def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undoes llama.cpp's interleaved RoPE row order of a q or k projection."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


class GGUFSource(Mapping):
    """A llama-architecture GGUF file, as HF-named float32 tensors.

    Attributes:
      hf_config: a HF-style `config.json` dict built from the GGUF metadata.
    """

    def __init__(self, path: str):
        from gguf import GGUFReader

        self.path = path
        try:
            self._reader = GGUFReader(path)
        except Exception as err:  # noqa: BLE001 - gguf raises ValueError, KeyError, ... on a damaged file
            raise CheckpointError(f"{path}: cannot read as GGUF ({err}); the file is truncated or corrupt") from None
        arch = gguf_field(self._reader, "general.architecture")
        if arch != "llama":
            raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not supported (only 'llama')")
        self._tensors = {}
        for tensor in self._reader.tensors:
            hf_name = self._hf_name(tensor.name)
            if hf_name is not None:
                self._tensors[hf_name] = tensor
        self.hf_config = self._config()

    @staticmethod
    def _hf_name(name: str) -> str | None:
        if name in _GGUF_GLOBAL_NAMES:
            return _GGUF_GLOBAL_NAMES[name]
        parts = name.split(".")
        if parts[0] == "blk" and len(parts) == 4 and parts[2] in _GGUF_LAYER_NAMES:
            return f"model.layers.{parts[1]}.{_GGUF_LAYER_NAMES[parts[2]]}.{parts[3]}"
        return None

    def _config(self) -> dict[str, Any]:
        r = self._reader
        heads = int(gguf_field(r, "llama.attention.head_count"))
        hidden = int(gguf_field(r, "llama.embedding_length"))
        vocab = gguf_field(r, "llama.vocab_size")
        if vocab is None:
            vocab = len(r.fields["tokenizer.ggml.tokens"].data)
        rope_dim = gguf_field(r, "llama.rope.dimension_count")
        scaling_type = gguf_field(r, "llama.rope.scaling.type")
        theta = float(gguf_field(r, "llama.rope.freq_base", 10000.0))
        rope: dict[str, Any] = {"rope_theta": theta, "rope_type": "default"}
        if scaling_type == "linear":
            rope.update(rope_type="linear", factor=float(gguf_field(r, "llama.rope.scaling.factor")))
        elif scaling_type not in (None, "none"):
            raise CheckpointError(f"{self.path}: GGUF RoPE scaling {scaling_type!r} is not supported")
        return {
            "model_type": "llama",
            "vocab_size": int(vocab),
            "hidden_size": hidden,
            "intermediate_size": int(gguf_field(r, "llama.feed_forward_length")),
            "num_hidden_layers": int(gguf_field(r, "llama.block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(gguf_field(r, "llama.attention.head_count_kv", heads)),
            "head_dim": int(rope_dim) if rope_dim else hidden // heads,
            "rms_norm_eps": float(gguf_field(r, "llama.attention.layer_norm_rms_epsilon", 1e-6)),
            "rope_parameters": rope,
            "max_position_embeddings": int(gguf_field(r, "llama.context_length", 2048)),
            "tie_word_embeddings": "lm_head.weight" not in self._tensors,
            "bos_token_id": gguf_field(r, "tokenizer.ggml.bos_token_id"),
            "eos_token_id": gguf_field(r, "tokenizer.ggml.eos_token_id"),
            "pad_token_id": gguf_field(r, "tokenizer.ggml.padding_token_id"),
        }

    def file_of(self, key: str) -> str:
        return self.path

    def __getitem__(self, key: str) -> np.ndarray:
        from gguf.quants import dequantize

        tensor = self._tensors[key]
        w = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        if key.endswith("self_attn.q_proj.weight"):
            w = unpermute_qk(w, self.hf_config["num_attention_heads"])
        elif key.endswith("self_attn.k_proj.weight"):
            w = unpermute_qk(w, self.hf_config["num_key_value_heads"])
        return w

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)
