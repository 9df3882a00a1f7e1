"""The decoding engine: continuous batching changes no output, bounded compiles, the side stack's LRU, sampling."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qst_jax.generate.engine import Engine, EngineError, Request
from qst_jax.generate.sampling import sample_rows
from qst_jax.generate.side_store import SideStore, SideStoreError
from qst_jax.methods import QLoRAModel, QSTModel, SideConfig
from qst_jax.models import load_backbone
from tests.helpers import IdTokenizer


@pytest.fixture(scope="module")
def backbone(testdata):
    return load_backbone(testdata / "tiny-llama-nf4", dtype=jnp.float32)


def _side(cfg, seed, **options):
    model = QSTModel(cfg, SideConfig(reduction_factor=8, **options), dtype=jnp.float32)
    params = model.init(jax.random.PRNGKey(seed))
    params["up"]["w"] = jax.random.normal(jax.random.PRNGKey(seed + 1), params["up"]["w"].shape) * 0.4
    return model, params


PROMPTS = [[5, 17, 99, 300, 42, 7, 8], [11, 12, 13], [900, 1, 2, 3, 4], list(range(40, 60)), [7] * 33]


def _alone(backbone, sides, prompt, side, **kw):
    store = SideStore(backbone.cfg, sides, dtype=jnp.float32)
    engine = Engine(backbone, IdTokenizer(), slots=3, max_len=128, sides=store)
    return engine.generate([Request(prompt, side=side, max_tokens=6, eos_ids=[], **kw)])[0].tokens


def test_continuous_batching_changes_no_output(backbone):
    sides = {"a": _side(backbone.cfg, 1), "b": _side(backbone.cfg, 3), "pool": _side(backbone.cfg, 5,
                                                                                      downsampler="avgpool")}
    store = SideStore(backbone.cfg, sides, dtype=jnp.float32)
    engine = Engine(backbone, IdTokenizer(), slots=3, max_len=128, sides=store)
    route = ["a", None, "pool", "b", "a", "b", None]
    requests = [Request(PROMPTS[i % len(PROMPTS)], side=s, max_tokens=6 - i % 3, eos_ids=[])
                for i, s in enumerate(route)]  # 7 requests through 3 slots, finishing at different steps
    engine.generate(requests)
    for i, (r, s) in enumerate(zip(requests, route)):
        assert r.finish_reason == "length" and len(r.tokens) == 6 - i % 3
        assert r.tokens == _alone(backbone, sides, r.prompt, s)[: len(r.tokens)], (i, s)
    assert requests[0].tokens != requests[4].tokens[:4] or requests[0].prompt != requests[4].prompt
    # the compiled programs: one prefill per power-of-two bucket used, and one decode step
    assert engine.compiled == {(p, (3, b)) for p in ("prefill", "insert") for b in (16, 32, 64)} | {("decode", 3)}


def test_the_device_stack_is_an_lru_of_fixed_size(backbone):
    sides = {n: _side(backbone.cfg, 10 + i) for i, n in enumerate("abc")}
    store = SideStore(backbone.cfg, sides, capacity=2, dtype=jnp.float32)
    engine = Engine(backbone, IdTokenizer(), slots=2, max_len=64, sides=store)
    out = {}
    for name in ["a", "b", "c", "a"]:  # c takes a's entry (least recent), then a takes b's
        out.setdefault(name, engine.generate([Request(PROMPTS[0], side=name, max_tokens=4, eos_ids=[])])[0].tokens)
    assert store.slots[0] == ["c", "a"] and len(store.stacks[0]["gates"]) == 2
    for name in "abc":
        assert out[name] == _alone(backbone, sides, PROMPTS[0], name)[:4]
    assert engine.compiled == {("prefill", (2, 16)), ("insert", (2, 16)), ("decode", 2)}  # the stack's size never changes
    store.pins[(0, 0)] = store.pins[(0, 1)] = 1  # both entries held by running requests
    with pytest.raises(SideStoreError, match=r"all 2 device entries of this side shape are in use"):
        store.route("b")


def test_stops_cancels_and_refusals(backbone):
    engine = Engine(backbone, IdTokenizer(), slots=2, max_len=32)
    free = engine.generate([Request(PROMPTS[1], max_tokens=5, eos_ids=[])])[0]
    stop_at = str(free.tokens[2])
    r = engine.generate([Request(PROMPTS[1], max_tokens=5, eos_ids=[], stop=(stop_at,))])[0]
    assert r.finish_reason == "stop" and stop_at not in r.text and r.text == " ".join(map(str, free.tokens))[
        : r.text.__len__()]
    eos = engine.generate([Request(PROMPTS[1], max_tokens=5, eos_ids=[free.tokens[1]])])[0]
    assert eos.finish_reason == "stop" and eos.tokens == free.tokens[:1]
    long = Request(PROMPTS[1], max_tokens=30, eos_ids=[])
    engine.submit(long)
    engine.step()
    long.cancel()
    engine.step()
    assert long.finish_reason == "cancelled" and engine.busy == 0
    capped = engine.generate([Request(PROMPTS[3], max_tokens=30, eos_ids=[])])[0]
    assert capped.finish_reason == "length" and len(PROMPTS[3]) + len(capped.tokens) == 32  # prompt + completion
    for request, message in ((Request([1] * 32), "prompt: 32 tokens do not fit the context of 32"),
                             (Request([1], max_tokens=0), "max_tokens: 0 must be at least 1"),
                             (Request([1], top_p=0.0), "sampling: temperature 0.0 must be >= 0"),
                             (Request([1], side="x"), "side 'x' is not loaded")):
        with pytest.raises(EngineError, match=message):
            engine.submit(request)


def test_qlora_decodes_through_the_same_slots(backbone):
    model = QLoRAModel(backbone.cfg, rank=4, dtype=jnp.float32)
    params = model.init(jax.random.PRNGKey(0))
    params["lora"]["mlp"]["up"]["b"] = jnp.ones_like(params["lora"]["mlp"]["up"]["b"]) * 0.05
    engine = Engine(backbone, IdTokenizer(), slots=2, max_len=64, model=model, params=params)
    together = engine.generate([Request(p, max_tokens=4, eos_ids=[]) for p in PROMPTS[:3]])
    for r in together:
        alone = Engine(backbone, IdTokenizer(), slots=2, max_len=64, model=model, params=params)
        assert alone.generate([Request(r.prompt, max_tokens=4, eos_ids=[])])[0].tokens == r.tokens
    with pytest.raises(SideStoreError, match=r"only QST language-model side networks are served"):
        SideStore(backbone.cfg, {"q": (model, params)})


def test_sample_rows_depends_on_each_rows_own_seed_and_settings():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 3))
    def draws(temperature, top_k, top_p, n=300):
        out = [sample_rows(logits, jnp.array([s, s + 1, 7]), jnp.array([0, 0, 0]), jnp.full(3, temperature),
                           jnp.full(3, top_k), jnp.full(3, top_p)) for s in range(n)]
        return {int(x[0]) for x in out}
    assert draws(0.0, 0, 1.0, n=5) == {0}
    assert draws(1.0, 2, 1.0) == {0, 1}
    assert draws(1.0, 0, 0.6) == {0, 1}  # 0.5 < 0.6: the second token is needed, the third is not
    assert draws(1.0, 0, 1.0) == {0, 1, 2, 3}
    one = sample_rows(logits[:1], jnp.array([7]), jnp.array([3]), jnp.ones(1), jnp.zeros(1, jnp.int32), jnp.ones(1))
    many = sample_rows(logits, jnp.array([1, 7, 2]), jnp.array([0, 3, 9]), jnp.ones(3), jnp.zeros(3, jnp.int32),
                       jnp.ones(3))
    assert int(one[0]) == int(many[1])  # a row's draw never depends on the other rows
    np.testing.assert_array_equal(np.asarray(sample_rows(logits, jnp.arange(3), jnp.zeros(3, jnp.int32),
                                                         jnp.zeros(3), jnp.zeros(3, jnp.int32), jnp.ones(3))), 0)


def test_warmup_compiles_everything_serving_runs(backbone):
    store = SideStore(backbone.cfg, {"a": _side(backbone.cfg, 1), "b": _side(backbone.cfg, 3)}, dtype=jnp.float32)
    engine = Engine(backbone, IdTokenizer(), slots=3, max_len=100, sides=store)
    engine.warmup()
    assert engine.buckets() == [16, 32, 64, 100]
    compiled = set(engine.compiled)
    assert compiled == {(p, (3, b)) for p in ("prefill", "insert") for b in (16, 32, 64, 100)} | {("decode", 3)}
    compiles = []
    listener = lambda event, seconds, **kw: compiles.append(event) if "backend_compile" in event else None  # noqa
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:  # every bucket, 1 to 3 requests a prefill, sides moving to the device, sampled and greedy rows
        engine.generate([Request(p, side=[None, "a", "b"][i % 3], max_tokens=3, eos_ids=[], temperature=0.7 * (i % 2))
                         for i, p in enumerate(PROMPTS + PROMPTS[:2])])
        engine.generate([Request(PROMPTS[1], side="b", max_tokens=2, eos_ids=[])])
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == [] and engine.compiled == compiled


def _decode_temp_bytes(backbone, capacity: int) -> tuple[int, int]:
    """(XLA's temporary bytes of the engine's compiled decode step, the side stack's bytes) at `capacity`."""
    store = SideStore(backbone.cfg, {"a": _side(backbone.cfg, 1)}, capacity=capacity, dtype=jnp.float32)
    engine = Engine(backbone, IdTokenizer(), slots=2, max_len=64, sides=store)
    core = engine._core()
    compiled = core.generate.lower(backbone.params, engine.model_params(), engine.state).compile()
    return compiled.memory_analysis().temp_size_in_bytes, sum(x.nbytes for x in jax.tree.leaves(store.stacks))


def test_the_decode_step_reads_the_side_stack_in_place(backbone):
    """Each layer gathers its rows' members from the stack: nothing the size of the stack is copied per step."""
    small, _ = _decode_temp_bytes(backbone, 2)
    large, stack = _decode_temp_bytes(backbone, 64)
    assert large - small < stack / 16, (small, large, stack)  # moving it to layer-major order took a whole copy


def test_seeds_are_integers_not_rounded_floats(backbone):
    """Seeds one apart above 2^24 draw differently (a float32 store made them one seed), and 2^31 - 1 stays itself."""
    engine = Engine(backbone, IdTokenizer(), slots=4, max_len=64)
    prompt = [5, 17, 99, 300]
    requests = [Request(prompt, max_tokens=8, temperature=1.0, seed=s, eos_ids=[])
                for s in (123456789, 123456790, 2**31 - 1, 123456789)]
    engine.generate(requests)
    tokens = [r.tokens for r in requests]
    assert tokens[0] != tokens[1] and tokens[0] == tokens[3]  # one seed apart: other draws; the same seed: the same
    alone = Engine(backbone, IdTokenizer(), slots=4, max_len=64).generate(
        [Request(prompt, max_tokens=8, temperature=1.0, seed=123456790, eos_ids=[])])[0]
    assert alone.tokens == tokens[1]  # a seed under load draws what it draws alone
    assert engine.state.seed.dtype == jnp.uint32  # held exactly, on the device
    assert sorted(np.asarray(engine.state.seed).tolist()) == sorted([123456789, 123456790, 2**31 - 1, 123456789])


def test_n_choices_without_a_seed_differ():
    """The OpenAI API's n=2 with temperature > 0 and no seed gives choice i the seed s + i: they must differ."""
    from qst_jax.serve.openai_api import parse_request

    parsed = [parse_request({"model": "m", "prompt": "x", "n": 2, "temperature": 1.0}, "completion",
                            lambda b: [[1, 2, 3]], 64) for _ in range(3)]
    for p in parsed:
        assert p.requests[1].seed == (p.requests[0].seed + 1) % 2**31
