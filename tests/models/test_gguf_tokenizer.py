"""The GGUF tokenizer, rebuilt without torch, equals transformers' own."""

from __future__ import annotations

import subprocess
import sys

import pytest

from qst_jax.data.offline import MissingPackageError


@pytest.fixture(scope="module")
def gguf_path():
    from qst_jax.data.offline import smollm2_gguf

    try:
        return smollm2_gguf()
    except MissingPackageError as err:
        pytest.skip(str(err))


TEXTS = [
    "The capital of France is",
    "  leading spaces\n\ttabs 123 émigré 🤖",
    "<|im_start|>user\nhi<|im_end|>",
    "Fair is foul, and foul is fair:\nHover through the fog and filthy air.",
]


def test_matches_transformers(gguf_path):
    pytest.importorskip("torch")  # transformers' GGUF reader needs it
    import os

    from transformers import AutoTokenizer

    from qst_jax.models import load_tokenizer

    ours = load_tokenizer(gguf_path)
    theirs = AutoTokenizer.from_pretrained(os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path))
    for text in TEXTS:
        assert ours(text).input_ids == theirs(text).input_ids, text
    messages = [{"role": "user", "content": "hi"}]
    assert ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == theirs.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert (ours.eos_token_id, ours.pad_token_id, ours.bos_token_id) == (2, 2, 1)


def test_works_without_torch(gguf_path):
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from qst_jax.models import load_tokenizer\n"
        f"tok = load_tokenizer({gguf_path!r})\n"
        "assert tok('The capital of France is').input_ids == [504, 3575, 282, 4649, 314]\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]
