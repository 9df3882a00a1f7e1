"""Config dataclass fields that say what the run config makes of them: its key, its values, its role.

`SideConfig`, `SideOptions` and `QLoRAConfig` declare their fields with
`setting`; the run config's sections (`train.config.base_config`), their
validation, the sweepable and shape-changing keys are read off that metadata,
so each setting is written once.
"""

from __future__ import annotations

import dataclasses
from typing import Any


def setting(default: Any, *, key: str | None = None, choices: tuple | None = None, minimum: int | None = None,
            sweep: bool = False, shape: bool = False, init_only: bool = False) -> Any:
    """A config dataclass field and what the run config says of it (`dataclasses.field` metadata).

    Args:
      key: its run-config key ("side.adapter_rank"); None: not a run-config
        key of its own (it comes from another one, as `task` does).
      choices: the values it takes; minimum: the least integer it takes.
      sweep: a sweep may list values of it (`sweep.<name>`).
      shape: a change gives the params other shapes (a resumed run refuses it;
        side networks that differ in it are other groups).
      init_only: it changes the init, never the forward (members that differ
        only in such fields share a group).
    """
    return dataclasses.field(default=default, metadata={
        "key": key, "choices": choices, "minimum": minimum, "sweep": sweep, "shape": shape, "init_only": init_only})


def settings(cls: type) -> tuple[dataclasses.Field, ...]:
    """The fields of a config dataclass made with `setting`, in definition order."""
    return tuple(f for f in dataclasses.fields(cls) if "key" in f.metadata)


def field_problems(values: Any, *, prefix: str = "", classes: tuple[type, ...] = ()) -> list[str]:
    """`"key: problem"` for each `setting` field of `values` (a config dataclass) that its metadata refuses.

    With `classes`, `values` is a run config and each class's fields are read
    at their `key`; otherwise the dataclass's own fields are read, each named
    by its `key` (or `prefix + name` when it has none).
    """
    problems = []
    for cls in classes or (type(values),):
        for f in settings(cls):
            if classes:
                if f.metadata["key"] is None:
                    continue
                section, name = f.metadata["key"].split(".")
                key, value = f.metadata["key"], values[section][name]
            else:
                key, value = f.metadata["key"] or prefix + f.name, getattr(values, f.name)
            choices, minimum = f.metadata["choices"], f.metadata["minimum"]
            if choices is not None and value not in choices:
                problems.append(f"{key}: {value!r} is not one of {choices}")
            elif minimum is not None and (not isinstance(value, int) or isinstance(value, bool) or value < minimum):
                problems.append(f"{key}: {value!r} must be an integer >= {minimum}")
    return problems
