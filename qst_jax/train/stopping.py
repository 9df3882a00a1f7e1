"""`TrainingError`: a run that stopped on its own (a non-finite loss, every sweep member diverged)."""

from __future__ import annotations

from qst_jax.errors import QSTError


class TrainingError(QSTError, RuntimeError):
    """The run stopped (non-finite loss); the message says where."""
