"""The jitted train step: golden one-step metrics, accumulation, compile once."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

from qst_jax.models import load_backbone
from qst_jax.methods.side_config import SideConfig
from qst_jax.methods import QSTModel
from qst_jax.train.step import accumulate_gradients, init_train_state, make_train_step
from tests.helpers import lm_batch

# Loss and gradient norm of one step on the tiny-llama-nf4 fixture with a side
# network at r=8, PRNGKey(42) init and lm_batch(micro=2). Recorded with jax
# 0.10.2 on CPU; a change here means the forward, loss or gradients changed.
# "official": the official code's layout (gated output mix, the backbone's head
# count); "default": the residual mix, whose first loss is the frozen backbone's.
GOLDEN = {
    "official": (dict(head_layout="official", output_mix="gated"), 6.93136739730835, 0.10076495260000229),
    "default": ({}, 6.9447150230407715, 0.25780582427978516),
}


@pytest.fixture(scope="module")
def backbone(testdata):
    return load_backbone(testdata / "tiny-llama-nf4")


@pytest.fixture(scope="module")
def model(backbone):
    return QSTModel(backbone.cfg, SideConfig(reduction_factor=8))


@pytest.mark.parametrize("layout", sorted(GOLDEN))
def test_golden_one_step(backbone, layout):
    options, golden_loss, golden_grad_norm = GOLDEN[layout]
    model = QSTModel(backbone.cfg, SideConfig(reduction_factor=8, **options))
    tx = optax.adamw(1e-3, weight_decay=0.0)
    state = init_train_state(model, tx, jax.random.PRNGKey(42))
    state, metrics = make_train_step(model, tx)(state, backbone.params, lm_batch(micro=2))
    assert int(state.step) == 1
    assert float(metrics["weight"]) == 50.0
    np.testing.assert_allclose(float(metrics["loss"]), golden_loss, rtol=2e-5)
    # bf16 backward: jax 0.12.0.1 gives 0.1007418 for "official" (CPU default, bf16 states), 2.3e-4 from
    # jax 0.10.2's recorded 0.1007650; the loss agrees to 5e-7.
    np.testing.assert_allclose(float(metrics["grad_norm"]), golden_grad_norm, rtol=3e-4)


def test_accumulation_is_token_weighted(backbone, model):
    """Two micro-batches of one row each give the gradient of the two-row batch,
    even though the rows hold different numbers of target tokens."""
    params = model.init(jax.random.PRNGKey(0))
    whole = lm_batch(micro=1, batch=2)
    split = jax.tree.map(lambda x: x.reshape(2, 1, *x.shape[2:]), whole)
    g1, total1, w1, _ = accumulate_gradients(model, params, backbone.params, whole)
    g2, total2, w2, _ = accumulate_gradients(model, params, backbone.params, split)
    assert float(w1) == float(w2) == 25.0
    np.testing.assert_allclose(float(total1), float(total2), rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
        # bf16 compute rounds differently per batch shape: compare each leaf's
        # relative L2 error (a per-micro-batch mean would be off by ~20%).
        a, b = np.asarray(a), np.asarray(b)
        assert np.linalg.norm(a - b) <= 1e-2 * np.linalg.norm(b) + 1e-9


def test_step_compiles_once_and_donates(backbone, model):
    tx = optax.adamw(1e-3)
    state = init_train_state(model, tx, jax.random.PRNGKey(0))
    step = make_train_step(model, tx)
    old_params = jax.tree_util.tree_leaves(state.params)
    for seed in range(3):
        state, _ = step(state, backbone.params, lm_batch(seed=seed))
    assert step._cache_size() == 1  # no recompile after the first update (no weak types)
    assert all(x.is_deleted() for x in old_params)  # the state was donated
