"""Small builders shared by tests."""

from __future__ import annotations

import numpy as np
import optax


def adamw(lr: float) -> optax.GradientTransformation:
    return optax.adamw(lr, weight_decay=0.0)


def lm_batch(micro: int = 1, batch: int = 2, length: int = 16, vocab: int = 1024, seed: int = 0) -> dict:
    """A random LM batch `[micro, batch, length]` with the last row right-padded."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, (micro, batch, length)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[:, -1, length - 5 :] = 0
    return {"input_ids": ids, "attention_mask": mask, "loss_mask": mask.copy()}
