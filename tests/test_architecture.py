"""The house rules, checked on the source: imports run downward only, and methods are used through their interface."""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).parents[1] / "qst_jax"

# Which rooms each room may import (besides itself and the package root). Downward only:
# {tree, files, platform} <- quant <- models <- methods <- {eval, generate} <- train <- cli; data, parallel and aot beside them.
BOTTOM = {"errors", "environment", "platform", "hub", "tree", "files", "checkpoints", "run_dir"}
ALLOWED = {
    "errors": set(),
    "environment": set(),
    "platform": set(),
    "hub": {"errors"},
    "tree": set(),
    "files": set(),
    "checkpoints": {"errors", "tree"},
    "run_dir": {"errors", "files"},
    "quant": BOTTOM,
    "models": {"quant"} | BOTTOM,
    "data": BOTTOM,
    "methods": {"models", "quant"} | BOTTOM,
    "parallel": {"models", "quant"} | BOTTOM,
    "eval": {"data", "methods", "models", "quant"} | BOTTOM,
    "generate": {"data", "methods", "models", "quant"} | BOTTOM,
    "train": {"aot", "data", "eval", "methods", "models", "parallel", "quant"} | BOTTOM,
    "aot": {"models", "quant"} | BOTTOM,
    "nnx": {"methods", "models", "quant"} | BOTTOM,  # the Flax front door; nothing imports it
    "serve": {"data", "generate", "methods", "models", "quant"} | BOTTOM,
    "cli": {"aot", "data", "eval", "generate", "methods", "models", "parallel", "quant", "serve", "train"} | BOTTOM,
}
METHOD_CLASSES = {"QSTModel", "QLoRAModel", "FrozenModel"}


def _modules() -> list[tuple[str, pathlib.Path, ast.Module]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).parts
        room = parts[0].removesuffix(".py") if len(parts) > 1 or parts[0] != "__init__.py" else ""
        found.append((room, path, ast.parse(path.read_text())))
    return found


def _imports(tree: ast.Module) -> list[str]:
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names += [a.name for a in node.names]
    return [n for n in names if n.startswith("qst_jax.")]


def test_every_room_is_known():
    rooms = {p.name.removesuffix(".py") for p in PACKAGE.iterdir() if p.name != "__init__.py" and not p.name.startswith("_")}
    assert rooms - {"__pycache__"} == set(ALLOWED)


def test_imports_run_downward_only():
    upward = []
    for room, path, tree in _modules():
        for name in _imports(tree):
            target = name.split(".")[1]
            if room and target != room and target not in ALLOWED[room]:
                upward.append(f"{path.relative_to(PACKAGE.parent)} imports {name}")
    assert upward == []


def test_only_cli_imports_the_trainer():
    importers = [str(path.relative_to(PACKAGE.parent)) for room, path, tree in _modules()
                 if room != "cli" and path.name != "trainer.py"
                 and any(n.startswith("qst_jax.train.trainer") for n in _imports(tree))]
    assert importers == []


def test_no_import_circles():
    """No module imports (at any depth, lazily or not) a module that imports it back."""
    modules = {".".join(("qst_jax", *p.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__"): t
               for _, p, t in _modules()}
    graph: dict[str, set[str]] = {}
    for name, tree in modules.items():
        targets = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module in modules:
                # `from qst_jax.models import loops` imports the submodule, not the package's __init__
                subs = {f"{node.module}.{a.name}" for a in node.names} & set(modules)
                targets |= subs if len(subs) == len(node.names) else subs | {node.module}
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name in modules}
        graph[name] = targets - {name}
    circles = []
    for start in sorted(graph):
        seen, stack = set(), list(graph[start])
        while stack:
            node = stack.pop()
            if node == start:
                circles.append(start)
                break
            if node not in seen:
                seen.add(node)
                stack.extend(graph.get(node, ()))
    assert circles == []


def test_no_isinstance_on_method_classes_outside_methods():
    found = []
    for room, path, tree in _modules():
        if room == "methods":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance" and len(node.args) == 2:
                names = {n.id for n in ast.walk(node.args[1]) if isinstance(n, ast.Name)}
                names |= {n.attr for n in ast.walk(node.args[1]) if isinstance(n, ast.Attribute)}
                if names & METHOD_CLASSES:
                    found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert found == []


def test_the_package_root_imports_only_the_bottom_rooms():
    """`import qst_jax` runs no room's code but the environment check and the error base."""
    root = PACKAGE / "__init__.py"
    names = {n.split(".")[1] for n in _imports(ast.parse(root.read_text()))}
    assert names <= {"environment", "errors"}, names


def test_every_module_states_its_one_job():
    """Each module opens with a docstring whose first line says what it holds (its seam)."""
    missing = [str(p.relative_to(PACKAGE.parent)) for _, p, tree in _modules()
               if not (ast.get_docstring(tree) or "").strip()]
    assert missing == []


def test_every_error_shares_the_base():
    """Every exception class qst_jax defines derives from QSTError (one `except` catches them all)."""
    import importlib
    import inspect
    import pkgutil

    import qst_jax
    from qst_jax.errors import QSTError

    outside = []
    for info in pkgutil.walk_packages(qst_jax.__path__, "qst_jax."):
        module = importlib.import_module(info.name)
        outside += [f"{info.name}.{name}" for name, obj in vars(module).items()
                    if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == info.name
                    and not issubclass(obj, QSTError)]
    assert outside == []
