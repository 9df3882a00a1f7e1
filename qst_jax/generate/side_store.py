"""The side networks an engine serves: on the host by name, on the device in one stack per shape (LRU).

    store = SideStore(backbone.cfg, {"a": (model_a, params_a)}, capacity=64)
    store.add("b", model_b, params_b)          # while the engine runs (under its lock)
    stack, index = store.route("b", pin=True)  # resident on the device, kept there while pinned
    core.bind_sides(tuple(store.stacks), routes)  # what `methods.IndexedSides` takes, inside the engine's programs

Every loaded side network's float32 params stay on the host. Each side
shape (`side_set.shape_of`) has a device stack of `capacity` members, filled
as requests ask for them; when it is full, the least recently used member
that no running request holds is replaced. A stack's size never changes, so
the decode step compiles once per set of shapes, whatever is loaded.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qst_jax.errors import QSTError
from qst_jax.methods.indexed_sides import IndexedSides
from qst_jax.methods.side_config import SideConfig
from qst_jax.methods.side_set import shape_of
from qst_jax.models.config import ModelConfig
from qst_jax.models.layers import Params


class SideStoreError(QSTError, ValueError):
    """A side network that cannot be served (not QST, not an LM, a full device stack)."""


@functools.partial(jax.jit, donate_argnums=0)
def _put(stack: Params, params: Params, index: jax.Array) -> Params:
    """Member `index` of `stack` set to `params`, in place (the old stack is donated)."""
    return jax.tree.map(lambda s, p: s.at[index].set(p.astype(s.dtype)), stack, params)


class SideStore:
    """Loaded QST side networks (see the module docstring).

    Args:
      cfg: the backbone's ModelConfig.
      sides: `{name: (QSTModel, params)}` to start with.
      capacity: device stack size per side shape.
      dtype: the compute dtype of the served method.
    """

    def __init__(self, cfg: ModelConfig, sides: Mapping[str, tuple[Any, Params]] | None = None, *,
                 capacity: int = 64, dtype: Any = jnp.bfloat16):
        if capacity < 1:
            raise SideStoreError(f"capacity {capacity} must be at least 1")
        self.cfg, self.capacity, self.dtype = cfg, capacity, dtype
        self.host: dict[str, tuple[int, Params]] = {}  # name -> (shape index, numpy params)
        self.shapes: list[SideConfig] = []
        self.stacks: list[Params] = []
        self.slots: list[list[str | None]] = []  # per shape: which name each stack index holds
        self.pins: collections.Counter = collections.Counter()  # (shape, index) -> running requests
        self.recent: collections.OrderedDict[str, None] = collections.OrderedDict()  # resident names, LRU first
        self._method: IndexedSides | None = None
        self.device_loads = 0  # side networks copied from the host into a device stack so far
        for name, (model, params) in (sides or {}).items():
            self.add(name, model, params)

    def __contains__(self, name: str) -> bool:
        return name in self.host

    def names(self) -> list[str]:
        return list(self.host)

    def host_bytes(self) -> int:
        """Bytes of the loaded side networks' host copies (float32)."""
        return sum(x.nbytes for _, params in self.host.values() for x in jax.tree.leaves(params))

    @staticmethod
    def prepare(name: str, model: Any, params: Params) -> Params:
        """`params` as the host keeps them (float32 numpy), checked to be a QST LM side network.

        The work of a load that needs no engine step to wait: call it before
        taking the engine's lock; `add` then only files the result.
        """
        if getattr(model, "name", None) != "qst" or model.task != "lm":
            raise SideStoreError(f"side {name!r}: only QST language-model side networks are served "
                                 f"(this is {getattr(model, 'name', type(model).__name__)}, task "
                                 f"{getattr(model, 'task', '?')})")
        return jax.tree.map(lambda x: np.asarray(x, np.float32), params)

    def stack_shape(self, params: Params) -> Params:
        """The device stack a side network with `params` goes into: `jax.ShapeDtypeStruct` leaves `[capacity, ...]`."""
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct((self.capacity, *np.shape(x)), jnp.float32), params)

    def method_with(self, model: Any) -> IndexedSides:
        """The served method once `model`'s side shape is among the stacks (built, not adopted: see `add`)."""
        shapes = tuple(self.shapes)
        if shape_of(model.side) not in shapes:
            shapes += (shape_of(model.side),)
        return IndexedSides(self.cfg, shapes, dtype=self.dtype)

    def add(self, name: str, model: Any, params: Params, method: IndexedSides | None = None) -> None:
        """Loads (or replaces) side network `name` on the host; it reaches the device when a request asks.

        `params` from `prepare` are filed as they are (no copy). `method`: the
        `method_with(model)` whose programs the caller compiled ahead; it
        becomes `method()` when the stacks are then what it was built for.
        """
        params = self.prepare(name, model, params)
        shape = shape_of(model.side)
        if shape not in self.shapes:
            self.shapes.append(shape)
            self.stacks.append(jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), self.stack_shape(params)))
            self.slots.append([None] * self.capacity)
            self._method = method if method is not None and method.shapes == tuple(self.shapes) else None
        if name in self.host:
            self.remove(name)
        self.host[name] = (self.shapes.index(shape), params)

    def remove(self, name: str) -> bool:
        """Unloads `name` (requests running on it finish; its stack entry is reused once they have)."""
        if name not in self.host:
            return False
        shape, _ = self.host.pop(name)
        self.recent.pop(name, None)
        slots = self.slots[shape]
        if name in slots:
            index = slots.index(name)
            slots[index] = None if not self.pins[(shape, index)] else f"\0{name}"  # held until unpinned
        return True

    def method(self) -> IndexedSides:
        if self._method is None:
            self._method = IndexedSides(self.cfg, tuple(self.shapes), dtype=self.dtype)
        return self._method

    def route(self, name: str | None, pin: bool = False) -> tuple[int, int]:
        """(stack, index) of `name` on the device, loading it there first (None: the base model, (-1, 0))."""
        if name is None:
            return (-1, 0)
        if name not in self.host:
            raise SideStoreError(f"side {name!r} is not loaded")
        shape, params = self.host[name]
        slots = self.slots[shape]
        if name in slots:
            index = slots.index(name)
        else:
            index = self._free_index(shape)
            self.stacks[shape] = _put(self.stacks[shape], params, np.int32(index))
            self.device_loads += 1
            old = slots[index]
            if old is not None:
                self.recent.pop(old, None)
            slots[index] = name
        self.recent.pop(name, None)
        self.recent[name] = None
        if pin:
            self.pins[(shape, index)] += 1
        return (shape, index)

    def _free_index(self, shape: int) -> int:
        slots = self.slots[shape]
        if None in slots:
            return slots.index(None)
        for name in self.recent:  # least recently used first
            if name in slots and not self.pins[(shape, slots.index(name))]:
                return slots.index(name)
        raise SideStoreError(f"all {self.capacity} device entries of this side shape are in use by running "
                             "requests; raise --side-capacity or wait")

    def compile_put(self, params: Params) -> None:
        """Compiles the update of the stack that side network `params` (from `prepare`) go into, without one."""
        _put.lower(self.stack_shape(params), params, np.int32(0)).compile()

    def warmup(self) -> None:
        """Compiles each stack's update (`_put`) by writing its member 0 back unchanged."""
        for shape, stack in enumerate(self.stacks):
            self.stacks[shape] = _put(stack, jax.tree.map(lambda x: x[0], stack), np.int32(0))

    def unpin(self, route: tuple[int, int]) -> None:
        shape, index = (int(x) for x in route)
        if shape < 0:
            return
        self.pins[(shape, index)] -= 1
        held = self.slots[shape][index]
        if not self.pins[(shape, index)] and held is not None and held.startswith("\0"):
            self.slots[shape][index] = None  # an unloaded side's entry, free now its last request is done
