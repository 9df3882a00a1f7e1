"""GLUE file layouts, multiple-choice scoring on a constructed set, and the CLIs."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qst_jax.cli import eval as eval_cli
from qst_jax.cli import generate as generate_cli
from qst_jax.data.sources import DataError
from qst_jax.eval.glue import GLUE_TASKS, read_glue
from qst_jax.eval.tasks import mmlu
from qst_jax.train.trainer import Trainer
from tests.helpers import save_tiny_tokenizer, tiny_config, tiny_model_dir


def test_glue_layouts(tmp_path):
    cola = tmp_path / "cola.tsv"  # the release's CoLA has no header
    cola.write_text("gj04\t1\t\tThe sailors rode the breeze clear of the rocks.\ngj04\t0\t*\tThe more books I ask.\n")
    texts, pairs, labels = read_glue(str(cola), GLUE_TASKS["cola"])
    assert texts[1] == "The more books I ask." and pairs is None and labels.tolist() == [1, 0]

    mnli = tmp_path / "mnli.tsv"
    mnli.write_text("index\tsentence1\tsentence2\tgold_label\n0\ta\tb\tneutral\n1\tc\td\tcontradiction\n")
    texts, pairs, labels = read_glue(str(mnli), GLUE_TASKS["mnli"])
    assert pairs == ["b", "d"] and labels.tolist() == [2, 0]

    stsb = tmp_path / "stsb.tsv"
    stsb.write_text("index\tsentence1\tsentence2\tscore\n0\ta\tb\t3.8\n")
    assert read_glue(str(stsb), GLUE_TASKS["stsb"])[2].tolist() == pytest.approx([3.8])

    bad = tmp_path / "rte.tsv"
    bad.write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n")
    with pytest.raises(DataError, match="label 'maybe' is not one of"):
        read_glue(str(bad), GLUE_TASKS["rte"])
    with pytest.raises(DataError, match="missing column 'question'"):
        read_glue(str(bad), GLUE_TASKS["qnli"])


def _write_mmlu(root):
    (root / "dev").mkdir(parents=True)
    (root / "test").mkdir()
    (root / "dev" / "astronomy_dev.csv").write_text("Which is a planet?,Sun,Mars,Moon,Comet,B\n")
    (root / "test" / "astronomy_test.csv").write_text(
        "Q1?,a,b,c,d,B\nQ2?,a,b,c,d,B\nQ3?,a,b,c,d,C\n"
    )
    (root / "test" / "virology_test.csv").write_text("Q?,a,b,c,d,A\n")


def test_mmlu_scoring_on_known_answers(tmp_path):
    tokenizer = save_tiny_tokenizer(tmp_path / "tok")
    _write_mmlu(tmp_path / "mmlu")
    b_token = tokenizer(" B", add_special_tokens=False).input_ids[-1]
    prompts_seen = []

    def always_b(ids, mask):  # a "model" that always answers B
        prompts_seen.append(tokenizer.decode(np.asarray(ids[0])[np.asarray(mask[0]) == 1]))
        logits = np.zeros((ids.shape[0], 500), np.float32)
        logits[:, b_token] = 1.0
        return jnp.asarray(logits)

    result = mmlu(always_b, tokenizer, str(tmp_path / "mmlu"), shots=1)
    assert result["subjects"] == {"astronomy": pytest.approx(2 / 3), "virology": 0.0}
    assert result["average"] == pytest.approx(1 / 3) and result["questions"] == 4
    first = prompts_seen[0]
    assert first.startswith("The following are multiple choice questions (with answers) about astronomy.")
    assert "Which is a planet?\nA. Sun\nB. Mars\nC. Moon\nD. Comet\nAnswer: B\n\nQ1?" in first
    assert first.endswith("Answer:")


@pytest.fixture(scope="module")
def trained(testdata, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trained")
    model_dir = tiny_model_dir(testdata, tmp)
    config = tiny_config(model_dir, tmp)
    summary = Trainer(config, log=lambda *a: None).run()
    return model_dir, tmp, config, summary


def test_qst_eval_reproduces_training_perplexity(trained, capsys):
    model_dir, tmp, config, summary = trained
    out = tmp / "ppl.json"
    code = eval_cli.main([
        "perplexity", "--model", str(model_dir), "--side", str(tmp / "run"), "--data", config.data.eval,
        "--seq-len", str(config.data.seq_len), "--max-windows", str(config.data.eval_examples), "--out", str(out),
    ])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["perplexity"] == pytest.approx(summary["eval_after"]["perplexity"], rel=1e-6)
    assert "perplexity" in capsys.readouterr().out
    # The frozen layers streamed from host memory, one layer ahead: on the CPU the copy is a no-op, the same figure.
    if hasattr(jax, "memory"):
        streamed = tmp / "ppl_streamed.json"
        assert eval_cli.main([
            "perplexity", "--model", str(model_dir), "--side", str(tmp / "run"), "--data", config.data.eval,
            "--seq-len", str(config.data.seq_len), "--max-windows", str(config.data.eval_examples),
            "--offload", "weights", "--out", str(streamed)]) == 0
        assert json.loads(streamed.read_text()) == result


def test_qst_generate_file_and_errors(trained, tmp_path, testdata, capsys):
    model_dir, tmp, _, _ = trained
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "To be"}) + "\n" + json.dumps({"messages": [{"role": "user", "content": "who?"}]}) + "\n")
    code = generate_cli.main(["--model", str(model_dir), "--side", str(tmp / "run"), "--file", str(prompts),
                              "--max-new-tokens", "5"])
    assert code == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(lines) == 2 and all("completion" in x for x in lines)
    # a side network trained for another backbone
    other = tiny_model_dir(testdata, tmp_path, "tiny-opt-nf4")
    code = generate_cli.main(["--model", str(other), "--side", str(tmp / "run"), "--prompt", "x"])
    assert code == 1 and "trained for another backbone" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "oracle", "content": "?"}]}) + "\n")
    assert generate_cli.main(["--model", str(model_dir), "--file", str(bad)]) == 1
    assert "unknown chat role 'oracle'" in capsys.readouterr().err


def test_eval_missing_column(trained, tmp_path, capsys):
    model_dir, tmp, _, _ = trained
    data = tmp_path / "x.jsonl"
    data.write_text(json.dumps({"body": "words"}) + "\n")
    assert eval_cli.main(["perplexity", "--model", str(model_dir), "--data", str(data)]) == 1
    assert "missing column(s) ['text']" in capsys.readouterr().err


def test_periodic_mmlu_inside_training(testdata, tmp_path):
    model_dir = tiny_model_dir(testdata, tmp_path)
    _write_mmlu(tmp_path / "mmlu")
    config = tiny_config(model_dir, tmp_path, **{"train.eval_every": 3, "data.eval": ""})
    config.evaluation.kind = "mmlu"
    config.evaluation.data = str(tmp_path / "mmlu")
    config.evaluation.shots = 1
    summary = Trainer(config, log=lambda *a: None).run()
    assert 0.0 <= summary["task_eval"]["mmlu_average"] <= 1.0
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "task"] == [3, 6]


def test_qst_eval_classify(testdata, tmp_path, capsys):
    model_dir = tiny_model_dir(testdata, tmp_path)
    rows = "".join(f"{'great fun' if i % 2 else 'dull and slow'} {i}\t{i % 2}\n" for i in range(24))
    data = tmp_path / "sst2.tsv"
    data.write_text("sentence\tlabel\n" + rows)
    config = tiny_config(model_dir, tmp_path)
    config.task = "classification"
    config.data.train = config.data.eval = str(data)
    config.data.text_column = "sentence"
    summary = Trainer(config, log=lambda *a: None).run()
    out = tmp_path / "cls.json"
    code = eval_cli.main(["classify", "--model", str(model_dir), "--side", str(tmp_path / "run"), "--task", "sst2",
                          "--data", str(data), "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["examples"] == 24
    assert result["accuracy"] == pytest.approx(summary["eval_after"]["accuracy"], abs=1e-6)
