"""A large request body is parsed and tokenized off the event loop (other routes keep answering), and one beyond
--max-body-mb is a 413 naming the limit."""

from __future__ import annotations

import threading

import jax.numpy as jnp
import pytest

from qst_jax.generate.engine import Engine
from qst_jax.models import load_backbone
from qst_jax.serve.app import Server
from tests.helpers import IdTokenizer


class _SlowTokenizer(IdTokenizer):
    """Tokenizes only once `release` is set (a long prompt's tokenizing, made to wait)."""

    def __init__(self):
        self.started, self.release = threading.Event(), threading.Event()

    def __call__(self, text):
        self.started.set()
        self.release.wait(60)
        return type("Encoded", (), {"input_ids": [5, 6, 7]})()


@pytest.fixture(scope="module")
def backbone(testdata):
    return load_backbone(testdata / "tiny-llama-nf4", dtype=jnp.float32)


def test_tokenizing_a_prompt_leaves_the_event_loop_free(backbone):
    from fastapi.testclient import TestClient

    tokenizer = _SlowTokenizer()
    engine = Engine(backbone, tokenizer, slots=2, max_len=64)
    server = Server(backbone, tokenizer, engine, base_name="base")
    with TestClient(server.app()) as client:
        answer = {}
        sent = threading.Thread(target=lambda: answer.update(client.post(
            "/v1/completions", json={"model": "base", "prompt": "x" * 2_000_000, "max_tokens": 2}).json()))
        sent.start()
        assert tokenizer.started.wait(60)
        assert client.get("/health").status_code == 200  # answered while the prompt is still being tokenized
        assert sent.is_alive()
        tokenizer.release.set()
        sent.join(120)
        assert answer["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


def test_a_body_beyond_the_limit_is_413(backbone):
    from fastapi.testclient import TestClient

    engine = Engine(backbone, IdTokenizer(), slots=2, max_len=64)
    server = Server(backbone, IdTokenizer(), engine, base_name="base", max_body_bytes=1000)
    with TestClient(server.app()) as client:
        response = client.post("/v1/completions", json={"model": "base", "prompt": "x" * 2000})
        assert response.status_code == 413
        assert response.json()["error"]["message"] == ("the body is 2,028 bytes; this server takes at most 1,000 "
                                                       "(--max-body-mb)")
        assert client.post("/v1/completions", json={"model": "base", "prompt": [5], "max_tokens": 1}).status_code == 200
