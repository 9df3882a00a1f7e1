"""Shared test fixtures and paths."""

from __future__ import annotations

import os
import pathlib

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# One persistent XLA compilation cache for the whole test run: the test
# processes, the CLI subprocesses and the notebook kernel compile many of the
# same programs (the tiny model's train step, SmolLM2's forward). A size bound
# turns on jax's file locking, so concurrent processes never read a half-written
# entry. Set JAX_COMPILATION_CACHE_DIR yourself to move it; delete it any time.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(pathlib.Path(__file__).parents[1] / ".cache" / "jax-tests"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 * 2**30))

import pytest  # noqa: E402

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
