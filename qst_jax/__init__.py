"""qst_jax: Quantized Side Tuning of large language models in JAX.

Importing qst_jax changes nothing in your process, with one exception: a
CUDA plugin or libtpu installed for compiling to a GPU or TPU on a machine
without one (`scripts/setup.sh aot` / `tpu`, `qst-train --plan`) would make
jax try that device at every start and log a traceback before it falls back
to the CPU, so on a machine with no NVIDIA driver and no TPU device, where
nothing can run on either, `JAX_PLATFORMS` defaults to "cpu" (the deviceless
compile works under it). Whether models and
data sets come from the Hub follows your own `HF_HUB_OFFLINE` and
`HF_DATASETS_OFFLINE`.
"""

import os

from qst_jax.environment import cuda_plugin_without_driver, libtpu_without_tpu, plugin_installed  # (no jax)
from qst_jax.errors import QSTError  # noqa: F401  (the base of every error qst_jax raises)

if "JAX_PLATFORMS" not in os.environ and (cuda_plugin_without_driver() or
                                         (libtpu_without_tpu() and not plugin_installed())):
    os.environ["JAX_PLATFORMS"] = "cpu"

__version__ = "0.1.0"
