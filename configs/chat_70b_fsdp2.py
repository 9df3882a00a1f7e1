"""The 70B chat recipe on 2 devices (for example 2 x 40 GB): backbone bytes split by fsdp.

    qst-train --config configs/chat_70b_fsdp2.py --config.model.path=... --config.data.train=...

Per-device memory of this layout: `python scripts/memory_plan.py --shape 70b --fsdp 2 --side fsdp`.
"""

from qst_jax.train.config import load_preset, on_mesh


def get_config():
    # One sequence per device, 8 micro-batches: the recipe's 16 sequences a step.
    c = on_mesh(load_preset(__file__, "chat_70b"), fsdp=2, sequences_per_step=16,
                output_dir="runs/chat_70b_fsdp2")
    # The 70B side network is 1.2 GiB of float32 params and twice that of AdamW state: split over fsdp, not copied
    # to every device (docs/performance.md: the v5e-8 figures).
    c.parallel.side = "fsdp"
    return c
