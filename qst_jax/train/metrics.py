"""Where a run's numbers go: JSONL, TensorBoard event files, a loss-curve PNG."""

from __future__ import annotations

import json
import os
from typing import Any


class MetricsWriter:
    """Appends each record to `metrics.jsonl` and to TensorBoard under `tb/` (process 0 only)."""

    def __init__(self, directory: str):
        import jax

        self.enabled = jax.process_index() == 0  # one writer per job
        self.directory = directory
        if not self.enabled:
            return
        os.makedirs(directory, exist_ok=True)
        self.jsonl_path = os.path.join(directory, "metrics.jsonl")
        self._jsonl = open(self.jsonl_path, "a", buffering=1)
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(os.path.join(directory, "tb"))

    def write(self, step: int, split: str, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "split": split, **{k: float(v) for k, v in values.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        for key, value in values.items():
            self._tb.add_scalar(f"{split}/{key}", float(value), int(step))

    def close(self) -> None:
        if not self.enabled:
            return
        self._jsonl.close()
        self._tb.close()


def plot_loss_curve(jsonl_path: str, png_path: str) -> None:
    """Train loss (and eval loss, if any) against step, as a PNG."""
    # The object-oriented API: no pyplot state, and the caller's backend (a
    # notebook's inline one, say) is left alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    series: dict[str, tuple[list[int], list[float]]] = {}
    with open(jsonl_path) as f:
        for line in f:
            record = json.loads(line)
            if "loss" in record:
                steps, losses = series.setdefault(record["split"], ([], []))
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
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
