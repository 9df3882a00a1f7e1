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
import jax.numpy as jnp

from qst_jax.platform import target_platform

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


def _host_leaves(tree: Any) -> list[bool]:
    """Which of `tree`'s leaves live in host memory (none on a jax without memory spaces)."""
    space = getattr(getattr(jax, "memory", None), "Space", None)
    typeof = getattr(jax, "typeof", None)
    if space is None or typeof is None:
        return [False] * len(jax.tree.leaves(tree))
    return [getattr(typeof(x), "memory_space", None) == space.Host for x in jax.tree.leaves(tree)]


def layer_to_device(layer: Any) -> Any:
    """A scanned layer's leaves that live in host memory (a streamed backbone) copied to the device.

    Called at the top of a layer loop's body: XLA issues the copies of layer
    i as the iteration starts, so only one layer of a backbone kept in pinned
    host memory (`model.offload="weights"`) is on the device at a time. Leaves
    already on the device pass through; on a jax without memory spaces nothing
    changes.
    """
    host = _host_leaves(layer)
    if not any(host):
        return layer
    leaves, treedef = jax.tree.flatten(layer)
    moved = [jax.device_put(x, jax.memory.Space.Device) if h else x for x, h in zip(leaves, host)]
    # The barrier keeps XLA from moving a reshape of a host slice ahead of its copy (a bitcast across memory
    # spaces, which XLA's layout pass refuses for NF4 scales at LLaMA-2-70B shapes).
    return jax.tree.unflatten(treedef, jax.lax.optimization_barrier(moved))


def _as_stacked(layer: Any) -> Any:
    """On a TPU, a resident layer's integer leaves (NF4 codes and scales) pinned to the row-major layout of their stack.

    The fused NF4 dequantization wants the codes with `out` minor (as the
    matmul wants the weight). Where the stack is a loop's operand (the layer
    scan inside the micro-batch loop) XLA's layout assignment then gives the
    whole stack that layout, a copy of every layer's codes at once (31 GiB at
    70B). Pinned, each iteration relays out its own layer's codes instead.
    """
    if target_platform() != "tpu":
        return layer
    from jax.experimental.layout import Layout, with_layout_constraint

    def pin(x: jax.Array) -> jax.Array:
        if x.ndim < 2 or not jnp.issubdtype(x.dtype, jnp.integer):
            return x
        return with_layout_constraint(x, Layout(major_to_minor=tuple(range(x.ndim))))

    return jax.tree.map(pin, layer)


def scan_over_layers(body: Callable, init: Any, layers: Any, xs: Any) -> tuple[Any, Any]:
    """`scan` over stacked layers `[L, ...]` and `xs`: `body(carry, layer, x) -> (carry, y)`, `layer` on the device.

    Layers in host memory (`model.offload`) stream one layer ahead: the
    device copy of layer i+1 is issued in iteration i, before layer i's
    compute, and carried into iteration i+1, so the copy overlaps the
    compute and two layers are on the device at a time (the last iteration
    fetches layer L-1 again, one layer of extra traffic). Layers on the device
    are scanned as they are. Only for loops nothing differentiates through the
    layers of (the carried copy would otherwise be kept for the backward
    pass): QST's joint pass, forward-only passes.
    """
    if not any(_host_leaves(layers)):
        # The barrier makes each iteration slice its layer as the stack is laid out. Without it XLA fuses the slice
        # into the NF4 unpacking, lays the codes out as the matmul prefers, and for that copies the whole stack
        # once (a TPU, sharded: 4 GiB a chip of a v5e-8 at 70B; docs/performance.md).
        return scan(lambda carry, lx: body(carry, _as_stacked(jax.lax.optimization_barrier(lx[0])), lx[1]), init,
                    (layers, xs))
    count = jax.tree.leaves(layers)[0].shape[0]

    def fetch(i: jax.Array) -> Any:
        return layer_to_device(jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), layers))

    def step(carry: tuple[Any, Any, jax.Array], x: Any) -> tuple[tuple[Any, Any, jax.Array], Any]:
        inner, current, i = carry
        ahead = fetch(jnp.minimum(i + 1, count - 1))
        inner, y = body(inner, current, x)
        return (inner, ahead, i + 1), y

    (out, _, _), ys = scan(step, (init, fetch(jnp.int32(0)), jnp.int32(0)), xs, length=count)
    return out, ys


# XLA options for a step that streams its layers (`scan_over_layers` over host memory), passed as `jax.jit`'s
# `compiler_options` (never set process-wide). XLA issues each host copy as an async dynamic-slice, which its GPU
# scheduler counts against the async-compute limit (two in flight by default): a layer's thirty copies then run as
# a chain with no compute between them. Raising the limit under the latency-hiding scheduler puts the next layer's
# copies beside this layer's matmuls (tests/aot checks the compiled schedule). Harmless on other backends.
STREAMING_XLA_OPTIONS: dict[str, Any] = {
    "xla_gpu_enable_latency_hiding_scheduler": True,
    "xla_gpu_experimental_parallel_async_compute_limit": 64,
}


def streaming_options(offload: str) -> dict[str, Any] | None:
    """`jax.jit` compiler options for a step over a backbone kept as `model.offload` says (None: XLA's defaults)."""
    return dict(STREAMING_XLA_OPTIONS) if offload != "none" else None


def map(fn: Callable, xs: Any) -> Any:  # noqa: A001 (the name of lax.map)
    """`jax.lax.map(fn, xs)` through `scan`."""
    return scan(lambda _, x: (None, fn(x)), None, xs)[1]
