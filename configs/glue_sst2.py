"""GLUE-style classification (the authors' GLUE recipe) on SST-2.

Reads GLUE TSV files (`sentence`, `label`). By default the SST-2 copy shipped
in this repository (`data/glue/sst2/`); point `data.train`/`data.eval` at your
own files and `model.path` at your backbone (the recipe was published for
OPT-6.7B and LLaMA-2-7B; the packaged SmolLM2 runs it on a CPU).

    qst-train --config configs/glue_sst2.py --config.model.path=/models/opt-6.7b
"""

import os

from qst_jax.train.config import base_config

_SST2 = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data", "glue", "sst2")


def get_config():
    c = base_config()
    c.task = "classification"
    c.data.train = os.path.normpath(os.path.join(_SST2, "train.tsv"))
    c.data.eval = os.path.normpath(os.path.join(_SST2, "dev.tsv"))
    c.data.text_column = "sentence"
    c.data.label_column = "label"
    c.data.num_labels = 2
    c.data.seq_len = 128
    c.data.eval_examples = 0  # the whole dev set
    c.train.steps = 117_859  # 7 epochs (the authors' recipe) of 67,349 examples at batch 4; override freely
    c.train.batch_size = 4
    c.train.eval_every = 2000
    c.train.checkpoint_every = 2000
    c.train.output_dir = "runs/glue_sst2"
    c.optim.lr = 2e-3  # the authors used 4e-4; a side network that starts at zero learns faster at 2e-3 (docs/quality.md)
    c.optim.schedule = "linear"
    c.optim.warmup_ratio = 0.06
    c.optim.final_lr_fraction = 0.0
    c.optim.weight_decay = 0.01
    return c
