"""Where a streamed backbone's stacked layers live: pinned host memory, laid out so one layer can be copied.

`model.offload` keeps the backbone's stacked layers `[L, ...]` in pinned
host memory and every layer loop copies one layer at a time to the device
(`models.loops.layer_to_device`). On a GPU or the CPU every leaf of the
stack goes to the host in the default (row-major) layout. A TPU needs two
things more, both read off libtpu's compiler:

- its default host layout for a `u8[L, rows, cols]` stack with a small
  minor dimension moves that dimension major (`{1,0,2:T(32,128)(4,1)}`),
  and one layer of it cannot be copied; the copy wants a row-major stack
  tiled `(8, 128)` with the dtype's packing (`(4, 1)` for 8-bit), so the
  3-D leaves (NF4 codes and their first-level scales) get that `Format`;
- a TPU cannot copy one row of a packed 2-D host array ("Sublane slicing
  size must be multiple of element packing factor"), so the 1-D and 2-D
  leaves (norm scales, second-level scales, offsets: a few KB a layer)
  stay on the device.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _tpu_tiling(dtype: Any) -> tuple[tuple[int, ...], ...]:
    """The `(8, 128)` tile of a TPU layout, with the element packing of sub-32-bit dtypes (`(4, 1)` for 8 bits)."""
    bits = np.dtype(dtype).itemsize * 8
    return ((8, 128),) if bits >= 32 else ((8, 128), (32 // bits, 1))


def host_placement(shape: tuple[int, ...], dtype: Any, host_sharding: Any, platform: str) -> Any | None:
    """Where one leaf of a streamed layer stack goes: `host_sharding`, a TPU `Format` over it, or None (the device).

    Args:
      shape: the stacked leaf's shape, layers first.
      dtype: its dtype.
      host_sharding: a sharding with `memory_kind="pinned_host"` (on a TPU,
        over concrete devices: a `Format` needs them).
      platform: "tpu", "gpu" or "cpu": the platform that runs the program.

    Returns:
      What `jax.device_put` (or a `ShapeDtypeStruct`'s `sharding`) takes;
      None for a leaf that stays on the device.
    """
    if platform != "tpu":
        return host_sharding
    if len(shape) < 3:
        return None
    from jax.experimental.layout import Format, Layout

    layout = Layout(major_to_minor=tuple(range(len(shape))), tiling=_tpu_tiling(dtype))
    return Format(layout, host_sharding)
