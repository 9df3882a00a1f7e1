"""What the backward pass keeps of backbone states: bf16 as is, or fp8 with a scale."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.ad_checkpoint import saved_residuals

from qst_jax.models import load_backbone
from qst_jax.methods.side_config import SideConfig
from qst_jax.methods import QSTModel
from qst_jax.methods.downsamplers import fp8_load, fp8_store
from tests.helpers import lm_batch

# fp8 e4m3 keeps 3 mantissa bits: each stored value is within 1/16 relative;
# the gradients that flow from it are stated (and tested) to stay within 5%.
FP8_GRAD_TOLERANCE = 0.05


@pytest.fixture(scope="module")
def backbone(testdata):
    return load_backbone(testdata / "tiny-llama-nf4")


def test_fp8_round_trip_per_token():
    h = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5, 64)) * [[[1e-3]], [[50.0]]], jnp.bfloat16)
    q, scale = fp8_store(h)
    assert q.dtype == jnp.float8_e4m3fn and scale.shape == (2, 5, 1)
    back = np.asarray(fp8_load(q, scale, jnp.float32))
    ref = np.asarray(h, np.float32)
    assert np.all(np.abs(back - ref) <= np.abs(ref) / 16 + 1e-2 * np.abs(ref).max(axis=-1, keepdims=True))


@pytest.mark.parametrize("downsampler", ["adapter"])
def test_fp8_gradients_within_tolerance_of_bf16(backbone, downsampler):
    batch = jax.tree.map(lambda x: x[0], lm_batch())
    grads = {}
    for store in ("compute", "fp8"):
        model = QSTModel(backbone.cfg, SideConfig(reduction_factor=8, downsampler=downsampler), hidden_store=store)
        params = model.init(jax.random.PRNGKey(0))
        grads[store] = jax.grad(lambda p: model.loss(p, backbone.params, batch)[0])(params)
    flat_ref = jax.tree_util.tree_leaves(grads["compute"])
    flat_fp8 = jax.tree_util.tree_leaves(grads["fp8"])
    for ref, got in zip(flat_ref, flat_fp8):
        ref, got = np.asarray(ref, np.float32), np.asarray(got, np.float32)
        assert np.linalg.norm(got - ref) <= FP8_GRAD_TOLERANCE * np.linalg.norm(ref) + 1e-12


def test_fp8_store_keeps_fp8_residuals(backbone):
    batch = jax.tree.map(lambda x: x[0], lm_batch())
    d = backbone.cfg.hidden_size

    def kept(store: str) -> dict[str, int]:
        model = QSTModel(backbone.cfg, SideConfig(reduction_factor=8), hidden_store=store)
        params = model.init(jax.random.PRNGKey(0))
        residuals = saved_residuals(lambda p: model.loss(p, backbone.params, batch)[0], params)
        counts: dict[str, int] = {}
        for aval, _ in residuals:
            if aval.shape and aval.shape[-1] == d and len(aval.shape) >= 3:
                counts[str(aval.dtype)] = counts.get(str(aval.dtype), 0) + int(np.prod(aval.shape))
        return counts

    compute, fp8 = kept("compute"), kept("fp8")
    assert "float8_e4m3fn" in fp8 and "float8_e4m3fn" not in compute
    assert fp8.get("bfloat16", 0) < compute["bfloat16"]


def test_auto_is_fp8_on_a_gpu_and_compute_elsewhere():
    from qst_jax.methods.downsamplers import resolve_store
    from qst_jax.platform import targeting

    assert jax.default_backend() == "cpu" and resolve_store("auto") == "compute"  # XLA emulates fp8 on a CPU
    with targeting("gpu"):  # what qst_jax.aot traces under when it compiles for a GPU
        assert resolve_store("auto") == "fp8"
    assert resolve_store("fp8") == "fp8" and resolve_store("compute") == "compute"
