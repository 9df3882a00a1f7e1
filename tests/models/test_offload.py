"""A backbone streamed from host memory (`model.offload="weights"`): its layers live in pinned host memory and
every layer loop copies one layer in at a time; on the CPU the copy is a no-op, so steps equal the resident ones
bitwise."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qst_jax.methods import QLoRAModel, QSTModel
from qst_jax.methods.downsamplers import ON_HOST
from qst_jax.methods.side_config import SideConfig
from qst_jax.models import load_backbone
from qst_jax.models.loader import offload_layers
from qst_jax.train.step import init_train_state, make_train_step
from tests.helpers import lm_batch

pytestmark = pytest.mark.skipif(not hasattr(jax, "typeof") or not hasattr(jax, "memory"),
                                reason="this jax has no memory spaces")


@pytest.fixture(scope="module")
def backbones(testdata):
    resident = load_backbone(testdata / "tiny-llama-nf4")
    streamed = load_backbone(testdata / "tiny-llama-nf4", offload="weights")
    return resident, streamed


def _kinds(tree):
    return {x.sharding.memory_kind for x in jax.tree.leaves(tree)}


def test_only_the_layers_live_in_host_memory(backbones):
    resident, streamed = backbones
    assert _kinds(streamed.params["layers"]) == {"pinned_host"}
    assert _kinds({k: v for k, v in streamed.params.items() if k != "layers"}) == {"device"}
    assert _kinds(resident.params) == {"device"}
    moved = offload_layers(resident.params)
    assert _kinds(moved["layers"]) == {"pinned_host"} and _kinds(resident.params["layers"]) == {"device"}


@pytest.mark.parametrize("method", ["qst", "qlora"])
def test_a_streamed_step_equals_the_resident_one(backbones, method):
    resident, streamed = backbones
    model = (QSTModel(resident.cfg, SideConfig(reduction_factor=8)) if method == "qst"
             else QLoRAModel(resident.cfg, rank=4))
    tx = optax.adamw(1e-3)
    step = make_train_step(model, tx)
    results = []
    for backbone in (resident, streamed):
        state = init_train_state(model, tx, jax.random.PRNGKey(0))
        state, metrics = step(state, backbone.params, lm_batch(micro=2))
        results.append((state, metrics))
    (a, ma), (b, mb) = results
    assert float(ma["loss"]) == float(mb["loss"]) and float(ma["grad_norm"]) == float(mb["grad_norm"]) > 0
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("store", ["fp8", "compute"])
def test_states_kept_in_host_memory_change_nothing(backbones, store):
    """model.offload=weights+states: the downsampler's kept backbone states go to host memory ("<store>@host") and
    come back for the backward pass; on the CPU the step equals the device-kept one bitwise."""
    resident, streamed = backbones
    tx = optax.adamw(1e-3)
    results = []
    for backbone, kept in ((resident, store), (streamed, store + ON_HOST)):
        model = QSTModel(resident.cfg, SideConfig(reduction_factor=8), hidden_store=kept)
        state = init_train_state(model, tx, jax.random.PRNGKey(0))
        results.append(make_train_step(model, tx)(state, backbone.params, lm_batch(micro=2)))
    (a, ma), (b, mb) = results
    assert float(ma["loss"]) == float(mb["loss"]) and float(ma["grad_norm"]) == float(mb["grad_norm"]) > 0
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_a_bad_store_names_the_choices():
    from qst_jax.errors import InputError
    from qst_jax.methods.downsamplers import make_downsampler

    with pytest.raises(InputError, match=r"hidden_store 'fp16@host' is not one of .* \(with or without @host\)"):
        make_downsampler(SideConfig(), 64, "fp16@host")


def test_weights_and_states_puts_the_store_on_the_host():
    from qst_jax.methods.build import method_options
    from qst_jax.train.config import base_config

    c = base_config()
    c.side.hidden_store = "fp8"
    assert method_options(c)["hidden_store"] == "fp8"
    c.model.offload = "weights+states"
    assert method_options(c)["hidden_store"] == "fp8@host"


def test_the_trainer_streams_the_backbone(testdata, tmp_path):
    from qst_jax.train.trainer import Trainer
    from tests.helpers import tiny_config, tiny_model_dir

    model_dir = tiny_model_dir(testdata, tmp_path)
    summaries = []
    for name, offload in (("b", "weights"), ("c", "weights+states")):  # resident == streamed: the step tests above
        (tmp_path / name).mkdir()
        config = tiny_config(model_dir, tmp_path / name, **{"train.steps": 2, "train.checkpoint_every": 0,
                                                            "model.offload": offload})
        trainer = Trainer(config, log=lambda *a: None)
        assert _kinds(trainer.backbone.params["layers"]) == {"pinned_host"}
        summaries.append(trainer.run())
    assert summaries[0]["eval_after"] and summaries[0]["eval_after"] == summaries[1]["eval_after"]


def test_the_next_layer_is_fetched_before_this_one_computes(backbones):
    """scan_over_layers over host layers: iteration i copies layer i+1 (min(i+1, L-1)) to the device and computes layer i
    from the copy it carried in, so no compute waits on this iteration's copy; the values equal a plain scan's."""
    from qst_jax.models import loops

    resident, streamed = backbones
    def body(h, layer, x):
        scale = layer["attn_norm"]["scale"].astype(jnp.float32)
        return h * 0.5 + scale * x, layer["mlp"]["up"]["w"].packed.astype(jnp.float32).sum()

    xs = jnp.arange(resident.cfg.num_layers, dtype=jnp.float32)
    h0 = jnp.zeros(resident.cfg.hidden_size, jnp.float32)
    run = jax.jit(lambda layers: loops.scan_over_layers(body, h0, layers, xs))
    want = run(resident.params["layers"])
    got = run(streamed.params["layers"])
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    jaxpr = jax.make_jaxpr(lambda layers: loops.scan_over_layers(body, h0, layers, xs))(streamed.params["layers"])
    scan = next(e for e in jaxpr.eqns if e.primitive.name == "scan")
    inner = scan.params["jaxpr"].jaxpr
    moved = {v for e in inner.eqns if e.primitive.name == "device_put" for v in e.outvars}
    assert moved, "no copy in the loop body"
    follows = set(moved)  # everything computed from this iteration's copies
    for e in inner.eqns:
        if any(v in follows for v in e.invars if not hasattr(v, "val")):
            follows.update(e.outvars)
    computing = [e for e in inner.eqns if e.primitive.name in ("mul", "add", "reduce_sum") and
                 any(v in follows for v in e.invars if not hasattr(v, "val"))]
    assert not computing, "this iteration's compute waits on its own copy"
    carried_out = inner.outvars[1:1 + len(jax.tree.leaves(streamed.params["layers"]))]
    assert set(carried_out) <= follows  # the copies leave as the carry: the next iteration's layer


def test_a_sweep_streams_the_backbone_once_for_every_member(backbones):
    """K side networks over one streamed backbone pass: the sweep step equals the resident one bitwise."""
    from qst_jax.methods.side_set import SideSet
    from qst_jax.train.sweep import init_sweep_state, make_sweep_step

    resident, streamed = backbones
    sides = SideSet.of([QSTModel(resident.cfg, SideConfig(reduction_factor=8))] * 2)
    txs = [optax.adamw(1e-3), optax.adamw(3e-3)]
    results = []
    for backbone in (resident, streamed):
        state = init_sweep_state(sides, txs, [0, 1], seed=0)
        results.append(make_sweep_step(sides, txs)(state, backbone.params, lm_batch(micro=1)))
    (a, ma), (b, mb) = results
    np.testing.assert_array_equal(np.asarray(ma["loss"]), np.asarray(mb["loss"]))
    assert (np.asarray(mb["grad_norm"]) > 0).all()
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
