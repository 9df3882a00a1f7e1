"""The one `scan` every loop of a step goes through, so a cost analysis can see through them.

XLA's cost analysis counts a `while` body once, whatever its trip count.
Inside `unrolled_loops()` each of these scans is traced fully unrolled, so
the compiled program has no `while` and its flops and bytes are the whole
step's (`qst_jax.aot` compiles a one- and a two-layer program that way and
extrapolates to the model's layer count). Outside it nothing changes.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any

import jax

_UNROLL = contextvars.ContextVar("qst_jax_unroll_loops", default=False)


@contextlib.contextmanager
def unrolled_loops() -> Iterator[None]:
    """While active, `scan` and `map` trace their loops fully unrolled."""
    token = _UNROLL.set(True)
    try:
        yield
    finally:
        _UNROLL.reset(token)


def scan(body: Callable, init: Any, xs: Any, length: int | None = None) -> tuple[Any, Any]:
    """`jax.lax.scan(body, init, xs, length)`, unrolled inside `unrolled_loops()`."""
    return jax.lax.scan(body, init, xs, length=length, unroll=True if _UNROLL.get() else 1)


def layer_to_device(layer: Any) -> Any:
    """A scanned layer's leaves that live in host memory (a streamed backbone) copied to the device.

    Called at the top of a layer loop's body: XLA issues the copies of layer
    i as the iteration starts, so only one layer of a backbone kept in pinned
    host memory (`model.offload="weights"`) is on the device at a time. Leaves
    already on the device pass through; on a jax without memory spaces nothing
    changes.
    """
    space = getattr(getattr(jax, "memory", None), "Space", None)
    typeof = getattr(jax, "typeof", None)
    if space is None or typeof is None:
        return layer

    leaves, treedef = jax.tree.flatten(layer)
    host = [getattr(typeof(x), "memory_space", None) == space.Host for x in leaves]
    if not any(host):
        return layer
    moved = [jax.device_put(x, space.Device) if h else x for x, h in zip(leaves, host)]
    # The barrier keeps XLA from moving a reshape of a host slice ahead of its copy (a bitcast across memory
    # spaces, which XLA's layout pass refuses for NF4 scales at LLaMA-2-70B shapes).
    return jax.tree.unflatten(treedef, jax.lax.optimization_barrier(moved))


def map(fn: Callable, xs: Any) -> Any:  # noqa: A001 (the name of lax.map)
    """`jax.lax.map(fn, xs)` through `scan`."""
    return scan(lambda _, x: (None, fn(x)), None, xs)[1]
