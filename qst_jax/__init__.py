"""qst_jax: Quantized Side Tuning of large language models in JAX.

Importing any part of qst_jax sets the offline defaults once, here: nothing
reaches a model or dataset hub (`HF_HUB_OFFLINE`, `HF_DATASETS_OFFLINE`), and
transformers stays quiet about the frameworks it does not find. A value the
user already set is kept.

A CUDA plugin installed for compiling to a GPU on a machine without one
(`scripts/setup.sh aot`, `qst-train --plan`) would make jax try CUDA at every
start and log a traceback before it falls back to the CPU: on a machine with
no NVIDIA driver, `JAX_PLATFORMS` defaults to "cpu" (the deviceless compile
works under it).
"""

import os

OFFLINE_ENVIRONMENT = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
for _name, _value in OFFLINE_ENVIRONMENT.items():
    os.environ.setdefault(_name, _value)

from qst_jax.environment import cuda_plugin_without_driver  # noqa: E402  (imports no jax)
from qst_jax.errors import QSTError  # noqa: E402,F401  (the base of every error qst_jax raises)

if "JAX_PLATFORMS" not in os.environ and cuda_plugin_without_driver():
    os.environ["JAX_PLATFORMS"] = "cpu"

__version__ = "0.1.0"
