"""The authors' 70B chat recipe: LLaMA-2-70B-chat on OASST1.

Batch 1 x 16 accumulation, 1875 steps, AdamW lr 1e-4 constant after 3% warmup,
grad-norm clip 0.3, 512 tokens. Point `model.path` at a local LLaMA-2-70B-chat
and `data.train` at OASST1 conversations as chat `messages` jsonl.

    qst-train --config configs/chat_70b.py \\
        --config.model.path=/models/llama-2-70b-chat --config.data.train=oasst1.jsonl
"""

from qst_jax.train.config import base_config


def get_config():
    c = base_config()
    c.task = "chat"
    c.model.path = ""  # required: a local 70B model
    c.model.shape = "llama2-70b"  # what `--plan h100` compiles while model.path is unset
    c.data.train = ""  # required: chat records
    c.data.eval = ""
    c.data.seq_len = 512
    c.train.steps = 1875
    c.train.batch_size = 1
    c.train.micro_batches = 16
    c.train.eval_every = 0
    c.train.checkpoint_every = 200
    c.train.keep_checkpoints = 3
    c.train.output_dir = "runs/chat_70b"
    c.optim.lr = 1e-4
    c.optim.schedule = "constant"
    c.optim.warmup_ratio = 0.03
    c.optim.clip_norm = 0.3
    return c
