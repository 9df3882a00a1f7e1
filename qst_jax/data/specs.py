"""What a config's data and model strings name: packaged plays, the packaged model, local files, Hub data sets.

    resolve_model_path("smollm2")                  -> the packaged GGUF file
    resolve_data("shakespeare:train", "hamlet")    -> every packaged play but Hamlet
    examples = build_examples(config, tokenizer, config.data.train, "data.train")

Used by `qst-train`, `qst-eval` and `qst-generate` alike; nothing here loads
a model or imports the trainer.
"""

from __future__ import annotations

import os

from typing import Any

from qst_jax.data.examples import Examples, chat_examples, classification_examples, lm_windows
from qst_jax.data.hub_sets import class_names, is_hub_set, load_hub_records, stream_hub_records
from qst_jax.data.offline import shakespeare_plays, smollm2_gguf
from qst_jax.data.sources import DataError, load_records, require_columns, split_paths, stream_records
from qst_jax.data.stream import StreamBatcher

PACKAGED_MODEL = "smollm2"


def resolve_model_path(path: str) -> str:
    """`path`, or the packaged SmolLM2-135M-Instruct GGUF for "smollm2"."""
    return smollm2_gguf() if path == PACKAGED_MODEL else path


def resolve_data(spec: str, holdout: str) -> list[str]:
    """Files of a comma-separated data spec.

    `shakespeare:train` (every packaged play but the held-out ones),
    `shakespeare:heldout` and `shakespeare:<play>` name the packaged plays;
    anything else is a local file, folder or glob (`\\,` is a comma inside a path).
    (`build_examples` reads a Hub data set, `hf:org/name[:config][@split]`, itself.)
    """
    files: list[str] = []
    parts = split_paths(spec)
    for part in parts:
        if part.startswith("shakespeare:"):
            files += _shakespeare(part.split(":", 1)[1], holdout)
            continue
        if len(parts) > 1 and not any(ch in part for ch in "*?[") and not os.path.exists(os.path.expanduser(part)):
            raise DataError(f"{part}: no such file or directory; the paths were split at commas "
                            "(write \\, for a comma inside a path)")
        files.append(part)
    return files


def _shakespeare(part: str, holdout: str) -> list[str]:
    plays = shakespeare_plays()
    held = [h for h in holdout.split(",") if h]
    unknown = [h for h in held if h not in plays]
    if unknown:
        raise DataError(f"data.holdout: unknown play(s) {unknown}; known: {sorted(plays)}")
    if part == "train":
        return [p for name, p in plays.items() if name not in held]
    if part == "heldout":
        return [plays[h] for h in held]
    if part in plays:
        return [plays[part]]
    raise DataError(f"shakespeare:{part}: expected shakespeare:train, shakespeare:heldout or shakespeare:<play>")


SHUFFLE_BUFFER = 1000  # records a streamed data set is shuffled within


def stream_batcher(config: Any, tokenizer: Any) -> StreamBatcher:
    """`data.train` read as a stream (`data.streaming=true`): LM windows packed as the records arrive.

    Each epoch's record order is the stream's shuffled within `SHUFFLE_BUFFER`
    records by `(train.seed, epoch)`, so a resumed run reads on from the same
    record.
    """
    d, t, spec = config.data, config.train, config.data.train
    stream = stream_hub_records(spec, "data.train") if is_hub_set(spec) else \
        stream_records(resolve_data(spec, d.holdout), format=d.format or None)

    def open_records(epoch: int, skip: int):
        shuffled = stream.shuffle(seed=t.seed, buffer_size=SHUFFLE_BUFFER)
        shuffled.set_epoch(epoch)
        return shuffled.skip(skip)

    return StreamBatcher(open_records, tokenizer, d.seq_len, t.batch_size, t.micro_batches,
                         text_column=d.text_column, where="data.train", description=f"streamed from {spec}")


def chat_columns(ds: Any, d: Any, where: str) -> Any:
    """`ds` with `data.messages_column` / `data.prompt_column` / `data.response_column` renamed to the names the
    chat layouts read (`messages`, `prompt`, `response`); a missing column is named with the ones there are."""
    renames = {d.messages_column: "messages", d.prompt_column: "prompt", d.response_column: "response"}
    renames = {old: new for old, new in renames.items() if old and old != new}
    require_columns(ds, list(renames), where)
    source = getattr(ds, "qst_source", None)
    for old, new in renames.items():
        if new in ds.column_names:
            ds = ds.remove_columns(new)
        ds = ds.rename_column(old, new)
    if source is not None:
        ds.qst_source = source
    return ds


def build_examples(config: Any, tokenizer: Any, spec: str, where: str, limit: int = 0, log: Any = print) -> Examples:
    """Token examples of data spec `spec` for the config's task (`lm`, `chat`, `classification`).

    Args:
      config: has `task` and the `data` section (seq_len, columns, labels, format, holdout).
      where: the config key the spec came from, for error messages.
      limit: keep the first `limit` examples (0: all).
      log: where warnings go (unusable chat records).
    """
    d = config.data
    if is_hub_set(spec):
        ds = load_hub_records(spec, where)
        names = class_names(ds, d.label_column) if config.task == "classification" else None
        if names is not None and len(names) != d.num_labels:
            raise DataError(f"{where}: {spec}: column {d.label_column!r} has {len(names)} classes ({', '.join(names)}); "
                            f"set data.num_labels={len(names)}")
    else:
        ds = load_records(resolve_data(spec, config.data.holdout), format=config.data.format or None)
    if config.task == "lm":
        examples = lm_windows(ds, tokenizer, d.seq_len, d.text_column, where)
    elif config.task == "chat":
        examples = chat_examples(chat_columns(ds, d, where), tokenizer, d.seq_len, where, log=log)
    else:
        examples = classification_examples(
            ds, tokenizer, d.seq_len, num_labels=d.num_labels, text_column=d.text_column,
            text_pair_column=d.text_pair_column or None, label_column=d.label_column,
            label_names=[n for n in d.label_names.split(",") if n], where=where,
        )
    if limit and len(examples) > limit:
        keep = slice(0, limit)
        examples = Examples(
            tokens=examples.tokens[keep],
            loss_masks=None if examples.loss_masks is None else examples.loss_masks[keep],
            labels=None if examples.labels is None else examples.labels[keep],
        )
    return examples
