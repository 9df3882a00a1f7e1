"""README and docs/ stay true: Python blocks run as written; shell commands parse.

Python blocks of one file run in order in one namespace (later blocks use
earlier names). Shell commands are checked against each tool's own argument
parser and config schema; what they do when run is covered by the tests named
in COVERED_BY.
"""

from __future__ import annotations

import pathlib
import re
import shlex

import pytest

REPO = pathlib.Path(__file__).parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

COVERED_BY = {
    "qst-train": "tests/train/test_trainer.py, tests/train/test_real_learning.py (the default recipe, fewer steps)",
    "qst-generate": "tests/eval/test_tasks.py::test_qst_generate_file_and_errors, tests/generate/",
    "qst-eval": "tests/eval/test_tasks.py",
    "qst-quantize": "tests/test_docs.py::test_quantize_demo_prints_bits_per_parameter",
    "qst-serve": "tests/serve/test_server.py (a live server driven by the openai client)",
    "qst-export": "tests/test_hub_push.py (a Hub served on 127.0.0.1)",
    "pytest": "CI itself",
}


def _blocks(path: pathlib.Path, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", path.read_text(), flags=re.S)


@pytest.mark.parametrize("path", [p for p in DOCS if _blocks(p, "python")], ids=lambda p: p.name)
def test_python_blocks_run(path, monkeypatch):
    monkeypatch.chdir(REPO)
    namespace: dict = {}
    for block in _blocks(path, "python"):
        exec(compile(block, f"{path.name}:python", "exec"), namespace)


def _commands() -> list[list[str]]:
    commands = []
    for path in DOCS:
        for block in _blocks(path, "bash"):
            for line in block.replace("\\\n", " ").splitlines():  # a line continued with a backslash is one
                line = line.split("#")[0].strip()
                if not line:
                    continue
                for part in line.split("&&"):
                    argv = shlex.split(part)
                    if argv and argv[0].startswith(".venv/bin/"):
                        argv[0] = argv[0].removeprefix(".venv/bin/")
                        commands.append(argv)
    return commands


COMMANDS = _commands()


def test_readme_has_the_two_commands_first():
    blocks = _blocks(REPO / "README.md", "bash")
    assert blocks[0].strip().splitlines()[-1] == "bash scripts/setup.sh && .venv/bin/qst-train --config configs/default.py"
    assert blocks[1].strip().splitlines()[-1] == "bash scripts/setup.sh && .venv/bin/python -m pytest -q"
    assert (REPO / ".ci" / "run").read_text().count("bash scripts/setup.sh && .venv/bin/python -m pytest -q") == 1


@pytest.mark.parametrize("argv", COMMANDS, ids=[" ".join(a)[:60] for a in COMMANDS])
def test_shell_command_parses(argv):
    tool, args = argv[0], argv[1:]
    assert tool in COVERED_BY or tool == "python", f"{tool}: no test covers it"
    if tool == "qst-train":
        from qst_jax.train.config import base_config

        config = [a for a in args if a.startswith("--config=") or a == "--config"]
        path = args[args.index("--config") + 1] if "--config" in args else config[0].split("=", 1)[1]
        assert (REPO / path).is_file()
        keys = base_config()
        for override in (a for a in args if a.startswith("--config.")):
            section, name = override.removeprefix("--config.").split("=")[0].split(".")
            assert name in keys[section], override
    elif tool in ("qst-generate", "qst-eval", "qst-quantize", "qst-serve", "qst-export"):
        module = {"qst-generate": "generate", "qst-eval": "eval", "qst-quantize": "quantize", "qst-serve": "serve",
                  "qst-export": "export"}[tool]
        import importlib

        importlib.import_module(f"qst_jax.cli.{module}").build_parser().parse_args(args)
    elif tool == "python":
        script = args[0] if args[0] != "-m" else None
        assert script is None or (REPO / script).is_file(), script


def test_quantize_demo_prints_bits_per_parameter(capsys):
    from qst_jax.cli import quantize

    assert quantize.main(["--random", "4096x4096"]) == 0
    out = capsys.readouterr().out
    assert "4096x4096" in out and "4.1270" in out


def test_every_script_and_study_has_a_line_in_readme():
    """README's Scripts section names each user tool in scripts/ and each study in benchmarks/studies/."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Scripts"):]
    files = [f"scripts/{p.name}" for p in sorted((REPO / "scripts").iterdir()) if p.suffix in (".py", ".sh")]
    files += [f"benchmarks/studies/{p.name}" for p in sorted((REPO / "benchmarks" / "studies").glob("*.py"))]
    assert [f for f in files if f"| `{f}" not in section] == []
