"""Static-shape batches with an exactly resumable position.

Examples are grouped into length buckets (each example goes to the smallest
bucket that holds it, then is right-padded to it), so every step has one of a
few static shapes and little padding. Each epoch's batch order is a pure
function of `(seed, epoch)`; the iterator's position is `(epoch, index)`, so
restoring it resumes the exact batch sequence.

A batch is a dict of numpy arrays with a leading micro-batch axis:
`input_ids`, `attention_mask` `[A, B, T]` and either `loss_mask` `[A, B, T]`
or `labels`, `example_mask` `[A, B]`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np

from qst_jax.errors import InputError
from qst_jax.data.examples import Examples


def bucket_lengths(max_len: int, smallest: int = 32) -> list[int]:
    """Powers of two from `smallest` below `max_len`, and `max_len` itself."""
    lengths, n = [], smallest
    while n < max_len:
        lengths.append(n)
        n *= 2
    return lengths + [max_len]


@dataclasses.dataclass
class Position:
    epoch: int = 0
    index: int = 0


class Batcher:
    """Yields batches of `micro_batches x batch_size` examples.

    Args:
      examples: the token examples.
      batch_size: examples per micro-batch (B).
      micro_batches: micro-batches per step (A, gradient accumulation).
      buckets: padded lengths; default one bucket at the longest example.
      pad_id: token id used for padding (masked everywhere).
      seed: shuffling seed; `shuffle=False` keeps file order.
      drop_remainder: drop each bucket's last partial batch (training) or pad
        it with masked rows (evaluation: every example counts once).
    """

    def __init__(
        self,
        examples: Examples,
        batch_size: int,
        micro_batches: int = 1,
        *,
        buckets: Sequence[int] | None = None,
        pad_id: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        drop_remainder: bool = True,
    ):
        self.examples = examples
        self.per_step = batch_size * micro_batches
        self.batch_size, self.micro_batches = batch_size, micro_batches
        longest = max(len(t) for t in examples.tokens)
        self.buckets = sorted(buckets) if buckets else [longest]
        if longest > self.buckets[-1]:
            raise InputError(f"an example of {longest} tokens exceeds the largest bucket {self.buckets[-1]}")
        self.pad_id, self.seed, self.shuffle, self.drop_remainder = pad_id, seed, shuffle, drop_remainder
        lengths = np.asarray([len(t) for t in examples.tokens])
        self._bucket_of = np.searchsorted(np.asarray(self.buckets), lengths, side="left")
        self.position = Position()
        if self.steps_per_epoch == 0:
            raise InputError(
                f"{len(examples)} examples make no full batch of {self.per_step}; lower the batch size"
            )

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """The member indices of every batch of `epoch`, in order (a pure function of seed and epoch)."""
        rng = np.random.default_rng([self.seed, epoch])
        batches = []
        for b in range(len(self.buckets)):
            members = np.flatnonzero(self._bucket_of == b)
            if self.shuffle:
                members = rng.permutation(members)
            full = len(members) // self.per_step * self.per_step
            for start in range(0, full, self.per_step):
                batches.append(members[start : start + self.per_step])
            if not self.drop_remainder and full < len(members):
                batches.append(members[full:])
        if self.shuffle:
            order = rng.permutation(len(batches))
            batches = [batches[i] for i in order]
        return batches

    def describe(self) -> str:
        return f"{len(self.examples)} train examples"

    @property
    def steps_per_epoch(self) -> int:
        return len(self.epoch_batches(0))

    def make_batch(self, members: np.ndarray) -> dict[str, np.ndarray]:
        t = self.buckets[int(self._bucket_of[members].max())]
        n = self.per_step
        ids = np.full((n, t), self.pad_id, np.int32)
        mask = np.zeros((n, t), np.int32)
        loss = np.zeros((n, t), np.int32)
        for row, i in enumerate(members):
            tokens = self.examples.tokens[i]
            ids[row, : len(tokens)] = tokens
            mask[row, : len(tokens)] = 1
            if self.examples.loss_masks is not None:
                loss[row, : len(tokens)] = self.examples.loss_masks[i]
        shape = (self.micro_batches, self.batch_size)
        batch = {"input_ids": ids.reshape(*shape, t), "attention_mask": mask.reshape(*shape, t)}
        if self.examples.labels is not None:
            labels = np.zeros(n, self.examples.labels.dtype)
            labels[: len(members)] = self.examples.labels[members]
            present = np.zeros(n, np.float32)
            present[: len(members)] = 1
            batch["labels"] = labels.reshape(shape)
            batch["example_mask"] = present.reshape(shape)
        else:
            batch["loss_mask"] = loss.reshape(*shape, t)
        return batch

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        """Endless: epoch after epoch, from the current position."""
        while True:
            batches = self.epoch_batches(self.position.epoch)
            while self.position.index < len(batches):
                members = batches[self.position.index]
                self.position.index += 1
                yield self.make_batch(members)
            self.position = Position(self.position.epoch + 1, 0)

    def one_pass(self) -> Iterator[dict[str, np.ndarray]]:
        """Every batch of epoch 0 once, without moving the position."""
        for members in self.epoch_batches(0):
            yield self.make_batch(members)

    def state(self) -> dict[str, int]:
        return {"epoch": self.position.epoch, "index": self.position.index}

    def restore(self, state: dict[str, int]) -> None:
        self.position = Position(int(state["epoch"]), int(state["index"]))
