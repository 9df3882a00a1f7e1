"""The engine's device core: typed state on the device, one small array back per step, one bulk insert."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qst_jax.generate.core import DecodeCore, Rows, bind_sides
from qst_jax.generate.engine import Engine, Request
from qst_jax.generate.side_store import SideStore
from qst_jax.methods import QSTModel, SideConfig
from qst_jax.models import load_backbone
from tests.helpers import IdTokenizer


@pytest.fixture(scope="module")
def backbone(testdata):
    return load_backbone(testdata / "tiny-llama-nf4", dtype=jnp.float32)


@pytest.fixture(scope="module")
def store(backbone):
    model = QSTModel(backbone.cfg, SideConfig(reduction_factor=8), dtype=jnp.float32)
    return SideStore(backbone.cfg, {"a": (model, model.init(jax.random.PRNGKey(0)))}, capacity=2, dtype=jnp.float32)


def test_the_state_is_typed_and_a_step_returns_one_small_array(backbone, store):
    core = DecodeCore(store.method(), bind_sides, slots=3, max_len=32)
    state = core.init_state()
    assert {f: (getattr(state, f).dtype, getattr(state, f).shape) for f in
            ("length", "last", "step", "route", "seed", "temperature", "top_k", "top_p")} == {
        "length": (jnp.int32, (3,)), "last": (jnp.int32, (3,)), "step": (jnp.int32, (3,)),
        "route": (jnp.int32, (3, 2)), "seed": (jnp.uint32, (3,)), "temperature": (jnp.float32, (3,)),
        "top_k": (jnp.int32, (3,)), "top_p": (jnp.float32, (3,))}
    after, tokens = jax.eval_shape(core.generate, backbone.params, tuple(store.stacks), state)
    assert (tokens.shape, tokens.dtype) == ((3,), jnp.int32)  # the only array a step gives the host
    assert jax.tree.structure(after) == jax.tree.structure(state)


def test_one_insert_writes_every_admitted_row_and_drops_padding(backbone, store):
    core = DecodeCore(store.method(), bind_sides, slots=3, max_len=32)
    state = core.init_state()
    rows = Rows.padding(2, 3)  # row 0 -> slot 2; row 1 is padding (slot 3: dropped)
    rows.slot[0], rows.length[0], rows.seed[0], rows.temperature[0], rows.top_k[0] = 2, 4, 2**31 - 1, 0.5, 7
    ids = np.zeros((2, 16), np.int32)
    ids[0, :4] = [5, 17, 99, 300]
    prefix, first = core.prefill(backbone.params, tuple(store.stacks), ids, rows)
    before = jax.tree.map(np.asarray, state)
    state = core.insert(state, prefix, first, rows)
    assert np.asarray(state.length).tolist() == [0, 0, 4] and np.asarray(state.step).tolist() == [0, 0, 1]
    assert np.asarray(state.seed).tolist() == [0, 0, 2**31 - 1] and np.asarray(state.top_k).tolist() == [0, 0, 7]
    assert int(state.last[2]) == int(first[0])
    for new, old, written in zip(jax.tree.leaves(state.caches), jax.tree.leaves(before.caches),
                                 jax.tree.leaves(prefix)):
        np.testing.assert_array_equal(np.asarray(new)[:, :2], old[:, :2])  # slots 0 and 1 untouched
        np.testing.assert_array_equal(np.asarray(new)[:, 2, :16], np.asarray(written)[:, 0])


def test_a_decode_step_sends_the_device_nothing(backbone, store):
    """Once requests are admitted, a step's inputs are all on the device already: no host-to-device copy."""
    engine = Engine(backbone, IdTokenizer(), slots=2, max_len=64, sides=store)
    requests = [engine.submit(Request([5, 17, 99], side=s, max_tokens=8, eos_ids=[], temperature=t, seed=3))
                for s, t in (("a", 0.0), (None, 1.0))]
    engine.step()  # admission: the prompts go to the device
    with jax.transfer_guard_host_to_device("disallow"):
        for _ in range(4):
            engine.step()
    engine.generate(requests)
    alone = Engine(backbone, IdTokenizer(), slots=2, max_len=64, sides=store)
    assert [alone.generate([Request([5, 17, 99], side=s, max_tokens=8, eos_ids=[], temperature=t, seed=3)])[0].tokens
            for s, t in (("a", 0.0), (None, 1.0))] == [r.tokens for r in requests]
