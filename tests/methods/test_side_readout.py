"""What the side network reads (input_norm) and what the score head reads (pool)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qst_jax.methods import FrozenModel, QLoRAModel, QSTModel
from qst_jax.methods.base import score
from qst_jax.methods.build import model_from_dict
from qst_jax.methods.side_config import SideConfig, side_model_config
from qst_jax.methods.downsamplers import downsample
from qst_jax.methods.side_network import qst_pass
from qst_jax.models import load_backbone
from qst_jax.models.blocks import block_fn
from qst_jax.models.decoder import embed, final_norm, make_context
from qst_jax.models.layers import norm, positions_from_mask
from qst_jax.models.config import ConfigError
from tests.helpers import lm_batch


@pytest.fixture(scope="module")
def backbone(testdata):
    return load_backbone(testdata / "tiny-llama-nf4", dtype=jnp.float32)


def _reference_pass(side_params, backbone, side: SideConfig, ids, mask):
    """The side network written out layer by layer: D_i reads the norm the backbone applies next to h_i."""
    cfg, bp = backbone.cfg, backbone.params
    scfg = side_model_config(cfg, side)
    pos = positions_from_mask(mask)
    bctx = make_context(cfg, mask, pos, jnp.float32)
    sctx = make_context(scfg, mask, pos, jnp.float32)
    layer = lambda tree, i: jax.tree.map(lambda x: x[i], tree)  # noqa: E731
    h = embed(bp, cfg, ids, pos, mask, jnp.float32)
    s = downsample(layer(side_params["down"], 0), norm(layer(bp["layers"]["attn_norm"], 0), h, cfg.norm_eps), side,
                   scfg.hidden_size)
    for i in range(cfg.num_layers):
        h, _ = block_fn(cfg)(layer(bp["layers"], i), h, cfg, bctx, None)
        after = layer(bp["layers"]["attn_norm"], i + 1) if i + 1 < cfg.num_layers else bp["final_norm"]
        b = jax.nn.sigmoid(side_params["gates"][i])
        x = (1 - b) * downsample(layer(side_params["down"], i), norm(after, h, cfg.norm_eps), side,
                                 scfg.hidden_size) + b * s
        s, _ = block_fn(scfg)(layer(side_params["layers"], i), x, scfg, sctx, None)
    up = side_params["up"]
    return final_norm(bp, cfg, h) + norm(side_params["norm"], s, scfg.norm_eps) @ up["w"].T + up["b"]


def test_input_norm_backbone_reads_each_state_through_the_backbones_next_norm(backbone):
    side = SideConfig(reduction_factor=8, input_norm="backbone")
    params = QSTModel(backbone.cfg, side).init(jax.random.PRNGKey(0))
    params["up"]["w"] = jax.random.normal(jax.random.PRNGKey(1), params["up"]["w"].shape) * 0.5  # o reads s
    batch = jax.tree.map(lambda x: jnp.asarray(x[0]), lm_batch())
    ids, mask = batch["input_ids"], batch["attention_mask"]
    got, _ = qst_pass(params, backbone.params, backbone.cfg, side, ids, mask, dtype=jnp.float32)
    want = _reference_pass(params, backbone, side, ids, mask)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-4, atol=2e-4)
    raw, _ = qst_pass(params, backbone.params, backbone.cfg, SideConfig(reduction_factor=8), ids, mask,
                      dtype=jnp.float32)
    assert float(jnp.max(jnp.abs(raw - got))) > 1e-2  # "none" reads the raw states: another side output


def test_mean_pool_averages_the_real_tokens_only():
    hidden = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 4))
    mask = jnp.array([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]], jnp.int32)  # the second row left-padded
    params = {"score": {"w": jax.random.normal(jax.random.PRNGKey(1), (3, 4))}}
    h, w = np.asarray(hidden), np.asarray(params["score"]["w"])
    want = np.stack([h[0].mean(0) @ w.T, h[1, 2:].mean(0) @ w.T])
    np.testing.assert_allclose(np.asarray(score(params, hidden, mask, "mean")), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(score(params, hidden, mask, "last")), h[:, -1] @ w.T, rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("make", [
    lambda cfg: QSTModel(cfg, SideConfig(reduction_factor=8, task="classification", num_labels=3, pool="mean")),
    lambda cfg: QLoRAModel(cfg, rank=4, task="classification", num_labels=3, pool="mean"),
    lambda cfg: FrozenModel(cfg, task="classification", num_labels=3, pool="mean"),
], ids=["qst", "qlora", "frozen"])
def test_every_method_pools_as_its_record_says(backbone, make):
    model = make(backbone.cfg)
    params = model.init(jax.random.PRNGKey(0))
    batch = jax.tree.map(lambda x: jnp.asarray(x[0]), lm_batch())
    ids, mask = batch["input_ids"], batch["attention_mask"]
    hidden, _ = model.hidden(params, backbone.params, ids, mask)
    np.testing.assert_array_equal(np.asarray(model.logits(params, backbone.params, ids, mask)),
                                  np.asarray(score(params, hidden, mask, "mean")))
    rebuilt = model_from_dict(model.to_dict(), backbone.cfg)
    assert rebuilt == model and model.to_dict()["pool"] == "mean"
    old = {k: v for k, v in model.to_dict().items() if k != "pool"}  # an export from before pooling existed
    assert model_from_dict(old, backbone.cfg).pool == "last"


def test_bad_readout_settings_are_refused():
    with pytest.raises(ConfigError, match=r"side.input_norm: 'rms' is not one of \('none', 'backbone'\)"):
        SideConfig(input_norm="rms")
    with pytest.raises(ConfigError, match=r"data.pool: 'max' is not one of \('last', 'mean'\)"):
        SideConfig(pool="max")
