"""The 70B chat recipe on one 24 GB card (an L4, an RTX 4090): the frozen layers streamed from host memory.

    qst-train --config configs/chat_70b_24gb.py --config.model.path=... --config.data.train=...
    qst-train --config configs/chat_70b_24gb.py --plan l4      # the device peak and the host RAM, compiled

`model.offload=weights` keeps the 70B NF4 layers (about 33 GiB) in pinned
host memory and streams them to the device one layer at a time; QST reads
each layer once per micro-batch, forward only. So the recipe's 16 sequences
a step go in one micro-batch of 16 (one stream a step) rather than 16
micro-batches of one (16 streams). The host needs that RAM, pinned.
"""

from qst_jax.train.config import load_preset


def get_config():
    c = load_preset(__file__, "chat_70b")
    c.model.offload = "weights"
    c.train.batch_size, c.train.micro_batches = 16, 1  # the recipe's 16 sequences a step, one stream of the weights
    c.train.output_dir = "runs/chat_70b_24gb"
    return c
