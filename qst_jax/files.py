"""Files written whole or not at all: the one atomic write every room uses.

A reader (a resumed run, `qst-eval`, another process) sees either the old
file or the complete new one, never a partial write: the content goes to a
temporary name in the same folder, which is then renamed onto the target
(`os.replace`, atomic on POSIX and Windows). A failure removes the
temporary file and leaves the target as it was. The file gets the mode
`open` gives a new file (0666 less the umask), whatever the writer made.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any


def write_atomic(path: str | os.PathLike, write: Callable[[str], Any]) -> None:
    """Calls `write(tmp)` with a temporary path beside `path`, then renames it onto `path`.

    Args:
      path: the target file; its folder must exist.
      write: writes the complete content to the path it is given.
    """
    path = os.fspath(path)
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # as `open` would make it: some writers (safetensors) create files 0600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _umask() -> int:
    """The process's umask, read without changing it where Linux says it (else set and restored at once)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """`text` as the whole content of `path` (UTF-8), atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    write_atomic(path, write)


def write_json_atomic(path: str | os.PathLike, value: Any, **dump_options: Any) -> None:
    """`value` as JSON (`json.dumps(value, **dump_options)`) in `path`, atomically."""
    write_text_atomic(path, json.dumps(value, **dump_options))
