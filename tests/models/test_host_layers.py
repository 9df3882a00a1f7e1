"""Where a streamed backbone's layer leaves go: the host sharding as is on a GPU or the CPU; on a TPU the 3-D
leaves in a row-major (8, 128)-tiled Format and the 1-D and 2-D leaves on the device."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.layout import Format
from jax.sharding import SingleDeviceSharding

from qst_jax.models.host_layers import host_placement


def _host():
    return SingleDeviceSharding(jax.devices()[0], memory_kind="pinned_host")


def test_a_gpu_or_the_cpu_keeps_every_leaf_on_the_host_as_is():
    host = _host()
    for platform in ("gpu", "cpu"):
        assert host_placement((32, 4096, 2048), np.uint8, host, platform) is host
        assert host_placement((32, 4096), jnp.bfloat16, host, platform) is host
        assert host_placement((32,), np.float32, host, platform) is host


def test_a_tpu_tiles_the_3d_leaves_row_major_and_keeps_the_rest_on_the_device():
    host = _host()
    codes = host_placement((32, 4096, 2048), np.uint8, host, "tpu")
    assert isinstance(codes, Format) and codes.sharding is host
    assert codes.layout.major_to_minor == (0, 1, 2) and codes.layout.tiling == ((8, 128), (4, 1))
    assert host_placement((32, 64, 256), jnp.bfloat16, host, "tpu").layout.tiling == ((8, 128), (2, 1))
    assert host_placement((32, 64, 256), np.float32, host, "tpu").layout.tiling == ((8, 128),)
    assert host_placement((32, 4096), jnp.bfloat16, host, "tpu") is None  # a norm's scale: on the device
    assert host_placement((32,), np.float32, host, "tpu") is None
