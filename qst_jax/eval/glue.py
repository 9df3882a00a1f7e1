"""GLUE tasks as released (TSV layouts, label names, metrics), plus plain files.

Each task names its text column(s), label column and label list (class names
map to ids in that order; STS-B is a regression on `score`), whether the TSV
has a header, and its metrics.
"""

from __future__ import annotations

import csv
import dataclasses
import os

import numpy as np

from qst_jax.data.sources import DataError
from qst_jax.eval import metrics


@dataclasses.dataclass(frozen=True)
class GlueTask:
    name: str
    text: str
    text_pair: str | None
    label: str
    labels: tuple[str, ...]  # empty: regression
    metrics: tuple[str, ...]
    columns: tuple[str, ...] | None = None  # for header-less TSVs (CoLA)

    @property
    def num_labels(self) -> int:
        return len(self.labels) or 1


GLUE_TASKS = {
    "cola": GlueTask("cola", "sentence", None, "label", ("0", "1"), ("matthews", "accuracy"),
                     columns=("source", "label", "original_label", "sentence")),
    "sst2": GlueTask("sst2", "sentence", None, "label", ("0", "1"), ("accuracy",)),
    "mrpc": GlueTask("mrpc", "#1 String", "#2 String", "Quality", ("0", "1"), ("accuracy", "f1")),
    "stsb": GlueTask("stsb", "sentence1", "sentence2", "score", (), ("pearson", "spearman")),
    "qqp": GlueTask("qqp", "question1", "question2", "is_duplicate", ("0", "1"), ("accuracy", "f1")),
    "mnli": GlueTask("mnli", "sentence1", "sentence2", "gold_label", ("contradiction", "entailment", "neutral"),
                     ("accuracy",)),
    "qnli": GlueTask("qnli", "question", "sentence", "label", ("entailment", "not_entailment"), ("accuracy",)),
    "rte": GlueTask("rte", "sentence1", "sentence2", "label", ("entailment", "not_entailment"), ("accuracy",)),
}


def read_glue(path: str, task: GlueTask) -> tuple[list[str], list[str] | None, np.ndarray]:
    """Texts, text pairs and label ids (or float scores) of a GLUE TSV/CSV/JSON file.

    Raises:
      DataError: a missing file or column, or a label outside the task's list.
    """
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    if path.endswith((".json", ".jsonl")):
        import json

        with open(path) as f:
            text = f.read().strip()
        rows = json.loads(text) if text.startswith("[") else [json.loads(line) for line in text.splitlines() if line]
    else:
        delimiter = "," if path.endswith(".csv") else "\t"
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f, delimiter=delimiter, quoting=csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL)
            lines = list(reader)
        header = list(task.columns) if task.columns and lines and task.columns[-1] not in lines[0] else lines.pop(0)
        rows = [dict(zip(header, line)) for line in lines if line]
    if not rows:
        raise DataError(f"{path}: no rows")
    for column in (task.text, task.text_pair, task.label):
        if column and column not in rows[0]:
            raise DataError(f"{path}: missing column {column!r} for GLUE task {task.name}; it has {sorted(rows[0])}")
    texts = [str(r[task.text]) for r in rows]
    pairs = [str(r[task.text_pair]) for r in rows] if task.text_pair else None
    if not task.labels:
        return texts, pairs, np.asarray([float(r[task.label]) for r in rows], np.float32)
    ids = []
    for i, r in enumerate(rows):
        value = str(r[task.label]).strip()
        if value not in task.labels:
            raise DataError(f"{path}: row {i}: label {value!r} is not one of {task.labels} ({task.name})")
        ids.append(task.labels.index(value))
    return texts, pairs, np.asarray(ids, np.int32)


def score(task: GlueTask, predictions, gold) -> dict[str, float]:
    functions = {
        "accuracy": metrics.accuracy, "f1": metrics.f1, "matthews": metrics.matthews,
        "pearson": metrics.pearson, "spearman": metrics.spearman,
    }
    return {name: functions[name](predictions, gold) for name in task.metrics}
