"""A sweep run end to end on the tiny fixture: outputs per member, ranking, resume, user's optax, errors."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from safetensors.numpy import load_file

from qst_jax.methods import load_tuned
from qst_jax.models import ConfigError, load_backbone
from qst_jax.train.sweep_run import SweepRun
from qst_jax.train.single_run import SingleRun
from qst_jax.train.trainer import Trainer
from tests.helpers import tiny_config, tiny_model_dir


@pytest.fixture(scope="module")
def model_dir(testdata, tmp_path_factory):
    return tiny_model_dir(testdata, tmp_path_factory.mktemp("model"))


def quiet(*_args):
    pass


def _sweep_config(model_dir, tmp_path, **overrides):
    c = tiny_config(model_dir, tmp_path, **{"train.steps": 4, "train.checkpoint_every": 0, "train.log_every": 2,
                                            "optim.schedule": "constant", **overrides})
    c.sweep.lr = "1e-3,1e-2"
    c.sweep.seed = "0,1"
    return c


NAMES = ["lr=1e-3_seed=0", "lr=1e-2_seed=1"]


@pytest.fixture(scope="module")
def sweep_runs(model_dir, tmp_path_factory):
    """(reference: 4 steps straight, no eval; resumed: 2 steps, then --resume to 4, with eval) and the log."""
    ref, cut = tmp_path_factory.mktemp("ref"), tmp_path_factory.mktemp("cut")
    Trainer(_sweep_config(model_dir, ref, **{"data.eval": ""}), log=quiet).run()
    Trainer(_sweep_config(model_dir, cut, **{"train.steps": 2, "train.checkpoint_every": 2}), log=quiet).run()
    lines = []
    trainer = Trainer(_sweep_config(model_dir, cut, **{"train.checkpoint_every": 2}), resume=True, log=lines.append)
    assert isinstance(trainer.spec, SweepRun)
    summary = trainer.run()
    return ref / "run", cut / "run", summary, lines, cut


def test_one_trainer_runs_either_spec(model_dir, tmp_path):
    """The config (or a list of tx) decides the spec; the trainer is the same."""
    folders = [tmp_path / name for name in "abc"]
    for folder in folders:
        folder.mkdir()
    single = Trainer(tiny_config(model_dir, folders[0], **{"train.steps": 1}), log=quiet)
    listed = Trainer(tiny_config(model_dir, folders[1], **{"train.steps": 1}), tx=[optax.adam(1e-3)] * 2, log=quiet)
    swept = Trainer(_sweep_config(model_dir, folders[2]), log=quiet)
    assert (type(single.spec), type(listed.spec), type(swept.spec)) == (SingleRun, SweepRun, SweepRun)
    assert [m.name for m in swept.spec.members] == NAMES
    for t in (single, listed, swept):
        t.run_dir.release()


def test_a_sweep_run_writes_each_members_outputs(model_dir, sweep_runs):
    _, run, summary, lines, _ = sweep_runs
    ranked = summary["members"]
    assert sorted(r["member"] for r in ranked) == sorted(NAMES)
    assert [r["rank"] for r in ranked] == [1, 2] and ranked[0]["loss"] <= ranked[1]["loss"]
    assert json.loads((run / "summary.json").read_text())["members"] == ranked
    assert any(line.strip().startswith("1  " + ranked[0]["member"]) for line in lines)  # the printed table
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {(r["split"], r.get("member")) for r in records} >= {("train", n) for n in NAMES} | {("eval", "frozen")}
    assert [r["step"] for r in records if r["split"] == "train" and r["member"] == NAMES[0]] == [2, 4]
    assert (run / "loss.png").stat().st_size > 0
    backbone = load_backbone(model_dir)
    trained = {}
    for name in NAMES:
        model, params, info = load_tuned(str(run / "members" / name), backbone)
        assert info["sweep_member"] == name and model.name == "qst"
        trained[name] = params
        member_eval = next(r for r in ranked if r["member"] == name)
        logged = [r for r in records if r["split"] == "eval" and r.get("member") == name][-1]
        assert logged["loss"] == pytest.approx(member_eval["loss"])
    a, b = (jax.tree.leaves(trained[n]) for n in NAMES)
    assert any(not np.array_equal(x, y) for x, y in zip(a, b))


def test_sweep_resume_is_bitwise_exact(sweep_runs):
    ref, run, _, lines, _ = sweep_runs
    assert "resumed from step 2" in lines
    for name in NAMES:
        a = load_file(str(ref / "members" / name / "side.safetensors"))
        b = load_file(str(run / "members" / name / "side.safetensors"))
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].tobytes() == b[key].tobytes(), (name, key)


def test_a_sweep_of_your_own_optax_where_one_diverges(model_dir, tmp_path):
    """Members are your own optax transformations (named by the dict); the one that diverges is named, ranked last."""
    c = tiny_config(model_dir, tmp_path, **{"train.steps": 3, "train.checkpoint_every": 0, "train.log_every": 3})
    lines = []
    summary = Trainer(c, tx={"ok": optax.adam(1e-3), "wild": optax.sgd(1e38)}, log=lines.append).run()
    assert [r["member"] for r in summary["members"]] == ["ok", "wild"]
    assert "diverged_at" in summary["members"][1] and "diverged_at" not in summary["members"][0]
    assert any(line.startswith("sweep member wild: non-finite loss or gradient norm at step") for line in lines)
    assert np.isfinite(summary["members"][0]["loss"])
    params = load_file(str(tmp_path / "run" / "members" / "wild" / "side.safetensors"))
    assert all(np.isfinite(v).all() for v in params.values())


def test_sweep_errors_come_before_loading(tmp_path):
    c = tiny_config(tmp_path / "no-such-model", tmp_path)
    c.sweep.lr = "1e-3,x"
    with pytest.raises(ConfigError, match=r"sweep.lr: 'x' is not a float"):
        Trainer(c, log=quiet)
    assert not (tmp_path / "run").exists()
    c.sweep.lr = "1e-3"
    c.method = "qlora"
    with pytest.raises(ConfigError, match=r"sweep.lr: a sweep trains QST side networks"):
        Trainer(c, log=quiet)


def test_the_members_serve_qst_eval_and_qst_generate_together(model_dir, sweep_runs, tmp_path, capsys):
    """A sweep's members evaluated with one backbone pass equal their separate evaluations; a file names sides."""
    from qst_jax.cli import eval as qst_eval
    from qst_jax.cli import generate as qst_generate

    _, run, _, _, root = sweep_runs
    a, b = (str(run / "members" / n) for n in NAMES)
    data = str(root / "eval.txt")
    common = ["--model", str(model_dir), "--dtype", "float32", "--data", data, "--seq-len", "32"]
    together = tmp_path / "together.json"
    assert qst_eval.main(["perplexity", *common, "--side", a, "--side", b, "--out", str(together)]) == 0
    rows = json.loads(together.read_text())
    assert list(rows) == ["frozen", "lr=1e-3_seed=0", "lr=1e-2_seed=1"]
    for name, side in (("frozen", None), ("lr=1e-3_seed=0", a), ("lr=1e-2_seed=1", b)):
        alone = tmp_path / f"{name}.json"
        assert qst_eval.main(["perplexity", *common, *(["--side", side] if side else []), "--out", str(alone)]) == 0
        assert rows[name]["loss"] == pytest.approx(json.loads(alone.read_text())["loss"], rel=1e-5), name
    assert "lr=1e-2_seed=1" in capsys.readouterr().out  # the table

    prompts = tmp_path / "prompts.jsonl"
    lines = [{"prompt": "To be, or not", "side": "lr=1e-2_seed=1"}, {"prompt": "To be, or not"},
             {"prompt": "whether 'tis nobler", "side": "lr=1e-3_seed=0"}]
    prompts.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    gen_args = ["--model", str(model_dir), "--dtype", "float32", "--max-new-tokens", "4"]
    assert qst_generate.main([*gen_args, "--side", a, "--side", b, "--file", str(prompts)]) == 0
    mixed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r.get("side") for r in mixed] == [r.get("side") for r in lines]
    for record, out in zip(lines, mixed):
        single = tmp_path / "one.jsonl"
        single.write_text(json.dumps({"prompt": record["prompt"]}) + "\n")
        side = {"lr=1e-3_seed=0": a, "lr=1e-2_seed=1": b}.get(record.get("side"))
        assert qst_generate.main([*gen_args, *(["--side", side] if side else []), "--file", str(single)]) == 0
        assert json.loads(capsys.readouterr().out)["completion"] == out["completion"]
    prompts.write_text(json.dumps({"prompt": "x", "side": "nope"}) + "\n")
    assert qst_generate.main([*gen_args, "--side", a, "--side", b, "--file", str(prompts)]) == 1
    assert (f"{prompts}:1: side 'nope' is not one of ['lr=1e-3_seed=0', 'lr=1e-2_seed=1'] or null (the base model)"
            in capsys.readouterr().err)
