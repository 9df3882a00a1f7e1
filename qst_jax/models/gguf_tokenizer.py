"""A HF fast tokenizer rebuilt from a GGUF file's metadata, without torch.

transformers can read a GGUF tokenizer, but its GGUF path needs PyTorch; this
builds the same byte-level BPE tokenizer (`tokenizer.ggml.model == "gpt2"`)
directly with the `tokenizers` library: vocabulary, merges, special tokens,
BOS/EOS/padding ids and the chat template.
"""

from __future__ import annotations

from typing import Any

from qst_jax.errors import QSTError
from qst_jax.models.weight_sources import gguf_field as _field

CONTROL = 3  # llama.cpp token type of control (special) tokens
USER_DEFINED = 4


class GGUFTokenizerError(QSTError, ValueError):
    pass


def tokenizer_from_gguf(path: str) -> Any:
    """A `PreTrainedTokenizerFast` equal to the one transformers builds from `path`."""
    from gguf import GGUFReader
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    reader = GGUFReader(path)
    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFTokenizerError(f"{path}: GGUF tokenizer model {kind!r} is not supported (only byte-level BPE 'gpt2')")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges", [])]
    types = _field(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
    vocab = {token: i for i, token in enumerate(tokens)}
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    special = [tokens[i] for i, t in enumerate(types) if t in (CONTROL, USER_DEFINED)]

    def token(key: str) -> str | None:
        index = _field(reader, key)
        return None if index is None else tokens[int(index)]

    fast = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=token("tokenizer.ggml.bos_token_id"),
        eos_token=token("tokenizer.ggml.eos_token_id"),
        unk_token=token("tokenizer.ggml.unknown_token_id"),
        pad_token=token("tokenizer.ggml.padding_token_id"),
    )
    fast.add_special_tokens({"additional_special_tokens": [t for t in special if t not in fast.all_special_tokens]})
    template = _field(reader, "tokenizer.chat_template")
    if template:
        fast.chat_template = template
    return fast
