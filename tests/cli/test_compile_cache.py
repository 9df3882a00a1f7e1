"""The command-line tools keep JAX's persistent compilation cache: a restart loads its programs."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import jax

from qst_jax.cli import common
from tests.helpers import tiny_model_dir

REPO = pathlib.Path(__file__).parents[2]


def test_qst_generate_writes_its_programs_to_the_users_cache(testdata, tmp_path):
    model = tiny_model_dir(testdata, tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.update(XDG_CACHE_HOME=str(tmp_path / "cache"), PYTHONPATH=str(REPO), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    args = [sys.executable, "-m", "qst_jax.cli.generate", "--model", str(model), "--prompt", "to be",
            "--max-new-tokens", "2"]
    proc = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert any((tmp_path / "cache" / "qst_jax" / "xla").iterdir())  # the compiled programs, for the next start


def test_the_cache_directory_follows_the_environment(tmp_path, monkeypatch):
    before = jax.config.jax_compilation_cache_dir
    try:
        monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "set"))
        assert common.use_compile_cache(True) == str(tmp_path / "set")
        monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
        assert common.use_compile_cache(True) == str(tmp_path / "xdg" / "qst_jax" / "xla")
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xdg" / "qst_jax" / "xla")
        assert common.use_compile_cache(False) is None and not jax.config.jax_enable_compilation_cache
    finally:
        jax.config.update("jax_enable_compilation_cache", True)
        jax.config.update("jax_compilation_cache_dir", before)
