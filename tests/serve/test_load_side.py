"""Loading a side network reads, checks and converts it with the engine running: only the filing takes the lock."""

from __future__ import annotations

import threading

import jax
import jax.numpy as jnp
import numpy as np

import qst_jax.serve.app as app_module
from qst_jax.generate.engine import Engine, Request
from qst_jax.generate.side_store import SideStore
from qst_jax.methods import QSTModel, SideConfig, export_side
from qst_jax.models import load_backbone
from qst_jax.serve.app import Server
from tests.helpers import IdTokenizer


def _lock_free(lock) -> bool:
    """Whether another thread can take `lock` now (an engine step could run)."""
    got = []
    thread = threading.Thread(target=lambda: got.append(lock.acquire(timeout=0.2) and (lock.release() or True)))
    thread.start()
    thread.join()
    return got == [True]


def test_load_side_takes_the_engine_lock_only_to_file_it(testdata, tmp_path, monkeypatch):
    backbone = load_backbone(testdata / "tiny-llama-nf4", dtype=jnp.float32)
    model = QSTModel(backbone.cfg, SideConfig(reduction_factor=8), dtype=jnp.float32)
    export_side(str(tmp_path / "c"), model, model.init(jax.random.PRNGKey(7)), backbone.cfg)
    engine = Engine(backbone, IdTokenizer(), slots=2, max_len=64, sides=SideStore(backbone.cfg, dtype=jnp.float32))
    server = Server(backbone, IdTokenizer(), engine, base_name="base", side_root=str(tmp_path))
    seen = {}
    real_load, real_add = app_module.load_tuned, engine.sides.add

    def load(*args, **kwargs):
        seen["steps could run while reading"] = _lock_free(engine.lock)
        return real_load(*args, **kwargs)

    def add(name, model, params):
        seen["filed under the lock"] = not _lock_free(engine.lock)
        seen["already host arrays"] = all(isinstance(x, np.ndarray) and x.dtype == np.float32
                                          for x in jax.tree.leaves(params))
        return real_add(name, model, params)

    monkeypatch.setattr(app_module, "load_tuned", load)
    monkeypatch.setattr(engine.sides, "add", add)
    assert server.load_side("c", "c") == {"status": "loaded", "name": "c"}
    assert seen == {"steps could run while reading": True, "filed under the lock": True, "already host arrays": True}
    assert engine.generate([Request([5, 6, 7], side="c", max_tokens=2, eos_ids=[])])[0].finish_reason == "length"
    engine.generate([Request([5, 6, 7], side="c", max_tokens=2, eos_ids=[])])  # resident now: no second copy
    side_bytes = sum(x.size * 4 for x in jax.tree.leaves(model.init(jax.random.PRNGKey(0))))
    metrics = server.metrics.text(engine).decode()
    assert "qst_side_device_loads 1.0" in metrics and f"qst_side_networks_host_bytes {float(side_bytes)}" in metrics
