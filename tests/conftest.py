"""Shared test fixtures and paths."""

from __future__ import annotations

import os
import pathlib
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# One persistent XLA compilation cache for the whole test run: the workers and the CLI subprocesses they
# start compile many identical programs (the tiny fixtures' steps); each is compiled once. Keyed by the
# program, so a hit is the same executable.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"qst-jax-tests-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import pytest  # noqa: E402

import qst_jax  # noqa: E402,F401  (before jax starts: no CUDA attempt where only the compile plugin is installed)

TESTDATA = pathlib.Path(__file__).parent / "testdata"


def pytest_collection_modifyitems(config, items):
    import jax

    has_gpu = any(d.platform == "gpu" for d in jax.devices())
    skip_gpu = pytest.mark.skip(reason="needs a GPU")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def testdata() -> pathlib.Path:
    return TESTDATA
