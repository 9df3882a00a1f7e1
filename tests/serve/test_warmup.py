"""qst-serve answers /health while its programs compile, /ready says when requests are served, and a request sent
during the warm-up waits for it rather than failing."""

from __future__ import annotations

import threading

import jax.numpy as jnp
import pytest

from qst_jax.generate.engine import Engine
from qst_jax.models import load_backbone
from qst_jax.serve.app import Server
from tests.helpers import IdTokenizer


@pytest.fixture(scope="module")
def backbone(testdata):
    return load_backbone(testdata / "tiny-llama-nf4", dtype=jnp.float32)


def _server(backbone, warmup):
    engine = Engine(backbone, IdTokenizer(), slots=2, max_len=64)
    engine.warmup, real = warmup, engine.warmup
    return Server(backbone, IdTokenizer(), engine, base_name="base", drain_timeout=5), real


def test_health_answers_during_the_warm_up_and_ready_after_it(backbone):
    from fastapi.testclient import TestClient

    release = threading.Event()
    server, real = _server(backbone, lambda: (release.wait(60), real()))
    with TestClient(server.app()) as client:
        assert client.get("/health").json() == {"status": "warming_up"}
        assert (client.get("/ready").status_code, client.get("/ready").json()) == (503, {"status": "warming_up"})
        answer = {}
        request = threading.Thread(target=lambda: answer.update(client.post(
            "/v1/completions", json={"model": "base", "prompt": [5, 6, 7], "max_tokens": 3, "temperature": 0}).json()))
        request.start()  # sent while compiling: it waits in the queue
        release.set()
        request.join(120)
        assert answer["choices"][0]["finish_reason"] == "length" and answer["usage"]["completion_tokens"] == 3
        assert client.get("/health").json() == {"status": "ok"}
        assert (client.get("/ready").status_code, client.get("/ready").json()) == (200, {"status": "ready"})
    assert server.status == "ready"


def test_a_failed_warm_up_is_said_and_stops_the_server(backbone):
    from fastapi.testclient import TestClient

    def broken():
        raise RuntimeError("out of device memory")

    server, _ = _server(backbone, broken)
    stopped, lines = threading.Event(), []
    server.on_warmup_failure = stopped.set
    server.start(log=lines.append).join(30)
    assert stopped.is_set() and server.status == "failed"
    assert lines == ["qst-serve: error: the warm-up failed: RuntimeError: out of device memory"]
    with TestClient(server.app()) as client:
        assert client.get("/ready").status_code == 503 and client.get("/health").json() == {"status": "failed"}
