"""The engine thread: a burst that arrives over milliseconds while every slot is free is prefilled in one call."""

from __future__ import annotations

import asyncio
import time

import jax.numpy as jnp
import pytest

from qst_jax.generate.engine import Engine, Request
from qst_jax.models import load_backbone
from qst_jax.serve.runner import EngineRunner


class _Tokens:
    eos_token_id = None

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(map(str, ids))


@pytest.fixture(scope="module")
def backbone(testdata):
    return load_backbone(testdata / "tiny-llama-nf4", dtype=jnp.float32)


def _burst(backbone, admit_wait: float, gap: float) -> tuple[Engine, list[Request]]:
    """4 requests of one length bucket, `gap` seconds apart, into an idle engine of 4 slots; all run to the end."""
    engine = Engine(backbone, _Tokens(), slots=4, max_len=64, prefill_rows=4)
    engine.warmup()
    runner = EngineRunner(engine, admit_wait=admit_wait)
    runner.start()
    loop = asyncio.new_event_loop()  # never run: the callbacks only queue on it
    requests = [Request([5 + i, 6, 7], max_tokens=3, eos_ids=[]) for i in range(4)]
    try:
        for r in requests:
            runner.submit(r, loop)
            time.sleep(gap)
        deadline = time.monotonic() + 60
        while any(r.finish_reason is None for r in requests) and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        assert runner.drain(timeout=10)
        loop.close()
    assert [r.finish_reason for r in requests] == ["length"] * 4
    return engine, requests


def test_a_burst_into_free_slots_is_prefilled_together(backbone):
    engine, _ = _burst(backbone, admit_wait=0.3, gap=0.02)
    assert engine.prefills == 1  # not the first request alone and the other three after it
    assert engine.decode_steps == 2  # all four decode together: 1 token from the prefill, 2 from decode steps


def test_without_the_wait_the_first_request_is_prefilled_alone(backbone):
    engine, apart = _burst(backbone, admit_wait=0.0, gap=0.3)
    assert engine.prefills >= 2 and engine.decode_steps > 2
    _, together = _burst(backbone, admit_wait=0.3, gap=0.02)
    assert [r.tokens for r in apart] == [r.tokens for r in together]  # batching changed no token
