"""A run's output directory, guarded: one writer at a time, no run mixed into another.

    run_dir = RunDirectory("runs/default")
    run_dir.acquire(resume=False, overwrite=False)   # before anything is loaded
    ...
    run_dir.release()

Rules (README, "When something goes wrong"):
  * a new run into a directory that already holds a run's results (a
    checkpoint, an export, a summary) is refused, unless `resume` (continue
    it) or `overwrite` (exactly the files a run writes are deleted first:
    `run_entries`; every other file, in those folders too, is left);
  * the leftovers of a run that left nothing to resume (stopped before its
    first checkpoint: metrics, TensorBoard files) are the run's, and a new
    run replaces them without `overwrite`;
  * a refused command leaves nothing behind: a directory (or `.lock`) it
    created is removed again;
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
import re
import shutil
from collections.abc import Callable
from typing import Any

from qst_jax.errors import QSTError
from qst_jax.files import write_text_atomic

RUN_FILES = ("side.safetensors", "qst_config.json", "metrics.jsonl", "summary.json", "loss.png")
EXPORT_FILES = ("side.safetensors", "qst_config.json")
# What a run writes inside its folders: orbax step folders (and their temporary and set-aside forms),
# TensorBoard event files, and a sweep's member exports. Nothing else in those folders is the run's.
_STEP = re.compile(r"^\d+(\.damaged|\.orbax-checkpoint-tmp-.*)?$")
_EVENTS = re.compile(r"^events\.out\.tfevents\.")
LOCK_FILE = ".lock"


class RunDirectoryError(QSTError, RuntimeError):
    """The output directory cannot be used as asked; the message says why and what to do."""


class RunDirectory:
    """`train.output_dir`, with the rules of the module docstring."""

    def __init__(self, path: str, owner: str = "qst-train"):
        """`owner`: who writes, for the messages: "qst-train" (flags, `train.output_dir`) or a Python API call."""
        self.path = path
        self.owner = owner
        self._elsewhere = "set another train.output_dir" if owner == "qst-train" else "choose another directory"
        self._lock: Any = None
        self._created: list[str] = []  # what `acquire` made (the directory, .lock): removed again on refusal

    def _listing(self, folder: str) -> list[str]:
        full = os.path.join(self.path, folder)
        return sorted(os.listdir(full)) if os.path.isdir(full) else []

    def run_entries(self) -> list[str]:
        """Every path (relative to the directory) that a run wrote and `--overwrite` deletes, and nothing else.

        Top-level run files; `checkpoints/<step>` folders; TensorBoard event
        files in `tb/`; each `members/<name>/side.safetensors` and
        `qst_config.json` of a sweep.
        """
        found = [name for name in RUN_FILES if os.path.isfile(os.path.join(self.path, name))]
        found += [f"checkpoints/{n}" for n in self._listing("checkpoints") if _STEP.match(n)]
        found += [f"tb/{n}" for n in self._listing("tb") if _EVENTS.match(n)]
        for member in self._listing("members"):
            found += [f"members/{member}/{n}" for n in EXPORT_FILES
                      if os.path.isfile(os.path.join(self.path, "members", member, n))]
        return found

    def run_contents(self) -> list[str]:
        """What of a run the directory holds, for messages (`checkpoints/`, `members/` for their entries)."""
        return top_level(self.run_entries())

    def has_checkpoint(self) -> bool:
        return any(n.isdigit() for n in self._listing("checkpoints"))

    def holds_results(self) -> bool:
        """A checkpoint to resume, or a finished run's export or summary: what a new run must not replace unasked."""
        entries = self.run_entries()
        return self.has_checkpoint() or any(e.split("/")[-1] in (*EXPORT_FILES, "summary.json") for e in entries)

    def acquire(self, *, resume: bool, overwrite: bool) -> list[str]:
        """Locks the directory and checks it against `resume` / `overwrite` (see module docstring).

        Returns:
          the run files it deleted: with `overwrite`, or the leftovers of a
          run that left nothing to resume and no results (stopped before its
          first checkpoint), which a new run replaces without asking.

        Raises:
          RunDirectoryError: in use by another process, holds another run, or nothing to resume.
        """
        if resume and overwrite:
            raise RunDirectoryError("--resume and --overwrite contradict each other: choose one")
        self._make_directory()
        self._lock_directory()
        try:
            contents = self.run_contents()
            if resume and not self.has_checkpoint():
                raise RunDirectoryError(
                    f"{self.path}: --resume, but there is no checkpoint in {os.path.join(self.path, 'checkpoints')} "
                    "to resume from; start a new run without --resume"
                )
            if not resume and contents:
                if not overwrite and self.holds_results():
                    raise RunDirectoryError(
                        f"{self.path}: already holds a run ({', '.join(contents)}); continue it with --resume, "
                        "delete it and start over with --overwrite, or set another train.output_dir"
                    )
                return self._clear()
            return []
        except BaseException:
            self.abandon()
            raise

    def acquire_for_export(self, *, overwrite: bool) -> None:
        """Locks the directory for an export (`side.safetensors`, `qst_config.json`) written beside whatever is there.

        Checkpoints and metrics stay; an export already there (a finished
        run's, or an earlier export) is replaced only with `overwrite`.

        Raises:
          RunDirectoryError: in use by another process, or holds an export and `overwrite` is False.
        """
        self._make_directory()
        self._lock_directory()
        present = [n for n in EXPORT_FILES if os.path.isfile(os.path.join(self.path, n))]
        if present and not overwrite:
            self.abandon()
            raise RunDirectoryError(f"{self.path}: already holds an export ({', '.join(present)}); {self.owner} with "
                                    f"overwrite=True replaces it, or {self._elsewhere}")

    def _make_directory(self) -> None:
        """Creates the directory (and parents) if needed, remembering what it made, so a refusal leaves nothing."""
        missing, head = [], os.path.abspath(self.path)
        while not os.path.exists(head):
            missing.append(head)
            head = os.path.dirname(head)
        if os.path.exists(head) and not os.path.isdir(head):
            raise RunDirectoryError(f"{self.path}: {head} is a file, not a directory; {self._elsewhere}")
        try:
            os.makedirs(self.path, exist_ok=True)
        except OSError as err:
            raise RunDirectoryError(f"{self.path}: cannot create the directory ({err.strerror}); "
                                    f"{self._elsewhere}") from None
        lock = os.path.join(self.path, LOCK_FILE)
        self._created = ([] if os.path.exists(lock) else [lock]) + missing

    def abandon(self) -> None:
        """Releases the lock and removes what `acquire` created (`.lock`, new folders) while it is still empty.

        For a run refused or failed before it wrote anything: nothing of it is left behind (a run's folders that
        are empty, `checkpoints/` and `tb/`, go first).
        """
        self.release()
        self._remove_empty_run_folders()
        for path in self._created:  # the lock file first, then the folders, innermost first
            if path.endswith(LOCK_FILE) and os.listdir(os.path.dirname(path)) != [LOCK_FILE]:
                break  # something else was written beside it: it stays, the lock file too
            try:
                os.remove(path) if path.endswith(LOCK_FILE) else os.rmdir(path)
            except OSError:
                break
        self._created = []

    def _lock_directory(self) -> None:
        path = os.path.join(self.path, LOCK_FILE)
        handle = open(path, "a")
        if not _try_lock(handle):
            handle.close()
            raise RunDirectoryError(
                f"{self.path}: in use by another qst-train ({_lock_holder(path)}); wait for it to finish or "
                f"{self._elsewhere}"
            )
        self._lock = handle

    def _clear(self) -> list[str]:
        """Deletes exactly `run_entries()` (then the run's folders left empty); returns what it deleted."""
        entries = self.run_entries()
        for entry in entries:
            target = os.path.join(self.path, entry)
            if os.path.isdir(target) and not os.path.islink(target):
                shutil.rmtree(target)
            else:
                os.remove(target)
        self._remove_empty_run_folders()
        return entries

    def _remove_empty_run_folders(self) -> None:
        folders = [f"members/{m}" for m in self._listing("members")] + ["members", "checkpoints", "tb"]
        for folder in folders:
            full = os.path.join(self.path, folder)
            if os.path.isdir(full) and not os.path.islink(full) and not os.listdir(full):
                os.rmdir(full)

    def close(self) -> None:
        """Releases the lock and removes `.lock` if this object created it (an export leaves only its files)."""
        self.release()
        lock = os.path.join(self.path, LOCK_FILE)
        if lock in self._created:
            os.remove(lock)
        self._created = []

    def release(self) -> None:
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    def cut_metrics(self, step: int, tb_tag: Callable[[str, str, str | None], str], *, final: bool = False) -> int:
        """Drops metrics records after `step` (a resumed run writes them again); returns how many.

        With `final` (resuming from the run's last step, where only the
        after-training evaluation runs again), the evaluation records at
        `step` go too, so they are not written twice. `metrics.jsonl` is
        rewritten atomically; TensorBoard's event files are rebuilt from the
        kept records, each scalar named `tb_tag(split, key, member)` as the
        run named it.
        """
        path = os.path.join(self.path, "metrics.jsonl")
        if not os.path.isfile(path):
            return 0
        with open(path) as f:
            lines = [line for line in f if line.strip()]

        def keep(record: dict) -> bool:
            return record["step"] < step or (record["step"] == step and (not final or record["split"] == "train"))

        kept = [line for line in lines if keep(json.loads(line))]
        write_text_atomic(path, "".join(kept))
        for entry in self.run_entries():
            if entry.startswith("tb/"):  # the run's event files; anything else in tb/ stays
                os.remove(os.path.join(self.path, entry))
        if kept:
            from tensorboardX import SummaryWriter

            with SummaryWriter(os.path.join(self.path, "tb")) as tb:
                for line in kept:
                    record = json.loads(line)
                    for key, value in record.items():
                        if key not in ("step", "split", "member"):
                            tag = tb_tag(record["split"], key, record.get("member"))
                            tb.add_scalar(tag, float(value), int(record["step"]))
        return len(lines) - len(kept)


def top_level(entries: list[str]) -> list[str]:
    """`checkpoints/3`, `checkpoints/6` -> `checkpoints/`: each top-level name once, in order."""
    names: list[str] = []
    for entry in entries:
        name = entry.split("/")[0] + "/" if "/" in entry else entry
        if name not in names:
            names.append(name)
    return names


def refuse_if_locked(directory: str, owner: str) -> None:
    """Refuses to write into `directory` while a qst-train holds it (its `.lock`, or its parent's).

    For writers that keep no lock of their own (`NNXCheckpointer` into a run's `checkpoints/`).

    Raises:
      RunDirectoryError: naming the directory and the process that holds it.
    """
    for folder in (directory, os.path.dirname(os.path.abspath(directory))):
        path = os.path.join(folder, LOCK_FILE)
        if not os.path.isfile(path):
            continue
        with open(path, "a") as handle:
            if not _try_lock(handle):
                raise RunDirectoryError(f"{directory}: in use by another qst-train ({_lock_holder(path)}); {owner} "
                                        "waits for it to finish, or choose another directory")
            fcntl.flock(handle, fcntl.LOCK_UN)


def _try_lock(handle: Any) -> bool:
    """Takes the advisory lock on an open `.lock` file without waiting; False when another process holds it."""
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


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
