"""Turning records into token examples for each task.

* Causal LM on raw text: documents tokenized, joined with EOS and packed into
  windows of exactly `seq_len` tokens. Attention may cross a document
  boundary, but the loss never does: the first token of a document is not a
  target (its context is another document).
* Instruction/chat: records rendered with the tokenizer's chat template; only
  the assistant's tokens are targets.
* Classification: text or text pair and a label (class id, or a float for a
  single regression output).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from qst_jax.data.sources import DataError, record_location, require_columns

CHAT_ROLES = ("system", "user", "assistant", "tool")


@dataclasses.dataclass
class Examples:
    """Variable-length token examples.

    Attributes:
      tokens: one int32 `[len]` array per example.
      loss_masks: per example, 1 where the token is a target (LM tasks).
      labels: `[N]` int class ids or float regression targets (classification).
    """

    tokens: list[np.ndarray]
    loss_masks: list[np.ndarray] | None = None
    labels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.tokens)


def pad_id(tokenizer: Any) -> int:
    """The id that fills padding slots: the tokenizer's pad token, else its EOS, else 0.

    Padding is always masked out, so the choice changes no result.
    """
    for token in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token is not None:
            return int(token)
    return 0


def _eos(tokenizer: Any) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token, needed to separate packed documents")
    return int(eos)


def lm_windows(ds, tokenizer: Any, seq_len: int, text_column: str = "text", where: str = "data") -> Examples:
    """Packs every document of `ds` into `[seq_len]` windows (the tail is dropped)."""
    require_columns(ds, [text_column], where)
    eos = _eos(tokenizer)
    ids: list[int] = []
    starts: list[int] = []
    for text in ds[text_column]:
        if not text:
            continue
        starts.append(len(ids))
        ids.extend(tokenizer(text, add_special_tokens=False).input_ids)
        ids.append(eos)
    if len(ids) < seq_len:
        raise DataError(f"{where}: {len(ids)} tokens in all, fewer than one window of {seq_len}")
    stream = np.asarray(ids, np.int32)
    targets = np.ones(len(stream), np.int32)
    targets[np.asarray(starts[1:], np.int64)] = 0  # a document's first token is predicted from another document
    count = len(stream) // seq_len
    windows = stream[: count * seq_len].reshape(count, seq_len)
    masks = targets[: count * seq_len].reshape(count, seq_len)
    return Examples(tokens=list(windows), loss_masks=list(masks))


def _messages(record: dict[str, Any], where: str) -> list[dict[str, Any]]:
    # datasets unifies columns across rows: a field absent from this record reads as None. A layout is
    # chosen by its leading field; a None answer is kept as None content (counted as unusable, not fatal).
    if record.get("messages") is not None:
        messages = record["messages"]
    elif record.get("instruction") is not None and "output" in record:
        prompt = record["instruction"]
        if record.get("input"):
            prompt = f"{prompt}\n\n{record['input']}"
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]
    elif record.get("prompt") is not None and ("response" in record or "completion" in record):
        answer = record.get("response") if record.get("response") is not None else record.get("completion")
        messages = [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": answer}]
    else:
        present = sorted(k for k, v in record.items() if v is not None)
        raise DataError(
            f"{where}: a chat record needs 'messages', or 'instruction' and 'output', or 'prompt' and "
            f"'response'; it has {present}"
        )
    for m in messages:
        if m.get("role") not in CHAT_ROLES:
            raise DataError(f"{where}: unknown chat role {m.get('role')!r} (known: {CHAT_ROLES})")
    return messages


def chat_example(tokenizer: Any, messages: Sequence[dict[str, str]], max_len: int, where: str = "data"):
    """Token ids and loss mask of one conversation (targets: assistant turns)."""
    full = tokenizer.apply_chat_template(list(messages), tokenize=False)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], np.int32)
    starts = np.asarray([s for s, _ in enc["offset_mapping"]], np.int64)
    mask = np.zeros(len(ids), np.int32)
    for j, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = tokenizer.apply_chat_template(list(messages[:j]), tokenize=False, add_generation_prompt=True)
        through = tokenizer.apply_chat_template(list(messages[: j + 1]), tokenize=False)
        if not (full.startswith(prefix) and full.startswith(through)):
            raise DataError(f"{where}: the chat template does not render conversations prefix by prefix")
        mask[(starts >= len(prefix)) & (starts < len(through))] = 1
    return ids[:max_len], mask[:max_len]


def chat_examples(ds, tokenizer: Any, max_len: int, where: str = "data", log: Any = print) -> Examples:
    """Token ids and loss masks of every usable conversation of `ds`.

    A record is skipped, counted and reported when it has no assistant turn,
    a turn whose content is missing or null, or no response token within
    `max_len`: an error when none is usable, a printed warning otherwise.
    """
    tokens, masks = [], []
    skipped: dict[str, list[int]] = {}
    for row, record in enumerate(ds):
        messages = _messages(record, record_location(ds, row, where))
        if any(not isinstance(m.get("content"), str) for m in messages):
            reason = "a turn with missing or null content"
        elif not any(m.get("role") == "assistant" for m in messages):
            reason = "no assistant turn"
        else:
            ids, mask = chat_example(tokenizer, messages, max_len, record_location(ds, row, where))
            if mask.sum() > 0:
                tokens.append(ids)
                masks.append(mask)
                continue
            reason = f"no response token within data.seq_len={max_len}"
        skipped.setdefault(reason, []).append(row)
    if skipped:
        parts = [f"{len(rows)} with {reason} ({', '.join(record_location(ds, r, where) for r in rows[:3])}"
                 f"{', ...' if len(rows) > 3 else ''})" for reason, rows in skipped.items()]
        message = f"{where}: {sum(map(len, skipped.values()))} of {len(ds)} chat records unusable: " + "; ".join(parts)
        if not tokens:
            raise DataError(message)
        log(f"warning: {message}; training on the other {len(tokens)}")
    return Examples(tokens=tokens, loss_masks=masks)


def _class_id(value: Any) -> int | None:
    """An integer class id from a cell (int, integral float, or digits), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    text = str(value).strip() if value is not None else ""
    return int(text) if text.lstrip("-").isdigit() else None


def classification_examples(
    ds,
    tokenizer: Any,
    max_len: int,
    *,
    num_labels: int,
    text_column: str = "sentence",
    text_pair_column: str | None = None,
    label_column: str = "label",
    label_names: Sequence[str] = (),
    where: str = "data",
) -> Examples:
    """Tokenized texts (pairs) and labels; labels checked against `num_labels`.

    With `label_names` (e.g. MNLI's contradiction, entailment, neutral) the
    label column holds names, mapped to their index in that list.
    """
    require_columns(ds, [text_column, text_pair_column, label_column], where)
    texts = [str(t) for t in ds[text_column]]
    pairs = [str(t) for t in ds[text_pair_column]] if text_pair_column else None
    enc = tokenizer(texts, pairs, truncation=True, max_length=max_len)
    raw = ds[label_column]
    if num_labels == 1:
        try:
            labels = np.asarray([float(x) for x in raw], np.float32)
        except (TypeError, ValueError) as err:
            raise DataError(f"{where}: regression labels in {label_column!r} must be numbers ({err})") from err
        if not np.all(np.isfinite(labels)):
            row = int(np.flatnonzero(~np.isfinite(labels))[0])
            raise DataError(f"{record_location(ds, row, where)}: regression label {raw[row]!r} is not finite")
    elif label_names:
        names = [str(n) for n in label_names]
        unknown = [(i, x) for i, x in enumerate(raw) if str(x).strip() not in names]
        if unknown:
            row, value = unknown[0]
            raise DataError(f"{record_location(ds, row, where)}: label {value!r} is not one of {names} "
                            f"({len(unknown)} such rows)")
        labels = np.asarray([names.index(str(x).strip()) for x in raw], np.int32)
    else:
        ids = [_class_id(x) for x in raw]
        bad = [row for row, i in enumerate(ids) if i is None]
        if bad:
            value = raw[bad[0]]
            what = "an empty label" if value is None or str(value).strip() == "" else f"label {value!r}"
            raise DataError(
                f"{record_location(ds, bad[0], where)}: {what} in {label_column!r}; class labels must be integer "
                f"ids in [0, {num_labels}) or names listed in data.label_names ({len(bad)} such rows)"
            )
        labels = np.asarray(ids, np.int32)
        out = np.flatnonzero((labels < 0) | (labels >= num_labels))
        if out.size:
            raise DataError(
                f"{record_location(ds, int(out[0]), where)}: label {labels[out[0]]} is out of range for "
                f"{num_labels} classes ({out.size} such rows)"
            )
    tokens = [np.asarray(x, np.int32) for x in enc["input_ids"]]
    if any(len(t) == 0 for t in tokens):
        raise DataError(f"{where}: an example tokenizes to nothing")
    return Examples(tokens=tokens, labels=labels)
