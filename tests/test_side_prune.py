"""benchmarks/studies/side_prune.py: side blocks pruned from the backbone's weights."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qst_jax.methods.side_config import SideConfig, side_model_config
from qst_jax.methods.downsamplers import downsample
from qst_jax.methods.side_params import init_side_params
from qst_jax.models import load_backbone
from qst_jax.models.config import ConfigError
from qst_jax.models.layers import rope_cos_sin
from qst_jax.quant.nf4 import NF4Weight
from tests.helpers import study


def pruned_side_layers(*args):
    return study("side_prune").pruned_side_layers(*args)


@pytest.fixture(scope="module")
def backbone(testdata):
    return load_backbone(testdata / "tiny-llama-nf4", dtype=jnp.float32)


def test_without_reduction_the_pruned_blocks_are_the_backbones_own(backbone):
    layers, final = pruned_side_layers(backbone.params, backbone.cfg,
                                       SideConfig(reduction_factor=1, head_layout="official"))

    def dense(x):
        return np.asarray(x.dequantize(jnp.float32) if isinstance(x, NF4Weight) else x, np.float32)

    want = jax.tree.map(dense, backbone.params["layers"], is_leaf=lambda x: isinstance(x, NF4Weight))
    jax.tree.map(lambda got, w: np.testing.assert_array_equal(np.asarray(got), w), layers, want)
    np.testing.assert_array_equal(np.asarray(final["scale"]), np.asarray(backbone.params["final_norm"]["scale"]))


def test_pruned_heads_keep_their_rope_frequencies(backbone):
    side = SideConfig(reduction_factor=4, head_layout="official")
    scfg = side_model_config(backbone.cfg, side)
    layers, _ = pruned_side_layers(backbone.params, backbone.cfg, side)
    random = jax.eval_shape(lambda: init_side_params(backbone.cfg, side, jax.random.PRNGKey(0)))
    assert jax.tree.map(jnp.shape, layers) == jax.tree.map(lambda x: x.shape, random["layers"])
    positions = jnp.arange(7)[None]
    side_cos, _ = rope_cos_sin(scfg, positions, jnp.float32)
    full_cos, _ = rope_cos_sin(backbone.cfg, positions, jnp.float32)
    step = backbone.cfg.head_dim // scfg.head_dim
    kept = [j * step for j in range(scfg.head_dim // 2)]
    kept += [j + backbone.cfg.head_dim // 2 for j in kept]
    np.testing.assert_allclose(np.asarray(side_cos), np.asarray(full_cos)[..., kept], rtol=1e-6)


def test_pruning_is_refused_where_heads_cannot_map(backbone):
    with pytest.raises(ConfigError, match=r"needs the side head_dim \(\d+\) to divide the backbone's"):
        pruned_side_layers(backbone.params, backbone.cfg, SideConfig(reduction_factor=4, side_heads=1))
    opt = dataclasses.replace(backbone.cfg, family="opt")
    with pytest.raises(ConfigError, match="needs a LLaMA-family backbone, not 'opt'"):
        pruned_side_layers(backbone.params, opt, SideConfig(reduction_factor=4, head_layout="official"))


def test_the_selecting_downsamplers_pick_the_pruned_dims(backbone):
    module = study("side_prune")
    side = SideConfig(reduction_factor=4, head_layout="official", downsampler="linear")
    cfg = backbone.cfg
    width = side_model_config(cfg, side).hidden_size
    dims = module.pruned_dims(backbone.params, width)
    layers, final = module.pruned_side_layers(backbone.params, cfg, side)
    weights = module.dense_weights(backbone.params)  # dequantized once and passed in: the same result
    np.testing.assert_array_equal(module.pruned_dims(backbone.params, width, weights), dims)
    jax.tree.map(np.testing.assert_array_equal, module.pruned_side_layers(backbone.params, cfg, side, weights),
                 (layers, final))
    np.testing.assert_array_equal(np.asarray(final["scale"]),
                                  np.asarray(backbone.params["final_norm"]["scale"])[dims])
    np.testing.assert_array_equal(np.asarray(layers["attn_norm"]["scale"]),
                                  np.asarray(backbone.params["layers"]["attn_norm"]["scale"])[:, dims])
    down = module.selecting_downsamplers(dims, cfg.num_layers, cfg.hidden_size)
    assert down["w"].shape == (cfg.num_layers, width, cfg.hidden_size)
    h = jax.random.normal(jax.random.PRNGKey(1), (2, 5, cfg.hidden_size))
    for i in range(cfg.num_layers):
        picked = downsample(jax.tree.map(lambda x: x[i], down), h, side, width)
        np.testing.assert_array_equal(np.asarray(picked), np.asarray(h)[..., dims])
