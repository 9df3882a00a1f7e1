"""Instruction tuning at 7B on an 8 GB card: the frozen layers and the states the backward keeps in host memory.

    qst-train --config configs/instruct_7b_8gb.py --config.model.path=... --config.data.train=...
    qst-train --config configs/instruct_7b_8gb.py --plan rtx4060ti-16   # the device peak and the host RAM, compiled

`configs/instruct_7b.py` with `model.offload="weights+states"`: the 7B NF4
layers (about 3.3 GiB) stay in pinned host memory and stream to the device
one layer ahead of the compute, and the backbone states the side network's
backward reads (fp8 on a GPU) go to host memory as they are made and come
back in the reverse pass. Embeddings, the LM head, the side network and its
optimizer state stay on the device. The weights stream once per
micro-batch: keep `train.micro_batches` at 1 and size `train.batch_size`
to the card.
"""

from qst_jax.train.config import load_preset


def get_config():
    c = load_preset(__file__, "instruct_7b")
    c.model.shape = "llama2-7b"  # what `--plan` compiles while model.path is unset
    c.model.offload = "weights+states"
    c.train.output_dir = "runs/instruct_7b_8gb"
    return c
