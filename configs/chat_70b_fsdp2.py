"""The 70B chat recipe on 2 devices (for example 2 x 40 GB): backbone bytes split by fsdp.

    qst-train --config configs/chat_70b_fsdp2.py --config.model.path=... --config.data.train=...

Per-device memory of this layout: `python scripts/memory_plan.py --shape 70b --fsdp 2`.
"""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location("chat_70b", os.path.join(os.path.dirname(__file__), "chat_70b.py"))
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)


def get_config():
    c = _base.get_config()
    c.parallel.fsdp = 2
    c.train.batch_size = 2  # one sequence per device
    c.train.micro_batches = 8  # 2 x 8 = the recipe's 16 sequences a step
    c.train.output_dir = "runs/chat_70b_fsdp2"
    return c
