"""The downsamplers D_i (backbone state to side width) and how the backward pass keeps their input.

`downsample` is D_i itself (adapter, lora, linear, maxpool, avgpool);
`make_downsampler` wraps it so the backward pass keeps h_i in the compute
dtype or as float8 with a per-token scale (`hidden_store`), never both.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from qst_jax.errors import InputError
from qst_jax.methods.side_config import HIDDEN_STORES, SideConfig
from qst_jax.models.layers import Params, norm
from qst_jax.platform import target_platform
from qst_jax.quant.matmul import linear


def downsample(p: Params, h: jax.Array, side: SideConfig, width: int) -> jax.Array:
    """D_i: `[B, T, d]` backbone state to `[B, T, d / r]` side input."""
    kind = side.downsampler
    if kind == "adapter":
        z = linear(jax.nn.silu(linear(h, p["wa"])), p["wb"])
        return norm(p["norm"], z, 1e-5)
    if kind == "lora":
        return linear(linear(h, p["wa"]), p["wb"])
    if kind == "linear":
        return linear(h, p["w"])
    groups = h.reshape(*h.shape[:-1], width, h.shape[-1] // width)
    if kind == "maxpool":
        return jnp.max(groups, axis=-1)
    return jnp.mean(groups.astype(jnp.float32), axis=-1).astype(h.dtype)


FP8_MAX = 448.0  # largest finite float8_e4m3fn


def fp8_store(h: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`h` `[..., d]` as float8_e4m3fn with one float32 scale per token."""
    h32 = h.astype(jnp.float32)
    scale = jnp.max(jnp.abs(h32), axis=-1, keepdims=True) / FP8_MAX
    scale = jnp.where(scale == 0, 1.0, scale)
    return (h32 / scale).astype(jnp.float8_e4m3fn), scale


def fp8_load(q: jax.Array, scale: jax.Array, dtype: Any) -> jax.Array:
    return (q.astype(jnp.float32) * scale).astype(dtype)


def resolve_store(hidden_store: str) -> str:
    """"auto": "fp8" on a GPU (a cheap conversion, half the bytes), "compute" elsewhere.

    On a CPU XLA emulates float8 conversions, slowly (docs/performance.md
    has the cost), and memory is rarely what a CPU run lacks. Decided when
    the step is traced (`models.platform`).
    """
    if hidden_store != "auto":
        return hidden_store
    return "fp8" if target_platform() == "gpu" else "compute"


ON_HOST = "@host"  # a store's suffix: kept in host memory (`model.offload="weights+states"`)


def _to_memory(tree: Any, where: str) -> Any:
    """`tree` moved to the device's "host" or "device" memory inside a traced function (no-op without memory spaces)."""
    space = getattr(getattr(jax, "memory", None), "Space", None)
    if space is None:
        return tree
    return jax.device_put(tree, space.Host if where == "host" else space.Device)


def make_downsampler(side: SideConfig, width: int, hidden_store: str = "compute"):
    """`D(p, h)`, keeping `h` for the backward pass as `hidden_store` says.

    "compute": h as it is (the compute dtype, bf16 by default). "fp8": h is
    kept as float8 with a per-token scale (half of bf16's bytes) and the
    downsampler is re-run on the restored h in the backward pass. "auto":
    fp8 on a GPU, compute elsewhere (`resolve_store`). A store with the
    suffix "@host" ("fp8@host") keeps what it keeps in host memory, copied
    back in the backward pass (a backbone streamed from the host with its
    states: `model.offload="weights+states"`). The backbone state gets no
    gradient either way. Pooling keeps nothing.
    """
    on_host = hidden_store.endswith(ON_HOST)
    store = hidden_store.removesuffix(ON_HOST)
    if store not in HIDDEN_STORES:
        raise InputError(f"hidden_store {hidden_store!r} is not one of {HIDDEN_STORES} (with or without {ON_HOST})")
    store = resolve_store(store)
    plain = lambda p, h: downsample(p, h, side, width)  # noqa: E731
    if side.downsampler in ("maxpool", "avgpool") or (store == "compute" and not on_host):
        return plain

    @jax.custom_vjp
    def stored(p: Params, h: jax.Array) -> jax.Array:
        return plain(p, h)

    def forward(p: Params, h: jax.Array):
        kept = fp8_store(h) if store == "fp8" else (h,)
        return plain(p, h), (p, _to_memory(kept, "host") if on_host else kept)

    def backward(residuals, g: jax.Array):
        p, kept = residuals
        kept = _to_memory(kept, "device") if on_host else kept
        restored = fp8_load(*kept, g.dtype) if store == "fp8" else kept[0]
        _, vjp = jax.vjp(lambda params: plain(params, restored), p)
        return vjp(g)[0], jnp.zeros(restored.shape, g.dtype)

    stored.defvjp(forward, backward)
    return stored
