"""The incremental detokenizer: the same text as decoding the whole list, each token decoding a short window."""

from __future__ import annotations

import pytest

from qst_jax.generate.detokenize import TextStream
from tests.helpers import save_tiny_tokenizer

TEXTS = ["To be, or not to be: that is the question.", "Café au lait, naïve façade", "海 and 🙂🙂 then ünïcödé",
         "  two spaces,  then a tab\tand a newline\nend"]


def _metaspace_tokenizer():
    """A LLaMA-style (SentencePiece metaspace) BPE tokenizer: decoding drops the leading space of the first token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "</s>"], show_progress=False)
    tok.train_from_iterator([" ".join(TEXTS) * 4], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")


class _Counting:
    """A tokenizer whose decode calls are counted by the number of ids each one decodes."""

    def __init__(self, tokenizer):
        self.tokenizer, self.sizes = tokenizer, []

    def decode(self, ids, skip_special_tokens=False):
        self.sizes.append(len(ids))
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


@pytest.mark.parametrize("kind", ["byte-level", "metaspace"])
def test_the_stream_is_the_whole_lists_text(kind, tmp_path):
    tokenizer = save_tiny_tokenizer(tmp_path) if kind == "byte-level" else _metaspace_tokenizer()
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        stream = TextStream(tokenizer)
        pieces = [stream.push(t) for t in ids]
        pieces.append(stream.flush())
        whole = tokenizer.decode(ids, skip_special_tokens=True)
        assert "".join(pieces) == stream.text == whole, (kind, text)
        if "\ufffd" not in whole:  # a character split across byte tokens is held back until it is whole
            assert not any("\ufffd" in p for p in pieces), (kind, text, pieces)


def test_each_token_decodes_a_window_not_the_whole_list(tmp_path):
    tokenizer = _Counting(save_tiny_tokenizer(tmp_path))
    ids = tokenizer.tokenizer.encode(" ".join(TEXTS) * 4, add_special_tokens=False)
    stream = TextStream(tokenizer)
    for t in ids:
        stream.push(t)
    assert len(ids) >= 400 and stream.text == tokenizer.tokenizer.decode(ids)
    assert max(tokenizer.sizes) <= 8  # a whole-list decode would reach len(ids)


def test_a_tokenizer_of_ids_only_gives_no_text():
    stream = TextStream(object())
    assert stream.push(5) == "" and stream.flush() == "" and stream.tokens == [5] and stream.text == ""
