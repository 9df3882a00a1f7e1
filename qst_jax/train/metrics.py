"""A run's numbers: kept on the device between logs, then written to JSONL, TensorBoard and a loss-curve PNG."""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
import numpy as np
from qst_jax.errors import QSTError

MEAN_KEYS = ("loss", "grad_norm")  # per-step means; every other metric (weight, correct, ...) is a count, summed


class NonFiniteError(QSTError, ArithmeticError):
    """A train step with a non-finite loss or gradient norm.

    Attributes:
      step: the first such step; key, value: which metric and its value.
    """

    def __init__(self, step: int, key: str, value: float):
        super().__init__(f"non-finite {key} {value} at step {step}", field=key)
        self.step, self.key, self.value = step, key, value


class MetricsWindow:
    """The train steps since the last log, their metrics still on the device.

    The loop adds each step's metrics without waiting for the device;
    `fetch` brings the whole window to the host in one transfer, checks
    every step's loss and gradient norm, and returns the window's record:
    the mean of `loss` and `grad_norm` over its steps, the sum of the counts.
    """

    def __init__(self) -> None:
        self._steps: list[int] = []
        self._metrics: list[dict[str, jax.Array]] = []
        self.tokens = 0.0

    def __len__(self) -> int:
        return len(self._steps)

    def add(self, step: int, metrics: dict[str, jax.Array], tokens: float) -> None:
        self._steps.append(step)
        self._metrics.append(metrics)
        self.tokens += tokens

    def fetch_steps(self) -> tuple[list[int], list[dict[str, np.ndarray]]]:
        """Every step's number and metrics, on the host (one transfer); the window is emptied."""
        host = jax.device_get(self._metrics)
        steps = self._steps
        self._steps, self._metrics, self.tokens = [], [], 0.0
        return steps, host

    def fetch(self) -> dict[str, float]:
        """The window's record (one device transfer); the window is emptied.

        Raises:
          NonFiniteError: the first step whose loss or gradient norm is not finite.
        """
        steps, host = self.fetch_steps()
        for step, values in zip(steps, host):
            for key in MEAN_KEYS:
                if key in values and not math.isfinite(float(values[key])):
                    raise NonFiniteError(step, key, float(values[key]))
        record = {}
        for key in host[0]:
            column = np.asarray([float(v[key]) for v in host], np.float64)
            record[key] = float(column.mean() if key in MEAN_KEYS else column.sum())
        record["steps"] = float(len(steps))
        return record


def tb_tag(split: str, key: str, member: str | None = None) -> str:
    """A metric's TensorBoard tag: `split/key`, or `split/key/member` for a sweep member."""
    return f"{split}/{key}" + ("" if member is None else f"/{member}")


class MetricsWriter:
    """Appends each record to `metrics.jsonl` and to TensorBoard under `tb/` (process 0 only)."""

    def __init__(self, directory: str):
        self.enabled = jax.process_index() == 0  # one writer per job
        self.directory = directory
        if not self.enabled:
            return
        os.makedirs(directory, exist_ok=True)
        self.jsonl_path = os.path.join(directory, "metrics.jsonl")
        self._jsonl = open(self.jsonl_path, "a", buffering=1)
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(os.path.join(directory, "tb"))

    def write(self, step: int, split: str, values: dict[str, Any], member: str | None = None) -> None:
        """One record; a sweep member's carries `"member": name` (TensorBoard: `split/key/name`)."""
        if not self.enabled:
            return
        tag = {} if member is None else {"member": member}
        record = {"step": int(step), "split": split, **tag, **{k: float(v) for k, v in values.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        for key, value in values.items():
            self._tb.add_scalar(tb_tag(split, key, member), float(value), int(step))

    def close(self) -> None:
        if not self.enabled:
            return
        self._jsonl.close()
        self._tb.close()


def plot_loss_curve(jsonl_path: str, png_path: str) -> None:
    """Train loss (and eval loss, if any) against step, as a PNG: a curve per split (and per sweep member)."""
    # The object-oriented API: no pyplot state, and the caller's backend (a
    # notebook's inline one, say) is left alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    series: dict[str, tuple[list[int], list[float]]] = {}
    with open(jsonl_path) as f:
        for line in f:
            record = json.loads(line)
            if "loss" in record:
                name = record["split"] if "member" not in record else f"{record['member']} {record['split']}"
                steps, losses = series.setdefault(name, ([], []))
                steps.append(record["step"])
                losses.append(record["loss"])
    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for split, (steps, losses) in sorted(series.items()):
        ax.plot(steps, losses, marker="o" if split != "train" else None, label=split)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("qst-train loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small" if len(series) > 4 else None)
    fig.tight_layout()
    fig.savefig(png_path)
