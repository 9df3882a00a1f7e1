"""qst_jax: Quantized Side Tuning of large language models in JAX.

Importing any part of qst_jax sets the offline defaults once, here: nothing
reaches a model or dataset hub (`HF_HUB_OFFLINE`, `HF_DATASETS_OFFLINE`), and
transformers stays quiet about the frameworks it does not find. A value the
user already set is kept.
"""

import os

OFFLINE_ENVIRONMENT = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
for _name, _value in OFFLINE_ENVIRONMENT.items():
    os.environ.setdefault(_name, _value)

__version__ = "0.1.0"
