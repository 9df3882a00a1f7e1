"""Small builders shared by tests."""

from __future__ import annotations

import importlib.util
import pathlib
import types

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax

from qst_jax.data.examples import pad_id
from qst_jax.methods.base import TaskHeads
from qst_jax.methods.side_set import SideSet
from qst_jax.models.config import ModelConfig
from qst_jax.models.layers import Params, positions_from_mask

REPO = pathlib.Path(__file__).parents[1]


def script(name: str, folder: str = "scripts") -> types.ModuleType:
    """`scripts/<name>.py` (a user tool) loaded as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def study(name: str) -> types.ModuleType:
    """`benchmarks/studies/<name>.py` (a one-off study behind a doc's figures) loaded as a module."""
    return script(name, "benchmarks/studies")


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


# -- the uncached oracle cached decoding is checked against ---------------------------------------------
@dataclasses.dataclass(frozen=True)
class RoutedSides(TaskHeads):
    """A `Method` whose rows each go through one member of `sides` (route -1: the base model).

    Params: `{"sides": the set's params, "route": int32 [B]}`. Every member
    runs on every row (side networks are small); the backbone runs once.
    """

    name: ClassVar[str] = "routed"
    sides: SideSet

    @property
    def cfg(self) -> ModelConfig:
        return self.sides.cfg

    @property
    def task(self) -> str:
        return self.sides.task

    @property
    def num_labels(self) -> int:
        return self.sides.num_labels

    @property
    def pool(self) -> str:
        return self.sides.pool

    @property
    def ce_chunk(self) -> int:
        return self.sides.ce_chunk

    def hidden(self, params: Params, backbone_params: Params, ids: jax.Array, mask: jax.Array, *,
               positions: jax.Array | None = None, key_mask: jax.Array | None = None,
               caches: Params | None = None, cache_index: jax.Array | None = None):
        base, outs, caches = self.sides.outputs(params["sides"], backbone_params, ids, mask, positions=positions,
                                                key_mask=key_mask, caches=caches, cache_index=cache_index)
        states = jnp.concatenate([base[None], self.sides.in_member_order(outs)])  # [K + 1, B, T, d]
        rows = jnp.arange(ids.shape[0])
        return states[params["route"] + 1, rows], caches

    def init_caches(self, batch: int, length: int) -> Params:
        return self.sides.init_caches(batch, length)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.name, "members": [m.to_dict() for m in self.sides.members]}


def left_pad(rows: list[list[int]], pad: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded ids and mask `[B, P]` of token-id rows."""
    length = max(len(r) for r in rows)
    ids = np.full((len(rows), length), pad, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        ids[i, length - len(r):] = r
        mask[i, length - len(r):] = 1
    return ids, mask


def uncached_logits(gen: Any, rows: list[list[int]], side: list[str | None] | None = None) -> np.ndarray:
    """Float32 logits `[B, T, V]` of a Generator's model over left-padded `rows`, one full pass, no cache.

    With named side networks (`Generator(sides=...)`), row b goes through
    `side[b]` (None: the base model) by `RoutedSides`: every member runs on
    every row and each row keeps its own member's output.
    """
    if gen.side_names:
        sides = SideSet.of([m for m, _ in gen._sides.values()])
        model = RoutedSides(sides)
        route = [-1 if s is None else gen.side_names.index(s) for s in (side or [None] * len(rows))]
        params = {"sides": sides.stack([p for _, p in gen._sides.values()]), "route": jnp.asarray(route, jnp.int32)}
    else:
        model, params = gen.model, gen.params
    ids, mask = (jnp.asarray(a) for a in left_pad(rows, pad_id(gen.tokenizer)))

    @jax.jit
    def full(params, backbone_params, ids, mask):
        hidden, _ = model.hidden(params, backbone_params, ids, mask, positions=positions_from_mask(mask),
                                 key_mask=mask)
        return model.head(params, backbone_params, hidden, mask)

    return np.asarray(full(params, gen.backbone.params, ids, mask))
