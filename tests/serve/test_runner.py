"""The engine thread: a burst that arrives over milliseconds is prefilled in one call, whether the other slots
are free or decoding, and batching it so changes no token."""

from __future__ import annotations

import asyncio
import time

import jax.numpy as jnp
import pytest

from qst_jax.generate.engine import Engine, Request
from qst_jax.models import load_backbone
from qst_jax.serve.runner import EngineRunner, auto_admit_wait
from tests.helpers import IdTokenizer


@pytest.fixture(scope="module")
def backbone(testdata):
    return load_backbone(testdata / "tiny-llama-nf4", dtype=jnp.float32)


def _burst(backbone, admit_wait: float, apart: bool = False, running: bool = False) -> tuple[Engine, list[Request]]:
    """4 requests of one length bucket into 5 slots (with `running`, one slot decoding a long request meanwhile);
    the 4 run to the end. They arrive as one burst: submitted while the engine thread waits on the engine's lock,
    so no clock decides what a burst is; with `apart`, each after the one before has its first token.
    Returns the engine and the 4 requests."""
    engine = Engine(backbone, IdTokenizer(), slots=5, max_len=1024, prefill_rows=4)
    engine.generate([Request([3] * 20, max_tokens=2), Request([5, 6, 7], max_tokens=2)])  # compiles what runs here
    engine.prefills = engine.decode_steps = 0
    runner = EngineRunner(engine, admit_wait=admit_wait)
    runner.start()
    loop = asyncio.new_event_loop()  # never run: the callbacks only queue on it
    long = Request([3] * 20, max_tokens=1000, eos_ids=[])  # bucket 32: its own prefill
    requests = [Request([5 + i, 6, 7], max_tokens=3, eos_ids=[]) for i in range(4)]
    try:
        if running:
            runner.submit(long, loop)
            while not long.tokens:
                time.sleep(0.01)
        if apart:
            for r in requests:
                runner.submit(r, loop)
                while not r.tokens and r.finish_reason is None:
                    time.sleep(0.005)
        else:
            with engine.lock:  # the engine thread's next step waits here: all four are queued before it runs
                for r in requests:
                    runner.submit(r, loop)
        deadline = time.monotonic() + 60
        while any(r.finish_reason is None for r in requests) and time.monotonic() < deadline:
            time.sleep(0.01)
        if running:
            assert long.finish_reason is None  # still decoding when the burst was done
            runner.cancel(long)
    finally:
        assert runner.drain(timeout=30)
        loop.close()
    assert [r.finish_reason for r in requests] == ["length"] * 4
    return engine, requests


def test_a_burst_into_free_slots_is_prefilled_together(backbone):
    engine, _ = _burst(backbone, admit_wait=0.3)
    assert engine.prefills == 1  # not the first request alone and the other three after it
    assert engine.decode_steps == 2  # all four decode together: 1 token from the prefill, 2 from decode steps


def test_a_burst_beside_running_slots_is_admitted_together_while_they_decode(backbone):
    engine, _ = _burst(backbone, admit_wait=0.3, running=True)
    assert engine.prefills == 2  # the long request's, then the whole burst's


def test_without_the_wait_the_first_request_is_prefilled_alone(backbone):
    engine, apart = _burst(backbone, admit_wait=0.0, apart=True)
    assert engine.prefills == 4 and engine.decode_steps > 2
    _, together = _burst(backbone, admit_wait=0.3)
    assert [r.tokens for r in apart] == [r.tokens for r in together]  # batching changed no token


def test_the_default_wait_is_a_twentieth_of_a_prefill_within_bounds(backbone):
    engine = Engine(backbone, IdTokenizer(), slots=2, max_len=64)
    assert engine.prefill_seconds is None and auto_admit_wait(engine) == 0.01  # before any prefill
    engine.generate([Request([5, 6, 7], max_tokens=2, eos_ids=[])])
    assert engine.prefill_seconds > 0
    for seconds, wait in ((0.6, 0.03), (0.01, 0.002), (4.0, 0.05)):
        engine.prefill_seconds = seconds
        assert auto_admit_wait(engine) == pytest.approx(wait)
