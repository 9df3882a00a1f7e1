"""The Flax NNX front door: the same pure functions, the backbone frozen, the loop equal to make_train_step."""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from qst_jax import nnx as qnnx
from qst_jax.cli import eval as eval_cli
from qst_jax.cli import generate as generate_cli
from qst_jax.methods import ExportError, QSTModel, SideConfig, load_tuned
from qst_jax.models import load_backbone
from qst_jax.quant.nf4 import NF4Weight
from qst_jax.train.step import TrainState, make_train_step
from tests.helpers import TEXT, lm_batch, tiny_model_dir

STEPS = 3


@pytest.fixture(scope="module")
def model_dir(testdata, tmp_path_factory):
    return tiny_model_dir(testdata, tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def backbone(model_dir):
    return load_backbone(model_dir)


@pytest.fixture(scope="module")
def batches():
    return [jax.tree.map(lambda x: x[0], lm_batch(seed=seed)) for seed in range(STEPS)]


def _qst(backbone, seed=0):
    return qnnx.QST(backbone, SideConfig(reduction_factor=8), rngs=nnx.Rngs(seed))


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _bytes_equal(a, b) -> bool:
    return len(a) == len(b) and all(x.dtype == y.dtype and x.tobytes() == y.tobytes() for x, y in zip(a, b))


# The loops README and the notebook show, as a user writes them.
@nnx.jit
def nnx_step(model, optimizer, batch):
    (loss, aux), grads = nnx.value_and_grad(lambda m: m.loss(batch), has_aux=True)(model)
    optimizer.update(model, grads)
    return loss


def split_loop(model, optimizer, batches):
    """`nnx.split` once, `jax.jit` the pure step, donate the changing state, pass the backbone as an argument."""
    graphdef, frozen, state = nnx.split((model, optimizer), qnnx.FrozenWeight, ...)

    @functools.partial(jax.jit, donate_argnums=1)
    def step(frozen, state, batch):
        model, optimizer = nnx.merge(graphdef, frozen, state)
        (loss, aux), grads = nnx.value_and_grad(lambda m: m.loss(batch), has_aux=True)(model)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer), nnx.Not(qnnx.FrozenWeight)), loss

    for batch in batches:
        state, loss = step(frozen, state, batch)
    nnx.update((model, optimizer), state)


def test_split_and_grad_leave_the_backbone_out(backbone, batches):
    model = _qst(backbone)
    _, params, frozen = nnx.split(model, nnx.Param, qnnx.FrozenWeight)
    assert sum(x.size for x in jax.tree.leaves(params)) == sum(x.size for x in jax.tree.leaves(model.params()))
    nf4 = [v for v in jax.tree.leaves(frozen, is_leaf=lambda x: isinstance(x, nnx.Variable))
           if isinstance(v.get_value(), NF4Weight)]
    assert len(nf4) == 7 and all(isinstance(v, qnnx.FrozenWeight) for v in nf4)  # q k v o gate up down
    grads = nnx.grad(lambda m: m.loss(batches[0])[0])(model)
    paths = [path for path, _ in nnx.to_flat_state(grads)]
    assert paths and all(path[0] == "trainable" for path in paths)
    assert len(paths) == len(jax.tree.leaves(model.params()))
    optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)
    opt_paths = [path for path, _ in nnx.to_flat_state(nnx.state(optimizer))]
    assert not any("backbone" in path for path in opt_paths)  # no optimizer state for a frozen weight


def test_call_and_loss_are_the_functional_path_to_the_bit(backbone, batches):
    model = _qst(backbone)
    method = QSTModel(backbone.cfg, SideConfig(reduction_factor=8))
    params, batch = model.params(), batches[0]
    assert model.method == method
    got = model(batch["input_ids"], batch["attention_mask"])
    want = method.logits(params, backbone.params, batch["input_ids"], batch["attention_mask"])
    assert np.asarray(got).tobytes() == np.asarray(want).tobytes()
    loss, aux = model.loss(batch)
    total, (weight, _) = method.loss(params, backbone.params, batch)
    assert float(aux["weight"]) == float(weight) == 25.0
    assert np.float32(loss) == np.float32(total / weight)
    # its gradient is the mean's (the backward runs at the sum's scale, then divides, as make_train_step does)
    got = jax.tree.leaves(nnx.grad(lambda m: m.loss(batch)[0])(model))
    want = jax.tree.leaves(jax.grad(lambda p: method.loss(p, backbone.params, batch)[0] / weight)(params))
    for g, w in zip(got, want):
        assert float(jnp.linalg.norm(g - w)) <= 1e-2 * float(jnp.linalg.norm(w)) + 1e-9
    frozen = qnnx.Backbone(backbone)(batch["input_ids"], batch["attention_mask"])
    np.testing.assert_array_equal(np.asarray(frozen), np.asarray(backbone.logits(batch["input_ids"],
                                                                                 batch["attention_mask"])))


@pytest.mark.parametrize("loop", ["nnx.jit", "split"])
def test_nnx_loop_equals_make_train_step(backbone, batches, loop):
    """A few steps of the README's loops give make_train_step's params (to 1e-6); the NF4 bytes never change."""
    tx = optax.adamw(3e-3, weight_decay=0.01)
    model = _qst(backbone)
    start = jax.tree.map(np.array, model.params())  # host copies: both steps donate what they are given
    nf4_before = _leaves(model.backbone.params())
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    if loop == "nnx.jit":
        losses = [float(nnx_step(model, optimizer, batch)) for batch in batches]
    else:
        split_loop(model, optimizer, batches)
    params = jax.tree.map(jnp.asarray, start)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                       rng=jax.random.PRNGKey(0))
    step = make_train_step(model.method, tx)
    for i, batch in enumerate(batches):
        state, metrics = step(state, backbone.params, jax.tree.map(lambda x: x[None], batch))
        if loop == "nnx.jit":
            np.testing.assert_allclose(losses[i], float(metrics["loss"]), rtol=1e-6)
    assert int(optimizer.step.get_value()) == STEPS
    for got, want in zip(_leaves(model.params()), _leaves(state.params)):
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    assert not all(np.array_equal(a, b) for a, b in zip(_leaves(start), _leaves(model.params())))  # it trained
    assert _bytes_equal(nf4_before, _leaves(model.backbone.params()))


def test_nnx_jit_loop_compiles_once(backbone, batches):
    traces = []

    @nnx.jit
    def step(model, optimizer, batch):
        traces.append(1)
        (loss, _), grads = nnx.value_and_grad(lambda m: m.loss(batch), has_aux=True)(model)
        optimizer.update(model, grads)
        return loss

    model = _qst(backbone)
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    for batch in batches:
        step(model, optimizer, batch)
    assert len(traces) == 1


def test_export_round_trip_and_the_cli_takes_it(backbone, batches, model_dir, tmp_path, capsys):
    model = _qst(backbone, seed=3)
    nnx_step(model, nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param), batches[0])
    out = tmp_path / "export"
    model.export(str(out), {"seq_len": 32})
    again = qnnx.QST.from_run(str(out), backbone)
    ids, mask = batches[1]["input_ids"], batches[1]["attention_mask"]
    assert np.asarray(again(ids, mask)).tobytes() == np.asarray(model(ids, mask)).tobytes()
    assert isinstance(qnnx.Tuned.from_run(str(out), backbone), qnnx.QST)
    method, params, info = load_tuned(str(out), backbone)
    assert method == model.method and info["seq_len"] == 32
    with pytest.raises(ExportError, match=r"export/qst_config.json: holds a qst model, not qlora \(use QST or Tuned\)"):
        qnnx.QLoRA.from_run(str(out), backbone)
    text = tmp_path / "eval.txt"
    text.write_text(TEXT * 6)
    assert eval_cli.main(["perplexity", "--data", str(text), "--max-windows", "4", "--model", str(model_dir),
                          "--side", str(out), "--out", str(tmp_path / "eval.json")]) == 0
    assert json.loads((tmp_path / "eval.json").read_text())["perplexity"] > 1.0
    assert generate_cli.main(["--model", str(model_dir), "--side", str(out), "--prompt", "To be",
                              "--max-new-tokens", "3"]) == 0
    capsys.readouterr()


def test_restored_run_equals_an_uninterrupted_one(backbone, batches, tmp_path):
    tx = optax.adamw(3e-3)
    whole = _qst(backbone)
    whole_opt = nnx.Optimizer(whole, tx, wrt=nnx.Param)
    for batch in batches:
        nnx_step(whole, whole_opt, batch)

    first = _qst(backbone)
    first_opt = nnx.Optimizer(first, tx, wrt=nnx.Param)
    nnx_step(first, first_opt, batches[0])
    checkpoints = qnnx.NNXCheckpointer(str(tmp_path / "checkpoints"))
    checkpoints.save(1, first, first_opt, {"data_position": 1})
    with pytest.raises(FileExistsError, match=r"checkpoints/1: a checkpoint of step 1 already exists; save another "
                                              r"step or use another directory$"):
        checkpoints.save(1, first, first_opt)
    resumed = _qst(backbone, seed=9)  # other init: everything must come from the checkpoint
    resumed_opt = nnx.Optimizer(resumed, tx, wrt=nnx.Param)
    step, meta = checkpoints.restore(resumed, resumed_opt)
    assert (step, meta) == (1, {"step": 1, "data_position": 1})
    for batch in batches[1:]:
        nnx_step(resumed, resumed_opt, batch)
    assert _bytes_equal(_leaves(whole.params()), _leaves(resumed.params()))
    assert _bytes_equal(_leaves(nnx.state(whole_opt)), _leaves(nnx.state(resumed_opt)))
    assert not list((tmp_path / "checkpoints").rglob("*backbone*"))


def test_qlora_module_trains_only_lora(backbone, batches):
    model = qnnx.QLoRA(backbone, rank=4, rngs=nnx.Rngs(0))
    loss, _ = model.loss(batches[0])
    total, (weight, _) = model.method.loss(model.params(), backbone.params, batches[0])
    assert np.float32(loss) == np.float32(total / weight)
    grads = nnx.grad(lambda m: m.loss(batches[0])[0])(model)
    assert {path[:2] for path, _ in nnx.to_flat_state(grads)} == {("trainable", "lora")}


def test_modules_share_one_backbone_and_say_what_they_hold(backbone):
    shared = qnnx.Backbone(backbone)
    a, b = qnnx.QST(shared, rngs=nnx.Rngs(0)), qnnx.QST(shared, SideConfig(reduction_factor=4), rngs=nnx.Rngs(1))
    _, frozen, _ = nnx.split((a, b), qnnx.FrozenWeight, ...)
    assert len(jax.tree.leaves(frozen)) == len(jax.tree.leaves(backbone.params))  # held once, not twice
    text = repr(a)
    assert text.startswith(f"QST(lm, {sum(x.size for x in jax.tree.leaves(a.params())):,} trainable params "
                           "(nnx.Param, float32) over Backbone(llama, 4 layers, hidden 256, vocab 1024: frozen, "
                           "7 stacked NF4 weights")
    assert str(a) == text


def test_from_config_and_bad_params(backbone):
    from qst_jax.train.config import base_config

    config = base_config()
    config.method, config.qlora.rank = "qlora", 2
    model = qnnx.Tuned.from_config(config, backbone, rngs=nnx.Rngs(0))
    assert isinstance(model, qnnx.QLoRA) and model.method.rank == 2
    with pytest.raises(ValueError, match=r"^config: holds a qlora model, not qst \(use QLoRA or Tuned\)$"):
        qnnx.QST.from_config(config, backbone, rngs=nnx.Rngs(0))
    params = _qst(backbone).params()
    params["down"] = {}
    with pytest.raises(ValueError, match=r"params do not fit the qst model: missing \['down/"):
        qnnx.QST(backbone, SideConfig(reduction_factor=8), params=params)
    with pytest.raises(TypeError, match=r"QST: give rngs=nnx.Rngs\(seed\) to initialize the params"):
        qnnx.QST(backbone)


def test_ids_outside_the_vocabulary_are_refused_not_a_nan_loss(backbone, batches):
    """Out-of-range ids gather nothing XLA complains about: the door checks concrete ids and names the largest."""
    model = _qst(backbone)
    batch = dict(batches[0])
    ids = np.array(batch["input_ids"])
    ids[0, 1] = 1024
    with pytest.raises(ValueError, match=r"^input_ids: id 1024 is outside the vocabulary of 1024$"):
        model.loss({**batch, "input_ids": ids})
    ids[0, 1] = -1
    with pytest.raises(ValueError, match=r"^input_ids: id -1 is outside the vocabulary of 1024$"):
        model(ids)
    with pytest.raises(ValueError, match=r"^input_ids: id 5000 is outside the vocabulary of 1024$"):
        qnnx.Backbone(backbone)(np.full((1, 4), 5000))
    assert np.isfinite(float(model.loss(batch)[0]))


def test_export_and_checkpoints_follow_the_run_directorys_rules(backbone, batches, tmp_path):
    """An export never replaces a run's results unasked, and nothing writes where a qst-train holds the lock."""
    from qst_jax.run_dir import RunDirectory

    model = _qst(backbone)
    out = tmp_path / "export"
    model.export(str(out))
    assert sorted(p.name for p in out.iterdir()) == ["qst_config.json", "side.safetensors"]  # no .lock left
    before = (out / "side.safetensors").read_bytes()
    with pytest.raises(RuntimeError, match=rf"^{out}: already holds an export \(side.safetensors, "
                                           r"qst_config.json\); export with overwrite=True replaces it, or choose "
                                           r"another directory$"):
        _qst(backbone, seed=5).export(str(out))
    assert (out / "side.safetensors").read_bytes() == before
    _qst(backbone, seed=5).export(str(out), overwrite=True)
    assert (out / "side.safetensors").read_bytes() != before
    beside = tmp_path / "beside"  # README's flow: checkpoints, then the export beside them
    qnnx.NNXCheckpointer(str(beside / "checkpoints")).save(1, model, nnx.Optimizer(model, optax.adam(1e-3),
                                                                                   wrt=nnx.Param))
    model.export(str(beside))
    assert (beside / "checkpoints" / "1").is_dir() and (beside / "side.safetensors").is_file()

    run = tmp_path / "running"
    holder = RunDirectory(str(run))  # what a running qst-train holds
    holder.acquire(resume=False, overwrite=False)
    try:
        with pytest.raises(RuntimeError, match=rf"^{run}: in use by another qst-train \(pid {os.getpid()}: .*\); "
                                               r"wait for it to finish or choose another directory$"):
            model.export(str(run))
        optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
        with pytest.raises(RuntimeError, match=rf"^{run}/checkpoints: in use by another qst-train "
                                               r"\(pid \d+: .*\); NNXCheckpointer.save waits for it to finish"):
            qnnx.NNXCheckpointer(str(run / "checkpoints")).save(1, model, optimizer)
        assert not (run / "side.safetensors").exists() and not (run / "checkpoints" / "1").exists()
    finally:
        holder.release()
