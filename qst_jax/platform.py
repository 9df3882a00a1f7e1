"""Which platform a program is traced for: the default backend, or the GPU or TPU `qst_jax.aot` compiles for.

A choice that depends on the hardware (the backward's float8 store is cheap
on a GPU and emulated, slowly, on a CPU; a TPU dequantizes NF4 without
interleaving its nibbles) asks `target_platform()` while the program is
traced; `qst_jax.aot` traces inside `targeting("gpu")` or `targeting("tpu")`,
so a deviceless compile makes the target's choices on a CPU machine.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import jax

_TARGET = contextvars.ContextVar("qst_jax_target_platform", default=None)


@contextlib.contextmanager
def targeting(platform: str) -> Iterator[None]:
    """While active, `target_platform()` is `platform` ("gpu", "cpu", ...)."""
    token = _TARGET.set(platform)
    try:
        yield
    finally:
        _TARGET.reset(token)


def target_platform() -> str:
    """The platform being traced for: `targeting`'s, else `jax.default_backend()`."""
    return _TARGET.get() or jax.default_backend()
