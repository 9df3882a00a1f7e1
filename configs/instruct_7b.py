"""Instruction tuning at 7B (the authors' MMLU setting: Alpaca-style data).

Point `model.path` at a local LLaMA-2-7B (HF directory, bitsandbytes NF4
directory or GGUF) and `data.train` at instruction records (jsonl with
`instruction`/`input`/`output`, `prompt`/`response`, or chat `messages`).
Batch 4 x 384 tokens, AdamW 2e-4 constant after warmup, clip 0.3.

    qst-train --config configs/instruct_7b.py \\
        --config.model.path=/models/llama-2-7b --config.data.train=alpaca.jsonl
"""

from qst_jax.train.config import base_config


def get_config():
    c = base_config()
    c.task = "chat"
    c.model.path = ""  # required: a local 7B model
    c.data.train = ""  # required: instruction records
    c.data.eval = ""
    c.data.seq_len = 384
    c.train.steps = 10000
    c.train.batch_size = 4
    c.train.eval_every = 0
    c.train.checkpoint_every = 500
    c.train.keep_checkpoints = 3
    c.train.output_dir = "runs/instruct_7b"
    c.optim.lr = 2e-4
    c.optim.schedule = "constant"
    c.optim.warmup_ratio = 0.03
    c.optim.clip_norm = 0.3
    return c
