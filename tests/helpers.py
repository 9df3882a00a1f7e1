"""Small builders shared by tests."""

from __future__ import annotations

import importlib.util
import pathlib
import types

import numpy as np
import optax

REPO = pathlib.Path(__file__).parents[1]


def script(name: str) -> types.ModuleType:
    """`scripts/<name>.py` loaded as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class IdTokenizer:
    """A tokenizer of ids only: text is the ids joined by spaces (so stop strings can be tested); no EOS."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(map(str, ids))


def adamw(lr: float) -> optax.GradientTransformation:
    return optax.adamw(lr, weight_decay=0.0)


def lm_batch(micro: int = 1, batch: int = 2, length: int = 16, vocab: int = 1024, seed: int = 0) -> dict:
    """A random LM batch `[micro, batch, length]` with the last row right-padded."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, (micro, batch, length)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[:, -1, length - 5 :] = 0
    return {"input_ids": ids, "attention_mask": mask, "loss_mask": mask.copy()}


CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TEXT = (
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer "
    "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles. "
)


def save_tiny_tokenizer(directory, vocab_size: int = 400):
    """A byte-level BPE tokenizer (vocab < 1024, the tiny fixtures' size) with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TEXT * 4], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    fast.save_pretrained(str(directory))
    return fast


def tiny_model_dir(testdata, tmp_path, name: str = "tiny-llama-nf4"):
    """A copy of a tiny fixture model with a tokenizer saved beside it."""
    import shutil

    dst = tmp_path / name
    shutil.copytree(testdata / name, dst)
    for p in dst.iterdir():
        p.chmod(0o644)
    save_tiny_tokenizer(dst)
    return dst


def tiny_config(model_dir, tmp_path, **overrides):
    """A base config for a fast run of the tiny model on a few lines of text."""
    from qst_jax.train.config import base_config

    train, held = tmp_path / "train.txt", tmp_path / "eval.txt"
    train.write_text(TEXT * 30)
    held.write_text(TEXT[::-1] * 6 + TEXT * 6)
    c = base_config()
    c.model.path = str(model_dir)
    c.data.train = str(train)
    c.data.eval = str(held)
    c.data.seq_len = 32
    c.data.eval_examples = 8
    c.side.reduction_factor = 8
    c.train.steps = 6
    c.train.batch_size = 2
    c.train.eval_every = 0
    c.train.eval_batch_size = 4
    c.train.checkpoint_every = 3
    c.train.log_every = 1
    c.train.output_dir = str(tmp_path / "run")
    c.optim.lr = 3e-3
    c.optim.warmup_ratio = 0.0
    for key, value in overrides.items():
        section, name = key.split(".")
        c[section][name] = value
    return c
