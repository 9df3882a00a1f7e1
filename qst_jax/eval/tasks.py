"""Evaluations behind `qst-eval` (and the periodic evaluation in `qst-train`).

Every function works through the method interface (`qst_jax.methods.Method`:
QST, QLoRA, or the frozen backbone for the base model): an eval step built by
`make_eval_step(model)`, or a logits function over `model.logits`.
"""

from __future__ import annotations

import csv
import glob
import os
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qst_jax.data.batches import Batcher, bucket_lengths
from qst_jax.data.examples import Examples, pad_id
from qst_jax.data.sources import DataError
from qst_jax.eval.glue import GlueTask, read_glue, score


def make_eval_step(model: Any, compiler_options: dict[str, Any] | None = None) -> Callable:
    """A jitted `(params, backbone_params, batch) -> (loss sum, weight, aux)` for one micro-batch.

    `compiler_options`: XLA options for its compile (`models.loops.streaming_options`).
    """

    def evaluate(params: Any, backbone_params: Any, batch: dict[str, jax.Array]):
        total, (weight, aux) = model.loss(params, backbone_params, batch)
        return total, weight, aux

    return jax.jit(evaluate, compiler_options=compiler_options)


def make_sides_eval_step(sides: Any, include_base: bool = False,
                         compiler_options: dict[str, Any] | None = None) -> Callable:
    """`make_eval_step` for a `SideSet`: loss sums `[K]` (`[K + 1]`, the frozen backbone's first, with
    `include_base`), the shared weight, and `correct` `[K]`: one backbone pass per batch."""

    def evaluate(params: Any, backbone_params: Any, batch: dict[str, jax.Array]):
        return sides.losses(params, backbone_params, batch, include_base=include_base)

    return jax.jit(evaluate, compiler_options=compiler_options)


def evaluate_batches(eval_step: Callable, params: Any, backbone_params: Any, batches: Iterable[dict]) -> dict:
    """Summed loss, weight and aux over batches (their micro-batch 0); loss and correct are `[K]` for a SideSet."""
    total = correct = np.zeros((), np.float64)
    weight = 0.0
    for batch in batches:
        micro = jax.tree.map(lambda x: jnp.asarray(x[0]), batch)
        loss_sum, w, aux = eval_step(params, backbone_params, micro)
        total, weight = total + np.asarray(loss_sum, np.float64), weight + float(w)
        correct = correct + np.asarray(aux.get("correct", 0.0), np.float64)
    plain = lambda x: float(x) if np.ndim(x) == 0 else x  # noqa: E731
    return {"loss_sum": plain(total), "weight": weight, "correct": plain(correct)}


def split_members(result: dict[str, Any], names: list[str]) -> dict[str, dict[str, Any]]:
    """A result whose values are `[K]` arrays (a SideSet's) as one row of scalars per name (member order)."""
    return {n: {k: (float(np.ravel(v)[i]) if np.ndim(v) else v) for k, v in result.items()}
            for i, n in enumerate(names)}


def lm_result(sums: dict) -> dict[str, Any]:
    """Loss, perplexity and tokens from `evaluate_batches`' sums (arrays `[K]` for a SideSet)."""
    loss = np.asarray(sums["loss_sum"], np.float64) / max(sums["weight"], 1.0)
    plain = float if np.ndim(loss) == 0 else np.asarray
    return {"loss": plain(loss), "perplexity": plain(np.exp(np.minimum(loss, 50.0))), "tokens": sums["weight"]}


def perplexity(eval_step: Callable, params: Any, backbone_params: Any, examples: Examples, *, batch_size: int = 8,
               pad_token: int = 0) -> dict[str, float]:
    """Held-out loss and perplexity over packed LM windows (as `qst-train` computes them)."""
    batcher = Batcher(examples, batch_size, buckets=[len(examples.tokens[0])], pad_id=pad_token, shuffle=False,
                      drop_remainder=False)
    return lm_result(evaluate_batches(eval_step, params, backbone_params, batcher.one_pass()))


def classify(logits_fn: Callable, tokenizer: Any, task: GlueTask, path: str, *, seq_len: int = 128,
             batch_size: int = 16, members: bool = False) -> dict[str, Any] | list[dict[str, Any]]:
    """GLUE-style classification: predictions of `logits_fn(ids, mask) -> [B, C]` scored by the task's metrics.

    With `members`, `logits_fn` gives `[K, B, C]` (a SideSet) and a result per member comes back.
    """
    texts, pairs, gold = read_glue(path, task)
    enc = tokenizer(texts, pairs, truncation=True, max_length=seq_len)
    examples = Examples(tokens=[np.asarray(t, np.int32) for t in enc["input_ids"]], labels=gold)
    batcher = Batcher(examples, batch_size, buckets=bucket_lengths(seq_len), pad_id=pad_id(tokenizer), shuffle=False,
                      drop_remainder=False)
    predictions = None
    for rows in batcher.epoch_batches(0):
        batch = batcher.make_batch(rows)
        logits = np.asarray(logits_fn(jnp.asarray(batch["input_ids"][0]), jnp.asarray(batch["attention_mask"][0])))
        logits = (logits if members else logits[None])[:, : len(rows)]
        if predictions is None:
            predictions = np.zeros((logits.shape[0], len(examples)), np.float32 if not task.labels else np.int32)
        predictions[:, rows] = logits[..., 0] if not task.labels else np.argmax(logits, -1)
    results = [{"task": task.name, "examples": len(gold), **score(task, p, gold)} for p in predictions]
    return results if members else results[0]


MMLU_LETTERS = ("A", "B", "C", "D")


def _read_mmlu_csv(path: str) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.reader(f) if r]
    for i, r in enumerate(rows):
        if len(r) != 6 or r[5].strip() not in MMLU_LETTERS:
            raise DataError(f"{path}: row {i} is not question, A, B, C, D, answer letter: {r[:2]}...")
    return rows


def _format_question(row: list[str], with_answer: bool) -> str:
    text = row[0] + "".join(f"\n{letter}. {choice}" for letter, choice in zip(MMLU_LETTERS, row[1:5]))
    return text + "\nAnswer:" + (f" {row[5].strip()}\n\n" if with_answer else "")


def mmlu(last_logits_fn: Callable, tokenizer: Any, directory: str, *, shots: int = 5, max_len: int = 2048,
         subjects: Iterable[str] | None = None, batch_size: int = 8,
         members: bool = False) -> dict[str, Any] | list[dict[str, Any]]:
    """k-shot multiple choice in the MMLU layout (`dev/X_dev.csv`, `test/X_test.csv`).

    The answer is the letter whose token (" A" ... " D") the model finds most
    likely after "Answer:". `last_logits_fn(ids, mask) -> [B, V]` scores the
    last position of left-padded prompts; with `members` it gives `[K, B, V]`
    and a result per member comes back.
    """
    test_files = sorted(glob.glob(os.path.join(directory, "test", "*_test.csv")))
    if not test_files:
        raise DataError(f"{directory}: no test/*_test.csv files (the MMLU release layout)")
    letter_ids = []
    for letter in MMLU_LETTERS:
        ids = tokenizer(f" {letter}", add_special_tokens=False).input_ids
        letter_ids.append(ids[-1])
    wanted = set(subjects) if subjects else None
    per_subject: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for test_file in test_files:
        subject = os.path.basename(test_file)[: -len("_test.csv")]
        if wanted is not None and subject not in wanted:
            continue
        dev_file = os.path.join(directory, "dev", f"{subject}_dev.csv")
        dev = _read_mmlu_csv(dev_file)[:shots] if shots and os.path.isfile(dev_file) else []
        header = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
        prompts, gold = [], []
        for row in _read_mmlu_csv(test_file):
            k = len(dev)
            while True:
                text = header + "".join(_format_question(r, True) for r in dev[:k]) + _format_question(row, False)
                ids = tokenizer(text).input_ids
                if len(ids) <= max_len or k == 0:
                    break
                k -= 1
            prompts.append(ids[-max_len:])
            gold.append(MMLU_LETTERS.index(row[5].strip()))
        correct = np.zeros(1, np.int64)
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            length = max(len(p) for p in chunk)
            ids = np.zeros((len(chunk), length), np.int32)
            mask = np.zeros_like(ids)
            for i, p in enumerate(chunk):
                ids[i, length - len(p) :], mask[i, length - len(p) :] = p, 1
            logits = np.asarray(last_logits_fn(jnp.asarray(ids), jnp.asarray(mask)))
            choice = np.argmax((logits if members else logits[None])[..., letter_ids], axis=-1)  # [K, B]
            correct = correct + np.sum(choice == np.asarray(gold[start : start + batch_size])[None], axis=-1)
        per_subject[subject] = correct / len(prompts)
        counts[subject] = len(prompts)
    if not per_subject:
        raise DataError(f"{directory}: none of the subjects {sorted(wanted or [])} found")
    results = [{
        "subjects": {s: float(v[i]) for s, v in per_subject.items()},
        "average": float(np.mean([v[i] for v in per_subject.values()])),
        "questions": int(sum(counts.values())),
        "shots": shots,
    } for i in range(len(next(iter(per_subject.values()))))]
    return results if members else results[0]
