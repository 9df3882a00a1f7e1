"""The process environment qst_jax reads at import: whether a compiler plugin is installed without its device.

Imports no jax: the package root calls it before jax starts.
"""

from __future__ import annotations

import glob
import importlib.util
import os


def plugin_installed() -> bool:
    """Whether jax's CUDA plugin (13 or 12) is installed, whether or not a GPU is there."""
    try:
        return any(importlib.util.find_spec(f"jax_plugins.xla_cuda{v}") is not None for v in (13, 12))
    except ImportError:
        return False


def libtpu_installed() -> bool:
    """Whether libtpu (jax's TPU runtime and compiler) is installed, whether or not a TPU is there."""
    try:
        return importlib.util.find_spec("libtpu") is not None
    except ImportError:
        return False


def cuda_plugin_without_driver() -> bool:
    """A CUDA plugin (installed to compile for a GPU) on a machine with no NVIDIA driver."""
    return plugin_installed() and not os.path.exists("/proc/driver/nvidia/version")


def libtpu_without_tpu() -> bool:
    """libtpu (installed to compile for a TPU) on a machine with no TPU device (`/dev/accel*`, `/dev/vfio/<n>`)."""
    return libtpu_installed() and not glob.glob("/dev/accel*") and not glob.glob("/dev/vfio/[0-9]*")
