"""Orbax checkpoints of the train state (the export lives in `methods.export`).

A checkpoint holds the TrainState (trainable params, optimizer state, step,
RNG) and a JSON record (data position, config fingerprint). Orbax writes each
step to a temporary folder and renames it when complete, so a crash never
leaves a half-written checkpoint that `--resume` would pick up. Saves are
synchronous: the train step donates the state's buffers, so they must be
written before the next step reuses them.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Keeps the last `keep` checkpoints under `directory`."""

    def __init__(self, directory: str, keep: int = 2):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False, create=True)
        self.manager = ocp.CheckpointManager(os.path.abspath(directory), options=options)

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self.manager.save(step, args=args, force=True)
        self.manager.wait_until_finished()

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError("no checkpoint to resume from")
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
        restored = self.manager.restore(step, args=args)
        return restored["state"], restored["meta"]

    def close(self) -> None:
        self.manager.close()
