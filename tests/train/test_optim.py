"""The configured optimizer: one AdamW, or parameter groups with their own peak learning rates."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qst_jax.models.config import ConfigError
from qst_jax.train.config import base_config, resume_changes, validate
from qst_jax.train.optim import make_optimizer, param_groups
from qst_jax.train.sweep import plan_members


def _params():
    """A QST-shaped side pytree: every top-level key the groups name, and others."""
    key = iter(jax.random.split(jax.random.PRNGKey(0), 8))
    return {
        "down": {"w": jax.random.normal(next(key), (3, 8, 4))},
        "layers": {"attn": {"wq": jax.random.normal(next(key), (3, 4, 4))}, "attn_norm": {"scale": jnp.ones((3, 4))}},
        "gates": jnp.full((3,), 0.5),
        "out_gate": jnp.ones(()),
        "norm": {"scale": jnp.ones((4,))},
        "up": {"w": jax.random.normal(next(key), (4, 8)), "b": jnp.zeros((8,))},
        "score": {"w": jax.random.normal(next(key), (8, 2))},
    }


def _grads(params):
    return jax.tree.map(lambda x: jnp.full(x.shape, 0.3) * jnp.sign(jnp.arange(x.size).reshape(x.shape) % 3 - 1.0),
                        params)


def _optim(**values):
    o = base_config().optim
    o.schedule, o.warmup_ratio, o.lr, o.weight_decay = "constant", 0.0, 1e-3, 0.01
    for k, v in values.items():
        o[k] = v
    return o


def _updates(optim, params, steps=3, schedule=None):
    tx, _ = make_optimizer(optim, 10, schedule)
    state = tx.init(params)
    out = []
    for i in range(steps):
        updates, state = tx.update(jax.tree.map(lambda g: g * (i + 1), _grads(params)), state, params)
        out.append(updates)
    return out


def test_param_groups_by_top_level_key():
    groups = param_groups(_params())
    assert groups["score"]["w"] == groups["up"]["w"] == groups["up"]["b"] == "readout"
    assert groups["gates"] == groups["out_gate"] == "gates"
    assert {groups["down"]["w"], groups["layers"]["attn"]["wq"], groups["norm"]["scale"]} == {"rest"}


def test_groups_at_the_main_rate_equal_one_adamw_update_for_update():
    params = _params()
    plain = _updates(_optim(), params)
    grouped = _updates(_optim(readout_lr=1e-3, gate_lr=1e-3), params)
    for a, b in zip(plain, grouped, strict=True):
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-12), a, b)


@pytest.mark.parametrize("custom_schedule", [False, True])
def test_each_group_moves_at_its_own_rate(custom_schedule):
    params = _params()
    schedule = (lambda step: 1e-3 * (1.0 + step)) if custom_schedule else None
    plain = _updates(_optim(), params, schedule=schedule)
    grouped = _updates(_optim(readout_lr=1e-2, gate_lr=5e-2), params, schedule=schedule)
    factor = {"readout": 10.0, "gates": 50.0, "rest": 1.0}
    groups = param_groups(params)
    for a, b in zip(plain, grouped, strict=True):
        # Adam's direction does not depend on the rate: each group's update is the plain one times its factor
        jax.tree.map(lambda x, y, g: np.testing.assert_allclose(y, factor[g] * x, rtol=1e-5, atol=1e-12), a, b, groups)
    assert float(jnp.abs(grouped[0]["gates"]).max()) > 0


def test_clipping_spans_every_group():
    params = _params()
    big = jax.tree.map(lambda x: jnp.full(x.shape, 100.0), params)
    optim = _optim(readout_lr=1e-2, clip_norm=1.0, b1=0.0, b2=0.0, eps=1.0, weight_decay=0.0)
    tx, _ = make_optimizer(optim, 10)
    updates, _ = tx.update(big, tx.init(params), params)
    # b1 = b2 = 0, eps = 1: Adam's update is lr * g / (|g| + 1), so it shows the clipped g: one global norm
    g = 1.0 / np.sqrt(sum(x.size for x in jax.tree.leaves(params)))
    np.testing.assert_allclose(updates["score"]["w"], -1e-2 * g / (g + 1), rtol=1e-5)
    np.testing.assert_allclose(updates["down"]["w"], -1e-3 * g / (g + 1), rtol=1e-5)


def test_bad_group_rates_are_named():
    c = base_config()
    c.optim.readout_lr = -1.0
    c.optim.gate_lr = float("nan")
    with pytest.raises(ConfigError) as err:
        validate(c)
    assert "optim.readout_lr: -1.0 must be a finite number >= 0" in str(err.value)
    assert "optim.gate_lr: nan must be a finite number >= 0" in str(err.value)


def test_resume_refuses_a_group_switched_on_and_takes_a_new_rate():
    old = base_config().to_dict()
    on = base_config()
    on.optim.gate_lr = 1e-2
    with pytest.raises(ConfigError, match=r"--resume: optim.gate_lr 0.0 -> 0.01: the checkpoint's params or optimizer "
                                          r"state have other shapes"):
        resume_changes(old, on.to_dict())
    faster = base_config()
    faster.optim.gate_lr = 2e-2
    assert resume_changes(on.to_dict(), faster.to_dict()) == ["optim.gate_lr 0.01 -> 0.02"]


def test_a_sweep_gives_each_member_its_group_rate():
    c = base_config()
    c.optim.schedule, c.optim.warmup_ratio = "constant", 0.0
    c.sweep.gate_lr = "0,3e-2"
    plain, fast = plan_members(c, total_steps=10)
    assert (plain.config.optim.gate_lr, fast.config.optim.gate_lr) == (0.0, 3e-2)
    params = _params()
    grads = _grads(params)
    a, _ = plain.tx.update(grads, plain.tx.init(params), params)
    b, _ = fast.tx.update(grads, fast.tx.init(params), params)
    np.testing.assert_allclose(b["gates"], 10.0 * a["gates"], rtol=1e-5)  # 3e-2 against optim.lr 3e-3
    np.testing.assert_allclose(b["score"]["w"], a["score"]["w"], rtol=1e-6)
