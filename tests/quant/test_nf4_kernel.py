"""The fused NF4 dequantize-matmul kernel against the reference path (its oracle).

On CPU the kernel runs in Pallas interpret mode; tests/aot compiles it for
GPU targets (Triton), which needs no GPU. The GPU-marked test runs it compiled.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qst_jax.models.decoder import logits_fn
from qst_jax.models.loader import load_backbone
from qst_jax.quant import nf4_kernel
from qst_jax.quant.matmul import matmul, set_kernel_mode
from qst_jax.quant.nf4 import quantize
from qst_jax.quant.nf4_kernel import MAX_FUSED_TOKENS, fused_supported, nf4_matmul
from tests.quant.test_nf4 import _bnb_weight, golden  # noqa: F401  (fixture)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture
def kernel_mode():
    previous = set_kernel_mode("auto")
    yield set_kernel_mode
    set_kernel_mode(previous)


@pytest.mark.parametrize("name", ["t0", "t1", "t3"])  # 128x192, 256x4096, 64x11008 from bitsandbytes
@pytest.mark.parametrize("tokens", [1, 5, 17])
def test_kernel_equals_bnb_dequantized_product(golden, name, tokens):  # noqa: F811
    w = _bnb_weight(golden, name)
    x = jax.random.normal(jax.random.PRNGKey(tokens), (tokens, w.shape[1]), jnp.bfloat16)
    exact = x.astype(jnp.float32) @ w.dequantize(jnp.float32).T
    fused = nf4_matmul(x, w, interpret=True)
    reference = matmul(x, w)
    assert fused.shape == (tokens, w.shape[0]) and fused.dtype == jnp.bfloat16
    # bf16 output: both paths sit at bf16 rounding error of the exact product.
    assert _rel(fused, exact) < 5e-3
    assert _rel(fused, exact) < 1.5 * _rel(reference, exact) + 1e-3


def test_kernel_plain_scales_and_leading_axes():
    w = quantize(jax.random.normal(jax.random.PRNGKey(0), (96, 256)), double_quant=False)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 256), jnp.bfloat16)
    exact = jnp.einsum("abk,nk->abn", x.astype(jnp.float32), w.dequantize(jnp.float32))
    fused = nf4_matmul(x, w, interpret=True)
    assert fused.shape == (2, 3, 96)
    assert _rel(fused, exact) < 5e-3


def test_row_tiles_fill_the_grid_and_agree():
    from qst_jax.quant.nf4_kernel import block_n_for

    assert block_n_for(4096) == 32 and block_n_for(11008) == 64 and block_n_for(28672) == 128
    assert block_n_for(96) == 16 and block_n_for(40) is None  # small: the narrowest tile
    w = quantize(jax.random.normal(jax.random.PRNGKey(0), (128, 128)))
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 128), jnp.bfloat16)
    outs = [np.asarray(nf4_matmul(x, w, interpret=True, block_n=b), np.float32) for b in (16, 64, 128)]
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(outs[0], outs[2], rtol=1e-2, atol=1e-2)
    with pytest.raises(ValueError, match="block_n 48"):
        nf4_matmul(x, w, interpret=True, block_n=48)


def test_unsupported_weights_fall_back_or_raise():
    stacked = jax.tree.map(lambda a: a[None], quantize(jax.random.normal(jax.random.PRNGKey(0), (64, 128))))
    assert not fused_supported(stacked)
    odd_rows = quantize(jax.random.normal(jax.random.PRNGKey(0), (40, 128)))  # no 16-row tile divides 40
    assert not fused_supported(odd_rows)
    assert not fused_supported(jnp.ones((64, 64)))
    with pytest.raises(ValueError, match="unsupported weight"):
        nf4_matmul(jnp.ones((1, 128), jnp.bfloat16), odd_rows, interpret=True)
    with pytest.raises(ValueError, match="kernel mode must be one of"):
        set_kernel_mode("fast")


def test_matmul_dispatches_by_mode_and_token_count(kernel_mode, monkeypatch):
    w = quantize(jax.random.normal(jax.random.PRNGKey(0), (64, 128)))
    calls = []
    real = nf4_kernel.nf4_matmul
    monkeypatch.setattr(nf4_kernel, "nf4_matmul", lambda *a, **k: calls.append(k) or real(*a, **k))
    kernel_mode("interpret")
    few = jnp.ones((MAX_FUSED_TOKENS, 128), jnp.bfloat16)
    many = jnp.ones((MAX_FUSED_TOKENS + 1, 128), jnp.bfloat16)
    matmul(few, w)
    assert calls == [{"interpret": True}]
    matmul(many, w)  # compute-bound: the reference path
    kernel_mode("off")
    matmul(few, w)
    kernel_mode("auto")
    matmul(few, w)  # on CPU, auto never takes the kernel
    assert len(calls) == (1 if jax.default_backend() != "gpu" else 2)


def test_gradient_wrt_activations_matches_reference(kernel_mode):
    w = quantize(jax.random.normal(jax.random.PRNGKey(0), (64, 128)))
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 128), jnp.float32)

    weights = jax.random.normal(jax.random.PRNGKey(2), (4, 64))

    def loss(x):
        return jnp.sum(weights * matmul(x.astype(jnp.bfloat16), w).astype(jnp.float32))

    kernel_mode("off")
    reference = jax.grad(loss)(x)
    kernel_mode("interpret")
    fused = jax.grad(loss)(x)
    assert _rel(fused, reference) < 2e-2


def test_backbone_logits_with_kernel_match_reference(testdata, kernel_mode):
    """Every NF4 linear of the tiny LLaMA (GQA, mlp 704) through the kernel, inside lax.scan."""
    backbone = load_backbone(testdata / "tiny-llama-nf4")
    ids = jnp.asarray(np.random.default_rng(0).integers(3, 1000, (2, 8)), jnp.int32)
    mask = jnp.ones_like(ids)
    results = {}
    for mode in ("off", "interpret"):
        kernel_mode(mode)
        results[mode] = jax.jit(logits_fn(backbone.cfg, dtype=jnp.bfloat16))(backbone.params, ids, mask)
    assert _rel(results["interpret"], results["off"]) < 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 16, 64])
def test_compiled_kernel_on_gpu_matches_reference(tokens):
    w = quantize(jax.random.normal(jax.random.PRNGKey(0), (4096, 4096)))
    x = jax.random.normal(jax.random.PRNGKey(1), (tokens, 4096), jnp.bfloat16)
    exact = x.astype(jnp.float32) @ w.dequantize(jnp.float32).T
    assert _rel(nf4_matmul(x, w), exact) < 5e-3
