"""The 70B chat recipe on 8 devices (for example 8 x 24 GB): backbone bytes split 8 ways.

    qst-train --config configs/chat_70b_fsdp8.py --config.model.path=... --config.data.train=...

Per-device memory of this layout: `python scripts/memory_plan.py --shape 70b --fsdp 8`.
"""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location("chat_70b", os.path.join(os.path.dirname(__file__), "chat_70b.py"))
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)


def get_config():
    c = _base.get_config()
    c.parallel.fsdp = 8
    c.train.batch_size = 8
    c.train.micro_batches = 2  # 8 x 2 = the recipe's 16 sequences a step
    c.train.output_dir = "runs/chat_70b_fsdp8"
    return c
