"""Several processes (hosts) through `jax.distributed`, configured from the environment.

Set on every process before `qst-train` starts:

    QST_COORDINATOR=host0:23456  QST_NUM_PROCESSES=2  QST_PROCESS_ID=0   # 1 on the other

Each process then sees every device of the job in `jax.devices()`; the mesh
spans them all, each process feeds its own rows of every batch, checkpoints
are written by all processes together (orbax), and process 0 alone writes
metrics and the export. On CPU the collectives go through gloo.
"""

from __future__ import annotations

import os

import jax
from qst_jax.errors import InputError


def initialize_from_env() -> bool:
    """Calls `jax.distributed.initialize` when QST_COORDINATOR is set; True if it did."""
    address = os.environ.get("QST_COORDINATOR")
    if not address:
        return False
    try:
        num_processes = int(os.environ["QST_NUM_PROCESSES"])
        process_id = int(os.environ["QST_PROCESS_ID"])
    except (KeyError, ValueError) as err:
        raise InputError("QST_COORDINATOR needs QST_NUM_PROCESSES and QST_PROCESS_ID (integers)") from err
    if os.environ.get("JAX_PLATFORMS", "") in ("", "cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=address, num_processes=num_processes, process_id=process_id)
    return True
