"""Orbax checkpoints of an NNX model's trainable state and its `nnx.Optimizer`.

    checkpoints = NNXCheckpointer("runs/mine/checkpoints")
    checkpoints.save(step, model, optimizer)          # nnx.Param + optimizer state
    step = checkpoints.restore(model, optimizer)      # the newest intact one, in place

The frozen backbone is never written: it is the same NF4 file at every step.
A checkpoint holds `nnx.state(model, nnx.Param)` and `nnx.state(optimizer)`
as pure dicts (`nnx.to_pure_dict`), through `qst_jax.checkpoints.Checkpointer`
(atomic, read back before older ones are pruned, a damaged newest one set
aside), so a restored model and optimizer continue bit for bit.
"""

from __future__ import annotations

from typing import Any

from flax import nnx

from qst_jax.errors import QSTError
from qst_jax.checkpoints import Checkpointer
from qst_jax.run_dir import refuse_if_locked


def _state(model: nnx.Module, optimizer: nnx.Optimizer) -> dict[str, nnx.State]:
    return {"params": nnx.state(model, nnx.Param), "optimizer": nnx.state(optimizer)}


class CheckpointExistsError(QSTError, FileExistsError):
    """A checkpoint of that step is there already."""


class NNXCheckpointer:
    """Keeps the last `keep` checkpoints of (model params, optimizer) under `directory`."""

    def __init__(self, directory: str, keep: int = 2):
        self.checkpointer = Checkpointer(directory, keep)

    def save(self, step: int, model: nnx.Module, optimizer: nnx.Optimizer, meta: dict[str, Any] | None = None) -> None:
        """Writes step `step`: the model's `nnx.Param`s, the optimizer's state, and `meta` (JSON).

        Raises:
          FileExistsError: `directory` already holds step `step` (it is not overwritten).
          RunDirectoryError: a running qst-train holds `directory` (or the run directory above it).
        """
        refuse_if_locked(str(self.checkpointer.manager.directory), "NNXCheckpointer.save")
        if step in self.checkpointer.steps():
            raise CheckpointExistsError(f"{self.checkpointer.manager.directory}/{step}: a checkpoint of step {step} "
                                  "already exists; save another step or use another directory")
        state = {k: nnx.to_pure_dict(v) for k, v in _state(model, optimizer).items()}
        self.checkpointer.save(step, state, {"step": int(step), **(meta or {})})

    def restore(self, model: nnx.Module, optimizer: nnx.Optimizer, log=print) -> tuple[int, dict[str, Any]]:
        """Updates `model` and `optimizer` in place from the newest intact checkpoint; returns (step, meta).

        Raises:
          qst_jax.checkpoints.ResumeError: no checkpoint, or none that reads.
        """
        states = _state(model, optimizer)
        target = {k: nnx.to_pure_dict(v) for k, v in states.items()}
        restored, meta, step = self.checkpointer.restore(target, log=log)
        for key, state in states.items():
            nnx.replace_by_pure_dict(state, restored[key])
            nnx.update(model if key == "params" else optimizer, state)
        return step, meta

    def latest_step(self) -> int | None:
        return self.checkpointer.latest_step()

    def close(self) -> None:
        self.checkpointer.close()
