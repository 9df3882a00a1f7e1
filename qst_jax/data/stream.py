"""LM training batches from a data set read one record at a time (`data.streaming=true`), never held in memory.

    batcher = StreamBatcher(open_records, tokenizer, seq_len=128, batch_size=4, micro_batches=1)
    for batch in batcher: ...            # endless, epoch after epoch
    state = batcher.state()              # {"epoch", "records", "carry", "started"}: resume at the same example

Documents are tokenized as they arrive and packed exactly as `lm_windows`
packs a loaded data set (an EOS after each document; a document's first
token is not predicted from the one before), so without shuffling the
batches equal `Batcher(lm_windows(...), shuffle=False)`'s. The position is
the number of records read and the tokens already read but not yet batched:
restoring it reads on from the same record with the same tokens waiting.
`open_records(epoch, skip)` gives the records of an epoch from the `skip`-th
on (`datasets`' streaming `IterableDataset`, shuffled per epoch with a
buffer, `.skip`ped).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from qst_jax.data.examples import _eos
from qst_jax.data.sources import DataError


class StreamBatcher:
    """Yields `[micro_batches, batch_size, seq_len]` LM batches packed from streamed records.

    Args:
      open_records: `(epoch, skip) -> records` (dicts) of that epoch from record `skip` on.
      tokenizer: the model's tokenizer (its EOS separates documents).
      seq_len: tokens per window.
      text_column: the records' text field.
      where: the config key the data came from (error messages).
      description: how the trainer names the data in its log.
    """

    def __init__(self, open_records: Callable[[int, int], Iterable[dict[str, Any]]], tokenizer: Any, seq_len: int,
                 batch_size: int, micro_batches: int = 1, *, text_column: str = "text", where: str = "data.train",
                 description: str = "a streamed data set"):
        self.open_records, self.tokenizer, self.seq_len = open_records, tokenizer, seq_len
        self.batch_size, self.micro_batches = batch_size, micro_batches
        self.text_column, self.where, self.description = text_column, where, description
        self.eos = _eos(tokenizer)
        self.epoch, self.records, self.started = 0, 0, False
        self.carry: list[tuple[int, int]] = []  # (token, target) read but not yet batched

    def describe(self) -> str:
        return self.description

    def _batch(self, pairs: list[tuple[int, int]]) -> dict[str, np.ndarray]:
        shape = (self.micro_batches, self.batch_size, self.seq_len)
        ids = np.asarray([t for t, _ in pairs], np.int32).reshape(shape)
        return {"input_ids": ids, "attention_mask": np.ones(shape, np.int32),
                "loss_mask": np.asarray([m for _, m in pairs], np.int32).reshape(shape)}

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        """Endless: epoch after epoch, from the current position."""
        need = self.batch_size * self.micro_batches * self.seq_len
        while True:
            yielded = False
            for record in self.open_records(self.epoch, self.records):
                if self.text_column not in record:
                    raise DataError(f"{self.where}: records have no column {self.text_column!r}; they have "
                                    f"{sorted(record)}")
                self.records += 1
                text = record[self.text_column]
                if not text:
                    continue
                ids = list(self.tokenizer(text, add_special_tokens=False).input_ids) + [self.eos]
                self.carry += [(ids[0], 0 if self.started else 1)] + [(t, 1) for t in ids[1:]]
                self.started = True
                while len(self.carry) >= need:
                    taken, self.carry = self.carry[:need], self.carry[need:]
                    yielded = True
                    yield self._batch(taken)
            if not yielded and self.records == 0:
                raise DataError(f"{self.where}: the stream gave no records")
            self.epoch, self.records = self.epoch + 1, 0

    def state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "records": self.records, "started": self.started,
                "carry": [list(p) for p in self.carry]}

    def restore(self, state: dict[str, Any]) -> None:
        self.epoch, self.records = int(state["epoch"]), int(state["records"])
        self.started = bool(state["started"])
        self.carry = [(int(t), int(m)) for t, m in state["carry"]]
