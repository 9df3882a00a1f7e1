"""Sweeps: each member equals its own single run; the backbone runs once; members are planned from config."""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qst_jax.methods import QSTModel, SideConfig
from qst_jax.methods.side_set import SideSet
from qst_jax.models import ConfigError, load_backbone
from qst_jax.train.config import base_config
from qst_jax.train.step import init_train_state, make_train_step
from qst_jax.train.sweep import init_sweep_state, make_sweep_step, plan_members
from tests.helpers import lm_batch

STEPS = 3
TOLERANCE = 2e-5  # float32 on CPU: vmapped and single matmuls may sum in another order


@pytest.fixture(scope="module")
def backbone(testdata):
    return load_backbone(testdata / "tiny-llama-nf4", dtype=jnp.float32)


def _batches(n: int, micro: int = 2):
    return [jax.tree.map(jnp.asarray, lm_batch(micro=micro, batch=2, length=16, vocab=1000, seed=s)) for s in range(n)]


def _single_run(backbone, side: SideConfig, tx, seed: int, batches):
    model = QSTModel(backbone.cfg, side, dtype=jnp.float32)
    state = init_train_state(model, tx, jax.random.PRNGKey(seed))
    step = make_train_step(model, tx, donate=False)
    losses = []
    for batch in batches:
        state, metrics = step(state, backbone.params, batch)
        losses.append(float(metrics["loss"]))
    return state.params, losses


def _sweep(backbone, sides_cfg, txs, seeds, batches):
    sides = SideSet(backbone.cfg, tuple(sides_cfg), dtype=jnp.float32)
    state = init_sweep_state(sides, txs, seeds, seed=0)
    step = make_sweep_step(sides, txs, donate=False)
    losses = []
    for batch in batches:
        state, metrics = step(state, backbone.params, batch)
        losses.append(np.asarray(metrics["loss"]))
    return sides, state, np.stack(losses)


def _assert_close(a, b):
    flat_a, flat_b = jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)
    assert len(flat_a) == len(flat_b)
    for (path, x), y in zip(flat_a, flat_b):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=TOLERANCE, atol=TOLERANCE,
                                   err_msg=jax.tree_util.keystr(path))


# A member's own optax transformations: Adam with a schedule, SGD with momentum and clipping, AdamW with decay.
def _txs():
    return [
        optax.adam(optax.linear_schedule(3e-3, 1e-3, STEPS)),
        optax.chain(optax.clip_by_global_norm(0.5), optax.sgd(0.05, momentum=0.9)),
        optax.adamw(1e-3, weight_decay=0.1),
    ]


def test_each_member_equals_its_single_run(backbone):
    """Members 0 and 2 share a shape (gate_init changes only the init): one vmapped group; member 1 is its own."""
    sides_cfg = [SideConfig(reduction_factor=8), SideConfig(reduction_factor=4, downsampler="maxpool"),
                 SideConfig(reduction_factor=8, gate_init=-1.0)]
    seeds = [0, 0, 2]
    batches = _batches(STEPS)
    sides, state, losses = _sweep(backbone, sides_cfg, _txs(), seeds, batches)
    assert sides.groups == ((0, 2), (1,))
    for i, (cfg, tx, seed) in enumerate(zip(sides_cfg, _txs(), seeds)):
        params, single_losses = _single_run(backbone, cfg, tx, seed, batches)
        _assert_close(sides.unstack(state.params)[i], params)
        np.testing.assert_allclose(losses[:, i], single_losses, rtol=TOLERANCE)
    assert len({round(float(x), 6) for x in losses[-1]}) == 3  # the members did train differently


def _nf4_dequantizations(jaxpr) -> list[tuple[int, ...]]:
    """Output shapes of every NF4 code lookup (the 16-entry table gathered by 4-bit codes) in a jaxpr, nested ones too."""
    found = []

    def visit(jp):
        for eqn in jp.eqns:
            if eqn.primitive.name == "gather" and eqn.invars[0].aval.shape == (16,):
                found.append(tuple(eqn.outvars[0].aval.shape))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                visit(sub)

    visit(jaxpr.jaxpr)
    return found


def test_the_backbone_runs_once_for_every_member(backbone):
    batch = _batches(1)[0]
    single_model = QSTModel(backbone.cfg, SideConfig(reduction_factor=8), dtype=jnp.float32)
    tx = optax.adam(1e-3)
    single_state = init_train_state(single_model, tx, jax.random.PRNGKey(0))
    single = jax.make_jaxpr(make_train_step(single_model, tx, donate=False))(single_state, backbone.params, batch)
    members = [SideConfig(reduction_factor=8)] * 4 + [SideConfig(reduction_factor=4)] * 2
    sides = SideSet(backbone.cfg, tuple(members), dtype=jnp.float32)
    txs = [optax.adam(1e-3 * (i + 1)) for i in range(len(members))]
    state = init_sweep_state(sides, txs, list(range(len(members))), seed=0)
    sweep = jax.make_jaxpr(make_sweep_step(sides, txs, donate=False))(state, backbone.params, batch)
    one, six = _nf4_dequantizations(single), _nf4_dequantizations(sweep)
    assert one, "no NF4 dequantization found: the test would pass by accident"
    assert sorted(six) == sorted(one)  # same count and shapes: no member axis, not six times


def test_members_from_config_zip_and_grid():
    c = base_config()
    c.sweep.lr = "1e-4,3e-4"
    c.sweep.seed = "1"
    names = [m.name for m in plan_members(c, total_steps=10)]
    assert names == ["lr=1e-4_seed=1", "lr=3e-4_seed=1"]
    members = plan_members(c, total_steps=10)
    assert [m.config.optim.lr for m in members] == [1e-4, 3e-4] and [m.seed for m in members] == [1, 1]
    c.sweep.mode = "grid"
    c.sweep.seed = "1,2"
    c.sweep.reduction_factor = "8,16"
    assert len(plan_members(c, total_steps=10)) == 8
    c.sweep.mode = "zip"
    c.sweep.seed = "1,2,3"
    with pytest.raises(ConfigError, match="zipped keys have different lengths"):
        plan_members(c, total_steps=10)


def test_bad_sweep_values_are_named():
    c = base_config()
    c.sweep.lr = "1e-4,fast"
    with pytest.raises(ConfigError, match=r"sweep.lr: 'fast' is not a float"):
        plan_members(c, total_steps=10)
    c.sweep.lr = "1e-4,-1"
    with pytest.raises(ConfigError, match=r"bad config of sweep member lr=-1:\n  optim.lr: -1.0 must be a finite"):
        plan_members(c, total_steps=10)
    c.sweep.lr = ""
    c.sweep.seed = "1,2"
    with pytest.raises(ConfigError, match=r"config.sweep gives 2 members, tx gives 3 members"):
        plan_members(c, tx=_txs(), total_steps=10)


def test_a_member_that_goes_non_finite_is_frozen_and_the_others_train_on(backbone):
    sides = SideSet(backbone.cfg, (SideConfig(reduction_factor=8),) * 2, dtype=jnp.float32)
    txs = [optax.adam(1e-3), optax.sgd(1e38)]  # the second blows up
    state = init_sweep_state(sides, txs, [0, 0], seed=0)
    step = make_sweep_step(sides, txs, donate=False)
    history = []
    for batch in _batches(4, micro=1):
        before = sides.unstack(state.params)[1]
        state, metrics = step(state, backbone.params, batch)
        history.append((np.asarray(metrics["finite"]), before))
    alive = np.asarray(state.alive)
    assert alive.tolist() == [True, False]
    first_bad = next(i for i, (finite, _) in enumerate(history) if not finite[1])
    frozen = sides.unstack(state.params)[1]
    _assert_close(frozen, history[first_bad][1])  # the params of its last finite step
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(frozen))
    assert all(finite[0] for finite, _ in history)


def test_a_swept_optimizer_key_with_your_own_tx_is_refused():
    c = base_config()
    c.sweep.lr = "1e-4,3e-4"
    with pytest.raises(ConfigError, match=r"sweep.lr: sweeps the configured optimizer, which tx= replaces"):
        plan_members(c, tx=optax.adam(1e-3), total_steps=10)
    with pytest.raises(ConfigError, match=r"sweep.lr: sweeps the configured schedule, which schedule= replaces"):
        plan_members(c, schedule=[optax.constant_schedule(1e-3)] * 2, total_steps=10)
    c.sweep.lr = ""
    c.sweep.seed = "0,1"  # a swept init seed goes with your own tx
    assert [m.seed for m in plan_members(c, tx=optax.adam(1e-3), total_steps=10)] == [0, 1]


def test_a_side_set_names_a_model_that_is_not_qst(backbone):
    from qst_jax.methods import FrozenModel

    qst = QSTModel(backbone.cfg, SideConfig(reduction_factor=8))
    with pytest.raises(ConfigError, match=r"^--side runs/b: a 'frozen' model; several side networks over one "
                                          r"backbone pass must all be QST$"):
        SideSet.of([qst, FrozenModel(backbone.cfg)], names=["--side runs/a", "--side runs/b"])
