"""The 70B chat recipe on one 16 GB device (a TPU v5e chip, an RTX 4060 Ti 16 GB): layers and kept states on the host.

    qst-train --config configs/chat_70b_16gb.py --config.model.path=... --config.data.train=...
    qst-train --config configs/chat_70b_16gb.py --plan v5e   # the device peak and the host RAM, compiled

`chat_70b_24gb.py` with `model.offload=weights+states`: the backbone
states QST's backward reads go to pinned host memory as they are made and
come back in the reverse pass, so the device holds the side network, its
optimizer, one micro-batch's activations and two layers of the stream. The
states are kept as float8 with a per-token scale (a GPU's default; on a TPU
it halves what they take of the host's RAM). The host needs the layers and
the states pinned.
"""

from qst_jax.train.config import load_preset


def get_config():
    c = load_preset(__file__, "chat_70b_24gb")
    c.model.offload = "weights+states"
    c.side.hidden_store = "fp8"  # "auto" keeps bf16 states on a TPU: 5 GiB more of pinned host memory at 70B
    c.train.output_dir = "runs/chat_70b_16gb"
    return c
