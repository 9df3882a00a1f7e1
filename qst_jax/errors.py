"""`QSTError`: the base of every error qst_jax raises, so a caller can catch them all with one class.

Each room's error keeps its own name and the built-in class it always had
(`ConfigError` is still a `ValueError`, `ResumeError` a `RuntimeError`), so
code that caught those goes on working. `field` names what the error is about
(a config key, a request field, a file) where there is one.
"""

from __future__ import annotations


class QSTError(Exception):
    """An error raised by qst_jax.

    Attributes:
      field: the config key, request field or file the error is about, or None.
    """

    def __init__(self, *args: object, field: str | None = None):
        super().__init__(*args)
        self.field = field


class InputError(QSTError, ValueError):
    """A value given to qst_jax that it cannot take (a shape, a mode, a mesh, an argument)."""


class MissingFileError(QSTError, FileNotFoundError):
    """A file or folder qst_jax was pointed at does not exist."""


class UsageError(QSTError, TypeError):
    """A call that lacks what it needs (say, no random key to initialize params with)."""
