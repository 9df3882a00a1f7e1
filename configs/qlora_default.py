"""The QLoRA baseline on the embedded default (same model, data and budget as default.py).

    qst-train --config configs/qlora_default.py
"""

from qst_jax.train.config import base_config


def get_config():
    c = base_config()
    c.method = "qlora"
    c.train.output_dir = "runs/qlora_default"
    return c
