"""The QST side network: parameter counts, where gradients go, every downsampler."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qst_jax.models import ModelConfig, load_backbone
from qst_jax.methods.side_config import DOWNSAMPLERS, SideConfig, side_model_config
from qst_jax.methods import QLoRAModel, QSTModel
from qst_jax.methods.side_params import init_side_params
from qst_jax.tree import count_params
from qst_jax.train.step import init_train_state, make_train_step
from tests.helpers import adamw, lm_batch

LLAMA2_7B = ModelConfig(
    family="llama", model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
    num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128,
)


def test_llama2_7b_trainable_count_matches_paper():
    side = SideConfig(reduction_factor=16, adapter_rank=16, head_layout="official", output_mix="gated")
    shapes = jax.eval_shape(lambda k: init_side_params(LLAMA2_7B, side, k), jax.random.PRNGKey(0))
    n = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))
    assert abs(n - 28.6e6) / 28.6e6 < 1e-3, n
    scfg = side_model_config(LLAMA2_7B, side)
    assert (scfg.hidden_size, scfg.intermediate_size, scfg.num_heads, scfg.head_dim) == (256, 688, 32, 8)


def test_side_heads_configurable():
    scfg = side_model_config(LLAMA2_7B, SideConfig(side_heads=2))
    assert scfg.num_heads == 2 and scfg.head_dim == 128
    wide = side_model_config(LLAMA2_7B, SideConfig())  # the default: heads of 64 dims
    assert (wide.num_heads, wide.head_dim) == (4, 64)
    narrow = side_model_config(dataclasses.replace(LLAMA2_7B, hidden_size=576, intermediate_size=1536, num_heads=9,
                                                   num_kv_heads=3, head_dim=64), SideConfig())
    assert (narrow.hidden_size, narrow.num_heads, narrow.head_dim, narrow.num_kv_heads) == (36, 1, 36, 1)  # SmolLM2


def test_exports_from_before_the_new_defaults_keep_their_layout():
    old = SideConfig.from_dict({"reduction_factor": 16, "adapter_rank": 16, "downsampler": "adapter", "side_heads": None,
                                "gate_init": 0.5, "output_gate_init": 1.0, "init_std": 0.02})
    assert (old.head_layout, old.output_mix) == ("official", "gated")


@pytest.fixture(scope="module")
def backbone(testdata):
    return load_backbone(testdata / "tiny-llama-nf4")


@pytest.mark.parametrize("downsampler", DOWNSAMPLERS)
def test_every_downsampler_trains(backbone, downsampler):
    model = QSTModel(backbone.cfg, SideConfig(reduction_factor=8, downsampler=downsampler))
    tx = adamw(3e-3)
    state = init_train_state(model, tx, jax.random.PRNGKey(0))
    step = make_train_step(model, tx)
    batch = lm_batch()
    losses = []
    for _ in range(6):
        state, metrics = step(state, backbone.params, batch)
        losses.append(float(metrics["loss"]))
        assert float(metrics["grad_norm"]) > 0
    assert losses[-1] < losses[0], losses


def test_gradients_only_for_side_params(backbone):
    model = QSTModel(backbone.cfg, SideConfig(reduction_factor=8))
    before = jax.tree.map(lambda x: np.asarray(x).copy(), backbone.params)
    tx = adamw(1e-3)
    state = init_train_state(model, tx, jax.random.PRNGKey(0))
    step = make_train_step(model, tx)
    for _ in range(2):
        state, _ = step(state, backbone.params, lm_batch())
    after = jax.tree.map(np.asarray, backbone.params)
    for a, b in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(after)):
        assert a.tobytes() == b.tobytes()
    # The loss has no gradient path into the backbone: jax.grad over the backbone's
    # float leaves (embeddings, norms, head) is exactly zero.
    batch = jax.tree.map(lambda x: x[0], lm_batch())

    def loss_of_backbone_floats(floats):
        merged = {**backbone.params, "embed": floats["embed"], "final_norm": floats["final_norm"]}
        total, _ = model.loss(state.params, merged, batch)
        return total

    floats = {"embed": backbone.params["embed"], "final_norm": backbone.params["final_norm"]}
    g = jax.grad(loss_of_backbone_floats)(floats)
    assert all(float(jnp.abs(x.astype(jnp.float32)).max()) == 0.0 for x in jax.tree_util.tree_leaves(g))


def test_backbone_is_not_differentiable_state(backbone):
    model = QSTModel(backbone.cfg, SideConfig(reduction_factor=8))
    params = model.init(jax.random.PRNGKey(0))
    batch = jax.tree.map(lambda x: x[0], lm_batch())
    with pytest.raises(TypeError):
        jax.grad(lambda bp: model.loss(params, bp, batch)[0])(backbone.params)


def test_output_gate_starts_mixed_and_is_trained(backbone):
    model = QSTModel(backbone.cfg, SideConfig(reduction_factor=8, output_mix="gated"))
    tx = adamw(1e-2)
    state = init_train_state(model, tx, jax.random.PRNGKey(0))
    z0 = np.asarray(state.params["out_gate"]).copy()
    assert np.all(z0 == 1.0) and state.params["out_gate"].dtype == jnp.float32
    state, _ = make_train_step(model, tx)(state, backbone.params, lm_batch())
    assert not np.array_equal(np.asarray(state.params["out_gate"]), z0)


def test_remat_side_gives_same_gradients(backbone):
    batch = jax.tree.map(lambda x: x[0], lm_batch())
    grads = []
    for remat in (False, True):
        model = QSTModel(backbone.cfg, SideConfig(reduction_factor=8), remat_side=remat)
        params = model.init(jax.random.PRNGKey(0))
        grads.append(jax.grad(lambda p: model.loss(p, backbone.params, batch)[0])(params))
    for a, b in zip(jax.tree_util.tree_leaves(grads[0]), jax.tree_util.tree_leaves(grads[1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_opt_family_side_network(testdata):
    backbone = load_backbone(testdata / "tiny-opt-nf4")
    model = QSTModel(backbone.cfg, SideConfig(reduction_factor=8))
    params = model.init(jax.random.PRNGKey(0))
    assert "bias" in params["norm"]  # OPT's LayerNorm
    total, (weight, _) = model.loss(params, backbone.params, jax.tree.map(lambda x: x[0], lm_batch()))
    assert np.isfinite(float(total)) and float(weight) > 0


def test_classification_head(backbone):
    side = SideConfig(reduction_factor=8, task="classification", num_labels=3)
    model = QSTModel(backbone.cfg, side)
    params = model.init(jax.random.PRNGKey(0))
    ids = jnp.ones((2, 8), jnp.int32)
    mask = jnp.array([[1] * 8, [0, 0, 0] + [1] * 5], jnp.int32)
    logits = model.logits(params, backbone.params, ids, mask)
    assert logits.shape == (2, 3)


def test_qlora_changes_only_lora_and_starts_at_backbone(backbone):
    model = QLoRAModel(backbone.cfg, rank=4)
    params = model.init(jax.random.PRNGKey(0))
    ids = jnp.arange(16, dtype=jnp.int32).reshape(2, 8)
    mask = jnp.ones_like(ids)
    # B = 0 at init: the LoRA model equals the frozen backbone exactly.
    np.testing.assert_array_equal(
        np.asarray(model.logits(params, backbone.params, ids, mask)), np.asarray(backbone.logits(ids, mask))
    )
    n_lora = count_params(params)
    assert n_lora == 4 * 4 * sum(4 * (o + i) for o, i in [(256, 256), (128, 256), (128, 256), (256, 256), (704, 256), (704, 256), (256, 704)]) // 4


def test_side_config_errors():
    with pytest.raises(ValueError, match="downsampler"):
        SideConfig(downsampler="conv")
    with pytest.raises(ValueError, match="divisible by side_heads"):
        side_model_config(LLAMA2_7B, SideConfig(side_heads=3))
    bad = dataclasses.replace(LLAMA2_7B, hidden_size=4104)
    with pytest.raises(ValueError, match="must divide hidden_size"):
        side_model_config(bad, SideConfig(reduction_factor=16))


def test_residual_mix_starts_exactly_at_the_backbone_and_trains(backbone):
    from qst_jax.methods import FrozenModel

    batch = jax.tree.map(lambda x: x[0], lm_batch())
    frozen = FrozenModel(backbone.cfg, jnp.float32).logits({}, backbone.params, batch["input_ids"],
                                                           batch["attention_mask"])
    model = QSTModel(backbone.cfg, SideConfig(reduction_factor=8, output_mix="residual"), dtype=jnp.float32)
    tx = adamw(3e-3)
    state = init_train_state(model, tx, jax.random.PRNGKey(0))
    assert "out_gate" not in state.params and not np.any(np.asarray(state.params["up"]["w"]))
    logits = model.logits(state.params, backbone.params, batch["input_ids"], batch["attention_mask"])
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(frozen))  # o = Norm(h_L) + 0
    step = make_train_step(model, tx)
    losses = []
    for _ in range(4):
        state, metrics = step(state, backbone.params, lm_batch())
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] and np.any(np.asarray(state.params["up"]["w"]))


def test_linear_probe_trains_only_a_score_head(backbone):
    from qst_jax.methods import FrozenModel

    model = FrozenModel(backbone.cfg, task="classification", num_labels=3)
    params = model.init(jax.random.PRNGKey(0))
    assert jax.tree.map(jnp.shape, params) == {"score": {"w": (3, backbone.cfg.hidden_size)}}
    batch = jax.tree.map(lambda x: x[0], lm_batch())
    batch = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
             "labels": jnp.asarray([0, 2]), "example_mask": jnp.ones(2)}
    grads = jax.grad(lambda p: model.loss(p, backbone.params, batch)[0])(params)
    assert float(jnp.abs(grads["score"]["w"]).sum()) > 0
    assert model.to_dict() == {"method": "frozen", "task": "classification", "num_labels": 3, "pool": "last"}
