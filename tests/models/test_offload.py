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


def test_the_trainer_streams_the_backbone(testdata, tmp_path):
    from qst_jax.train.trainer import Trainer
    from tests.helpers import tiny_config, tiny_model_dir

    model_dir = tiny_model_dir(testdata, tmp_path)
    summaries = []
    for name, offload in (("a", "none"), ("b", "weights")):
        (tmp_path / name).mkdir()
        config = tiny_config(model_dir, tmp_path / name, **{"train.steps": 2, "train.checkpoint_every": 0,
                                                            "model.offload": offload})
        trainer = Trainer(config, log=lambda *a: None)
        assert _kinds(trainer.backbone.params["layers"]) == {"pinned_host" if offload == "weights" else "device"}
        summaries.append(trainer.run())
    assert summaries[0]["eval_after"] == summaries[1]["eval_after"]
