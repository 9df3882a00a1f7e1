"""The training loop: a step per batch, and hooks for the log window, evaluation, checkpoints and signals.

    state, clock = train_loop(state, step_fn, backbone_params, batches, total_steps, periods, hooks, stop)

The loop does not wait on the device each step: the step metrics collect in
a `MetricsWindow` on the device, and `hooks.window` fetches them once per
`periods.log` steps (and before every evaluation, checkpoint, signal stop and
the end), so the host prepares the next batch while the device works, and
a window is checked before any checkpoint is written after it. What a
window's record holds, what an evaluation writes and how a checkpoint is
kept are the hooks' business: a single run and a sweep differ only there.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax

from qst_jax.train.metrics import MetricsWindow
from qst_jax.train.signals import Stop


@dataclasses.dataclass(frozen=True)
class Periods:
    """Every how many steps the loop logs, evaluates and checkpoints (0: never)."""

    log: int
    evaluate: int
    checkpoint: int


@dataclasses.dataclass(frozen=True)
class LoopHooks:
    """What the loop calls.

    Attributes:
      window: `(window, step, clock, bar)`: fetch, check and write the window's record(s).
      evaluate: `(state, step)`: the periodic held-out evaluation.
      checkpoint: `(state, step)`: save a checkpoint.
      saved_step: `()`: the step of the newest checkpoint (None: none yet).
      stopped: `(signal, step)`: a signal stopped the loop (after its checkpoint).
    """

    window: Callable[[MetricsWindow, int, Throughput, Any], None]
    evaluate: Callable[[Any, int], None]
    checkpoint: Callable[[Any, int], None]
    saved_step: Callable[[], int | None]
    stopped: Callable[[int, int], None]


class Throughput:
    """Training time and tokens per second, after the first step (which compiles) and outside evaluations.

    Attributes:
      first_step: the loop's first step; seconds, steps: training time so far and the steps it covers.
    """

    def __init__(self, first_step: int):
        self.first_step, self.start = first_step, time.perf_counter()
        self.seconds, self.steps = 0.0, 0

    def restart(self) -> None:
        """What ran since is not training (compiling, evaluating, saving)."""
        self.start = time.perf_counter()

    def lap(self, step: int, window_steps: int, tokens: float) -> float | None:
        """Tokens per second of the window that ends at `step` (None for the first step's), counted in the total."""
        now, rate = time.perf_counter(), None
        if step > self.first_step:
            rate = tokens / max(now - self.start, 1e-9)
            self.seconds += now - self.start
            self.steps += window_steps - (1 if step - window_steps < self.first_step else 0)
        self.start = now
        return rate


def train_loop(state: Any, step_fn: Callable, backbone_params: Any, batches: Iterator[dict], total_steps: int,
               periods: Periods, hooks: LoopHooks, stop: Stop, *, place: Callable = lambda b: b,
               desc: str = "") -> tuple[Any, Throughput]:
    """Steps `state` from its step to `total_steps`; returns it and the run's throughput."""
    from tqdm import tqdm

    step = int(state.step)
    bar = tqdm(total=total_steps, initial=step, desc=desc, dynamic_ncols=True,
               disable=os.environ.get("QST_NO_PROGRESS") == "1")
    window, clock = MetricsWindow(), Throughput(step + 1)
    try:
        while step < total_steps:
            batch = next(batches)
            state, metrics = step_fn(state, backbone_params, place(batch))
            step += 1
            bar.update(1)
            if step == clock.first_step:  # the first step compiles: throughput is timed from its end
                jax.block_until_ready(metrics)
                clock.restart()
            window.add(step, metrics, 0.0 if step == clock.first_step else float(batch["attention_mask"].sum()))
            checkpoint = bool(periods.checkpoint) and step % periods.checkpoint == 0
            evaluate = bool(periods.evaluate) and step % periods.evaluate == 0 and step < total_steps
            last = step == total_steps or stop.signal is not None
            if step % periods.log == 0 or checkpoint or evaluate or last:
                hooks.window(window, step, clock, bar)
            if evaluate:
                hooks.evaluate(state, step)
            if checkpoint or (stop.signal is not None and hooks.saved_step() != step):
                hooks.checkpoint(state, step)
            if evaluate or checkpoint:
                clock.restart()
            if stop.signal is not None:
                hooks.stopped(stop.signal, step)
                break
    finally:
        bar.close()
    return state, clock
