"""The process environment qst_jax reads at import: whether a CUDA plugin is installed without a GPU driver.

Imports no jax: the package root calls it before jax starts.
"""

from __future__ import annotations

import importlib.util
import os


def plugin_installed() -> bool:
    """Whether jax's CUDA plugin (13 or 12) is installed, whether or not a GPU is there."""
    try:
        return any(importlib.util.find_spec(f"jax_plugins.xla_cuda{v}") is not None for v in (13, 12))
    except ImportError:
        return False


def cuda_plugin_without_driver() -> bool:
    """A CUDA plugin (installed to compile for a GPU) on a machine with no NVIDIA driver."""
    return plugin_installed() and not os.path.exists("/proc/driver/nvidia/version")
