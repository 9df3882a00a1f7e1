"""Every method x task trains, exports, and loads back in qst-eval and qst-generate with the figure training printed."""

from __future__ import annotations

import json

import pytest

from qst_jax.cli import eval as eval_cli
from qst_jax.cli import generate as generate_cli
from qst_jax.methods import load_tuned
from qst_jax.train.trainer import Trainer
from tests.helpers import tiny_config, tiny_model_dir


@pytest.fixture(scope="module")
def model_dir(testdata, tmp_path_factory):
    return tiny_model_dir(testdata, tmp_path_factory.mktemp("model"))


def _train(model_dir, tmp_path, method: str, task: str):
    config = tiny_config(model_dir, tmp_path, **{"train.steps": 2, "train.checkpoint_every": 0})
    config.method, config.task = method, task
    if task == "classification":
        rows = "".join(f"{'great fun' if i % 2 else 'dull and slow'} {i}\t{i % 2}\n" for i in range(12))
        (tmp_path / "cls.tsv").write_text("sentence\tlabel\n" + rows)
        config.data.train = config.data.eval = str(tmp_path / "cls.tsv")
        config.data.text_column = "sentence"
    elif task == "chat":
        records = [{"prompt": f"say {w}", "response": f"{w} indeed"} for w in ("yes", "no", "maybe", "so")] * 3
        (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        config.data.train = config.data.eval = str(tmp_path / "chat.jsonl")
    trainer = Trainer(config, log=lambda *a: None)
    return trainer, trainer.run()


@pytest.mark.parametrize("method", ["qst", "qlora"])
@pytest.mark.parametrize("task", ["lm", "chat", "classification"])
def test_round_trip(model_dir, tmp_path, capsys, method, task):
    trainer, summary = _train(model_dir, tmp_path, method, task)
    run = str(tmp_path / "run")
    model, params, info = load_tuned(run, trainer.backbone)
    assert (model.name, info["task"]) == (method, task)
    assert trainer.evaluate(params) == pytest.approx(summary["eval_after"], rel=1e-6)  # the export is the model
    out = tmp_path / "eval.json"
    if task == "lm":
        args = ["perplexity", "--data", str(tmp_path / "eval.txt"), "--max-windows", "8"]
        assert eval_cli.main([*args, "--model", str(model_dir), "--side", run, "--out", str(out)]) == 0
        assert json.loads(out.read_text())["perplexity"] == pytest.approx(summary["eval_after"]["perplexity"],
                                                                         rel=1e-5)
    if task == "classification":
        args = ["classify", "--task", "sst2", "--data", str(tmp_path / "cls.tsv")]
        assert eval_cli.main([*args, "--model", str(model_dir), "--side", run, "--out", str(out)]) == 0
        assert json.loads(out.read_text())["accuracy"] == pytest.approx(summary["eval_after"]["accuracy"], abs=1e-6)
        assert generate_cli.main(["--model", str(model_dir), "--side", run, "--prompt", "x"]) == 1
        assert "a classification model cannot generate text" in capsys.readouterr().err
    else:
        assert generate_cli.main(["--model", str(model_dir), "--side", run, "--prompt", "To be",
                                  "--max-new-tokens", "3"]) == 0
