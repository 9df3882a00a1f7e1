"""A run's output directory, guarded: one writer at a time, no run mixed into another.

    run_dir = RunDirectory("runs/default")
    run_dir.acquire(resume=False, overwrite=False)   # before anything is loaded
    ...
    run_dir.release()

Rules (README, "When something goes wrong"):
  * a new run into a directory that already holds a run (checkpoints, an
    export, metrics) is refused, unless `resume` (continue it) or
    `overwrite` (its run files are deleted first; other files are left);
  * `resume` with no checkpoint to resume from is refused;
  * a second process cannot write the same directory: an advisory lock on
    `.lock` makes it fail at once, naming the holder (its pid and command,
    from the kernel's lock table). The file is created once and never
    written, so a refused command leaves the directory byte for byte as it
    was; the kernel drops the lock when its process dies, so a killed run
    never blocks its own `--resume`;
  * on resume, `metrics.jsonl` and the TensorBoard files are cut back to the
    checkpoint's step (TensorBoard is rewritten from the kept records), so a
    resumed run has no duplicate rows.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from typing import Any

from qst_jax.files import write_text_atomic

RUN_FILES = ("side.safetensors", "qst_config.json", "metrics.jsonl", "summary.json", "loss.png")
RUN_FOLDERS = ("checkpoints", "tb")
LOCK_FILE = ".lock"


class RunDirectoryError(RuntimeError):
    """The output directory cannot be used as asked; the message says why and what to do."""


class RunDirectory:
    """`train.output_dir`, with the rules of the module docstring."""

    def __init__(self, path: str):
        self.path = path
        self._lock: Any = None

    def run_contents(self) -> list[str]:
        """What of a run the directory holds (file and folder names), empty for none."""
        found = [name for name in RUN_FILES if os.path.isfile(os.path.join(self.path, name))]
        for name in RUN_FOLDERS:
            folder = os.path.join(self.path, name)
            if os.path.isdir(folder) and os.listdir(folder):
                found.append(f"{name}/")
        return found

    def has_checkpoint(self) -> bool:
        folder = os.path.join(self.path, "checkpoints")
        return os.path.isdir(folder) and any(name.isdigit() for name in os.listdir(folder))

    def acquire(self, *, resume: bool, overwrite: bool) -> None:
        """Locks the directory and checks it against `resume` / `overwrite` (see module docstring).

        Raises:
          RunDirectoryError: in use by another process, holds another run, or nothing to resume.
        """
        if resume and overwrite:
            raise RunDirectoryError("--resume and --overwrite contradict each other: choose one")
        os.makedirs(self.path, exist_ok=True)
        self._lock_directory()
        try:
            contents = self.run_contents()
            if resume and not self.has_checkpoint():
                raise RunDirectoryError(
                    f"{self.path}: --resume, but there is no checkpoint in {os.path.join(self.path, 'checkpoints')} "
                    "to resume from; start a new run without --resume"
                )
            if not resume and contents:
                if not overwrite:
                    raise RunDirectoryError(
                        f"{self.path}: already holds a run ({', '.join(contents)}); continue it with --resume, "
                        "delete it and start over with --overwrite, or set another train.output_dir"
                    )
                self._clear()
        except BaseException:
            self.release()
            raise

    def _lock_directory(self) -> None:
        path = os.path.join(self.path, LOCK_FILE)
        handle = open(path, "a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise RunDirectoryError(
                f"{self.path}: in use by another qst-train ({_lock_holder(path)}); wait for it to finish or set "
                "another train.output_dir"
            ) from None
        self._lock = handle

    def _clear(self) -> None:
        for name in RUN_FILES:
            target = os.path.join(self.path, name)
            if os.path.isfile(target):
                os.remove(target)
        for name in RUN_FOLDERS:
            shutil.rmtree(os.path.join(self.path, name), ignore_errors=True)

    def release(self) -> None:
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    def cut_metrics(self, step: int) -> int:
        """Drops metrics records after `step` (a resumed run writes them again); returns how many.

        `metrics.jsonl` is rewritten atomically; TensorBoard's event files are
        rebuilt from the kept records.
        """
        path = os.path.join(self.path, "metrics.jsonl")
        if not os.path.isfile(path):
            return 0
        with open(path) as f:
            lines = [line for line in f if line.strip()]
        kept = [line for line in lines if json.loads(line)["step"] <= step]
        write_text_atomic(path, "".join(kept))
        shutil.rmtree(os.path.join(self.path, "tb"), ignore_errors=True)
        if kept:
            from tensorboardX import SummaryWriter

            from qst_jax.train.metrics import tb_tag

            with SummaryWriter(os.path.join(self.path, "tb")) as tb:
                for line in kept:
                    record = json.loads(line)
                    for key, value in record.items():
                        if key not in ("step", "split", "member"):
                            tag = tb_tag(record["split"], key, record.get("member"))
                            tb.add_scalar(tag, float(value), int(record["step"]))
        return len(lines) - len(kept)


def _lock_holder(path: str) -> str:
    """`pid N (command)` of the process holding the lock on `path`, from /proc/locks (Linux), else a phrase."""
    try:
        inode = os.stat(path).st_ino
        with open("/proc/locks") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 5 and fields[5].endswith(f":{inode}"):
                    pid = fields[4]
                    with open(f"/proc/{pid}/cmdline", "rb") as cmd:
                        command = cmd.read().replace(b"\0", b" ").decode(errors="replace").strip()
                    return f"pid {pid}: {command[:120]}"
    except OSError:
        pass
    return "another process"
