"""Loading a side network reads, checks, converts it (and compiles for a new shape) with the engine running: only
the filing takes the lock."""

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

    def add(name, model, params, **kwargs):
        seen["filed under the lock"] = not _lock_free(engine.lock)
        seen["already host arrays"] = all(isinstance(x, np.ndarray) and x.dtype == np.float32
                                          for x in jax.tree.leaves(params))
        return real_add(name, model, params, **kwargs)

    monkeypatch.setattr(app_module, "load_tuned", load)
    monkeypatch.setattr(engine.sides, "add", add)
    assert server.load_side("c", "c") == {"status": "loaded", "name": "c"}
    assert seen == {"steps could run while reading": True, "filed under the lock": True, "already host arrays": True}
    assert engine.generate([Request([5, 6, 7], side="c", max_tokens=2, eos_ids=[])])[0].finish_reason == "length"
    engine.generate([Request([5, 6, 7], side="c", max_tokens=2, eos_ids=[])])  # resident now: no second copy
    side_bytes = sum(x.size * 4 for x in jax.tree.leaves(model.init(jax.random.PRNGKey(0))))
    metrics = server.metrics.text(engine).decode()
    assert "qst_side_device_loads 1.0" in metrics and f"qst_side_networks_host_bytes {float(side_bytes)}" in metrics


def test_a_new_side_shape_compiles_off_the_decode_path(testdata):
    backbone = load_backbone(testdata / "tiny-llama-nf4", dtype=jnp.float32)

    def side(seed, **options):
        model = QSTModel(backbone.cfg, SideConfig(reduction_factor=8, **options), dtype=jnp.float32)
        params = model.init(jax.random.PRNGKey(seed))
        params["up"]["w"] = jax.random.normal(jax.random.PRNGKey(seed + 1), params["up"]["w"].shape) * 0.4
        return model, params

    def run(engine, requests, running=()):
        for r in requests:
            engine.submit(r)
        while any(r.finish_reason is None for r in [*requests, *running]):
            engine.step()
        return [r.tokens for r in [*requests, *running]]

    engine = Engine(backbone, IdTokenizer(), slots=3, max_len=64, sides=SideStore(backbone.cfg, {"a": side(1)},
                                                                                 dtype=jnp.float32))
    engine.warmup()
    running = engine.submit(Request([5, 6, 7], side="a", max_tokens=12, eos_ids=[]))
    engine.step()
    free_while_compiling, real_put = [], engine.sides.compile_put
    engine.sides.compile_put = lambda params: free_while_compiling.append(_lock_free(engine.lock)) or real_put(params)
    engine.load_side("pool", *side(5, downsampler="avgpool"))  # a second side shape: a new stack and new programs
    compiles = []
    listen = lambda event, seconds, **kw: compiles.append(event) if event.endswith("backend_compile_duration") else None  # noqa: E731
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        new = [Request([9, 10, 11, 12], side="pool", max_tokens=4, eos_ids=[]),
               Request(list(range(20, 40)), side="pool", max_tokens=4, eos_ids=[])]  # buckets 16 and 32
        got = run(engine, new, [running])
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert free_while_compiling == [True] and compiles == []  # steps could run meanwhile; none compiled after it
    assert engine.compiled == {(p, (3, b)) for p in ("prefill", "insert") for b in (16, 32, 64)} | {("decode", 3)}
    alone = Engine(backbone, IdTokenizer(), slots=3, max_len=64,
                   sides=SideStore(backbone.cfg, {"a": side(1), "pool": side(5, downsampler="avgpool")},
                                   dtype=jnp.float32))
    for r, tokens in zip([*new, running], got):
        assert tokens == run(alone, [Request(r.prompt, side=r.side, max_tokens=r.max_tokens, eos_ids=[])])[0]
