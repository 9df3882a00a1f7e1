"""Cached decoding equals uncached: greedy tokens vs argmax of full forwards."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qst_jax.data.offline import MissingPackageError
from qst_jax.generate.decode import GenerationError, Generator
from qst_jax.generate.sampling import SamplingConfig, sample_rows
from qst_jax.models import load_backbone
from qst_jax.methods.side_config import SideConfig
from qst_jax.methods import QSTModel
from tests.helpers import uncached_logits


class _IdTokenizer:
    """Token ids in, ids out: enough for generating from id prompts."""

    pad_token_id = 0
    eos_token_id = None

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(map(str, ids))


def _randomized_side(cfg, key=1):
    model = QSTModel(cfg, SideConfig(reduction_factor=8), dtype=jnp.float32)
    params = model.init(jax.random.PRNGKey(key))
    # A visible side contribution: the residual mix starts with Up at zero.
    params["up"]["w"] = jax.random.normal(jax.random.PRNGKey(key + 1), params["up"]["w"].shape) * 0.4
    return model, params


def check_cached_equals_uncached(gen: Generator, prompts: list[list[int]], steps: int, tolerance: float = 0.0) -> int:
    """Each greedy token of cached decoding against the uncached forward's logits over the same text.

    `tolerance` 0 (float32 backbones, where both paths round alike): the
    token is the uncached argmax. Otherwise (bf16, where the cached and the
    uncached pass round differently): the token's uncached logit is within
    `tolerance` times the largest logit's magnitude of it, so a near-tie may
    go either way.
    """
    outs = gen.generate_ids(prompts, max_new_tokens=steps, eos_ids=[])
    checked = 0
    for i in range(steps):
        seqs = [p + o[:i] for p, o in zip(prompts, outs)]
        logits = uncached_logits(gen, seqs)[:, -1]
        for b, o in enumerate(outs):
            if tolerance == 0:
                assert int(np.argmax(logits[b])) == o[i], f"row {b}, step {i}"
            else:
                best = float(np.max(logits[b]))
                assert float(logits[b, o[i]]) >= best - tolerance * abs(best), (
                    f"row {b}, step {i}: token {o[i]} at {logits[b, o[i]]:.3f}, the maximum {best:.3f}")
            checked += 1
    return checked


PROMPTS = [[5, 17, 99, 300, 42, 7, 8], [11, 12, 13], [900, 1, 2, 3, 4]]  # left-padded to 7


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("with_side", [False, True], ids=["base", "qst"])
def test_tiny_models_cached_equals_uncached(testdata, family, with_side):
    backbone = load_backbone(testdata / f"tiny-{family}-nf4", dtype=jnp.float32)
    tuned = _randomized_side(backbone.cfg) if with_side else None
    gen = Generator(backbone, _IdTokenizer(), tuned)
    assert check_cached_equals_uncached(gen, PROMPTS, steps=6) == 18


def test_side_network_changes_generation(testdata):
    backbone = load_backbone(testdata / "tiny-llama-nf4", dtype=jnp.float32)
    base = Generator(backbone, _IdTokenizer()).generate_ids(PROMPTS, max_new_tokens=6, eos_ids=[])
    tuned = Generator(backbone, _IdTokenizer(), _randomized_side(backbone.cfg)).generate_ids(
        PROMPTS, max_new_tokens=6, eos_ids=[]
    )
    assert base != tuned


def test_prompt_longer_than_context(testdata):
    backbone = load_backbone(testdata / "tiny-llama-nf4")
    gen = Generator(backbone, _IdTokenizer())
    with pytest.raises(GenerationError, match="prompt of 600 tokens does not fit the model's context of 512"):
        gen.generate_ids([[1] * 600], max_new_tokens=4)


def _draws(temperature: float, top_k: int, top_p: float, rows: int) -> set[int]:
    """The tokens `rows` rows draw from one distribution, each row its own seed (one call of `sample_rows`)."""
    logits = jnp.tile(jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]])), (rows, 1))
    full = lambda v, dtype: jnp.full((rows,), v, dtype)  # noqa: E731
    drawn = sample_rows(logits, jnp.arange(rows, dtype=jnp.int32), full(0, jnp.int32), full(temperature, jnp.float32),
                        full(top_k, jnp.int32), full(top_p, jnp.float32))
    return {int(t) for t in drawn}


def test_sampling_modes():
    assert _draws(0.0, 0, 1.0, 8) == {0}  # greedy
    assert _draws(1.0, 2, 1.0, 200) == {0, 1}
    assert _draws(1.0, 0, 0.6, 200) == {0, 1}  # 0.5 < 0.6: the second token is needed, the third is not
    assert _draws(1.0, 0, 1.0, 400) == {0, 1, 2, 3}
    with pytest.raises(ValueError):
        SamplingConfig(top_p=0.0)


@pytest.mark.slow
def test_smollm2_cached_equals_uncached_and_knows_paris():
    from qst_jax.data.offline import smollm2_gguf
    from qst_jax.models import load_tokenizer

    try:
        path = smollm2_gguf()
    except MissingPackageError as err:
        pytest.skip(str(err))
    backbone = load_backbone(path)
    tokenizer = load_tokenizer(path)
    gen = Generator(backbone, tokenizer)
    prompts = [tokenizer("The capital of France is").input_ids, tokenizer("To be, or not to be:").input_ids]
    # bf16: the cached and uncached passes round differently (a 0.23 margin at a logit of 47 was seen to flip),
    # so a near-tie within 1% of the largest logit may go either way.
    assert check_cached_equals_uncached(gen, prompts, steps=5, tolerance=0.01) == 10
    tuned = Generator(backbone, tokenizer, _randomized_side(backbone.cfg))
    assert check_cached_equals_uncached(tuned, prompts, steps=3, tolerance=0.01) == 6
    assert "Paris" in gen.generate(["The capital of France is"], max_new_tokens=6)[0]
    with pytest.raises(GenerationError, match="unknown chat role 'wizard'"):
        gen.render_chat([{"role": "wizard", "content": "hi"}])


def test_a_mixed_batch_equals_each_row_generated_alone(testdata):
    """Rows naming different side networks (two shapes, and the base model) decode together, one backbone pass."""
    backbone = load_backbone(testdata / "tiny-llama-nf4", dtype=jnp.float32)
    a, b = _randomized_side(backbone.cfg, key=1), _randomized_side(backbone.cfg, key=5)
    wide = QSTModel(backbone.cfg, SideConfig(reduction_factor=4, downsampler="avgpool"), dtype=jnp.float32)
    wide_params = wide.init(jax.random.PRNGKey(9))
    wide_params["up"]["w"] = jax.random.normal(jax.random.PRNGKey(10), wide_params["up"]["w"].shape) * 0.4
    sides = {"a": a, "b": b, "wide": (wide, wide_params)}
    mixed = Generator(backbone, _IdTokenizer(), sides=sides)
    prompts = PROMPTS + [[5, 17, 99, 300, 42, 7, 8]]
    route = ["b", None, "wide", "a"]
    together = mixed.generate_ids(prompts, max_new_tokens=6, eos_ids=[], side=route)
    for prompt, side, out in zip(prompts, route, together):
        alone = Generator(backbone, _IdTokenizer(), sides[side] if side else None)
        assert alone.generate_ids([prompt], max_new_tokens=6, eos_ids=[])[0] == out, side
    assert together[0] != together[3]  # same prompt, other side network: other tokens
    with pytest.raises(GenerationError, match=r"side 'c' is not one of \['a', 'b', 'wide'\]"):
        mixed.generate_ids(prompts[:1], max_new_tokens=1, side=["c"])
