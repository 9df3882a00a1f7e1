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

from qst_jax.errors import InputError, QSTError
from qst_jax.tree import first_non_finite


class ResumeError(QSTError, RuntimeError):
    """No intact checkpoint to resume from; the message names each damaged one."""


class Checkpointer:
    """Keeps the last `keep` checkpoints under `directory`.

    A new checkpoint is read back in full before older ones are deleted, so
    a failed or damaged write never leaves the run with nothing to resume.
    `restore` takes the newest checkpoint that reads, naming any damaged
    newer ones.
    """

    def __init__(self, directory: str, keep: int = 2):
        if keep < 1:
            raise InputError(f"keep_checkpoints must be >= 1, got {keep}")
        self.keep = keep
        options = ocp.CheckpointManagerOptions(max_to_keep=None, enable_async_checkpointing=False, create=True)
        self.manager = ocp.CheckpointManager(os.path.abspath(directory), options=options)

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Writes step `step` (atomically: orbax renames a finished temporary folder), verifies it, prunes."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self.manager.save(step, args=args, force=True)
        self.manager.wait_until_finished()
        self._read(step, state)  # raises if what was written does not read back
        for old in self.steps()[self.keep :]:
            self.manager.delete(old)

    def steps(self) -> list[int]:
        """Every finished checkpoint's step, newest first."""
        self.manager.reload()
        return sorted(self.manager.all_steps(), reverse=True)

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[0] if steps else None

    def read_meta(self, step: int) -> dict[str, Any]:
        """The JSON record of checkpoint `step` (raises if it is damaged)."""
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def newest_meta(self) -> dict[str, Any] | None:
        """The JSON record of the newest checkpoint whose record reads (None: none does)."""
        for step in self.steps():
            try:
                return self.read_meta(step)
            except Exception:  # noqa: BLE001 - a damaged checkpoint: `restore` names it and takes an older one
                continue
        return None

    def _read(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
        restored = self.manager.restore(step, args=args)
        bad = first_non_finite(restored["state"])
        if bad is not None:  # the trainer never saves one: a damaged checkpoint, and `restore` takes an older one
            raise InputError(f"{bad} holds NaN or infinite values")
        return restored["state"], restored["meta"]

    def restore(self, abstract_state: Any, log=print) -> tuple[Any, dict[str, Any], int]:
        """(state, meta, step) of the newest checkpoint that reads; damaged newer ones are named via `log`.

        Raises:
          ResumeError: no checkpoint, or none that reads.
        """
        damaged, damaged_steps = [], []
        for step in self.steps():
            try:
                state, meta = self._read(step, abstract_state)
            except Exception as err:  # noqa: BLE001 - orbax and tensorstore raise many kinds for a damaged file
                reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
                damaged.append(f"step {step} ({reason})")
                damaged_steps.append(step)
                log(f"checkpoint {self.manager.directory}/{step} is damaged ({reason}); trying an older one")
                continue
            if damaged:
                self._set_aside(damaged_steps, log)
                log(f"resuming from step {step}, the newest intact checkpoint")
            return state, meta, step
        where = self.manager.directory
        if damaged:
            raise ResumeError(f"{where}: no intact checkpoint to resume from; damaged: {'; '.join(damaged)}")
        raise ResumeError(f"{where}: no checkpoint to resume from")

    def _set_aside(self, steps: list[int], log) -> None:
        """Renames damaged checkpoints `<step>` to `<step>.damaged` (kept for inspection, out of the way)."""
        for step in steps:
            path = os.path.join(str(self.manager.directory), str(step))
            if jax.process_index() == 0:  # one process renames what all processes share
                os.replace(path, f"{path}.damaged")
            log(f"moved the damaged checkpoint to {path}.damaged")
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("qst_jax: damaged checkpoints set aside")
        self.manager.reload()

    def close(self) -> None:
        self.manager.close()
