"""The 70B chat recipe on 2 hosts x 8 devices: fsdp within a host, data across hosts.

Start the same command on both hosts, with the first host's address as
coordinator (qst_jax calls `jax.distributed.initialize` from these):

    QST_COORDINATOR=host0:1234 QST_NUM_PROCESSES=2 QST_PROCESS_ID=0 \\
        qst-train --config configs/chat_70b_2hosts.py --config.model.path=... --config.data.train=...
    QST_COORDINATOR=host0:1234 QST_NUM_PROCESSES=2 QST_PROCESS_ID=1 \\
        qst-train --config configs/chat_70b_2hosts.py --config.model.path=... --config.data.train=...

`model.path` and `data.train` must be readable on every host; each host loads
only the shards of the backbone its devices hold and feeds its own rows of
every batch; `train.output_dir` must be a shared folder (orbax writes the
checkpoints from all hosts together; host 0 writes metrics and the export).
"""

from qst_jax.train.config import load_preset, on_mesh


def get_config():
    # The mesh's rows are hosts (jax.devices() is ordered by process): data=2 spans them.
    c = on_mesh(load_preset(__file__, "chat_70b"), data=2, fsdp=8, sequences_per_step=16,
                output_dir="runs/chat_70b_2hosts")
    # The 70B side network is 1.2 GiB of float32 params and twice that of AdamW state: split over fsdp, not copied
    # to every device (docs/performance.md: the v5e-8 figures).
    c.parallel.side = "fsdp"
    return c
