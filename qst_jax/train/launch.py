"""The one place that chooses between a single run and a sweep.

    trainer = make_trainer(config)                          # qst-train: config.sweep decides
    trainer = make_trainer(config, schedule={"a": f, "b": g})  # a dict or list of tx / schedule: a sweep

`Trainer` (`trainer.py`) is the single run and `SweepTrainer`
(`sweep_trainer.py`, its subclass) the sweep; neither chooses for the other,
so the train room has no import circle.
"""

from __future__ import annotations

from typing import Any

from qst_jax.train.sweep import is_sweep
from qst_jax.train.sweep_trainer import SweepTrainer
from qst_jax.train.trainer import Trainer


def make_trainer(config: Any, *, tx: Any = None, schedule: Any = None, **kwargs: Any) -> Trainer:
    """A `SweepTrainer` for a sweep (`config.sweep`, or a list or dict of `tx` or `schedule`), else a `Trainer`.

    Args:
      kwargs: the trainers' own (`backbone`, `tokenizer`, `resume`, `overwrite`, `log`).
    """
    cls = SweepTrainer if is_sweep(config, tx, schedule) else Trainer
    return cls(config, tx=tx, schedule=schedule, **kwargs)
