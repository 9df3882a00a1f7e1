"""qst-train end to end on the tiny fixture: outputs, exact resume, signals, errors."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from qst_jax.data.sources import DataError
from qst_jax.models import CheckpointError, ConfigError, load_config
from qst_jax.methods import ExportError, load_side
from qst_jax.train.trainer import Trainer, TrainingError
from tests.helpers import tiny_config, tiny_model_dir

REPO = pathlib.Path(__file__).parents[2]


@pytest.fixture(scope="module")
def model_dir(testdata, tmp_path_factory):
    return tiny_model_dir(testdata, tmp_path_factory.mktemp("model"))


def quiet(*_args):
    pass


def test_run_writes_every_output(model_dir, tmp_path):
    config = tiny_config(model_dir, tmp_path, **{"train.eval_every": 3})
    summary = Trainer(config, log=quiet).run()
    out = tmp_path / "run"
    assert summary["steps"] == 6
    assert summary["eval_after"]["loss"] < summary["eval_before"]["loss"]
    for name in ("side.safetensors", "qst_config.json", "metrics.jsonl", "loss.png", "summary.json"):
        assert (out / name).is_file(), name
    assert any(p.name.startswith("events.out.tfevents") for p in (out / "tb").iterdir())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert {"loss", "grad_norm", "lr"} <= set(train[0]) and "tokens_per_s" not in train[0]  # step 1 compiles
    assert {"loss", "grad_norm", "lr", "tokens_per_s"} <= set(train[1])
    assert [r["step"] for r in records if r["split"] == "eval"] == [0, 3, 6]
    steps = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [3, 6]
    params, info = load_side(str(out), load_config(model_dir))
    assert info["method"] == "qst" and info["step"] == 6
    assert params["gates"].shape == (4, 32)


def test_export_refuses_another_backbone(model_dir, tmp_path, testdata):
    config = tiny_config(model_dir, tmp_path, **{"train.steps": 1, "data.eval": ""})
    Trainer(config, log=quiet).run()
    with pytest.raises(ExportError, match="trained for another backbone"):
        load_side(str(tmp_path / "run"), load_config(testdata / "tiny-opt-nf4"))


def _config_file(tmp_path, model_dir, **overrides) -> pathlib.Path:
    path = tmp_path / "cfg.py"
    path.write_text(
        "import pathlib\nfrom tests.helpers import tiny_config\n\n"
        f"def get_config():\n    return tiny_config(pathlib.Path({str(model_dir)!r}), pathlib.Path({str(tmp_path)!r}), "
        f"**{overrides!r})\n"
    )
    return path


def _cli(config: pathlib.Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), QST_NO_PROGRESS="1")
    return subprocess.Popen(
        [sys.executable, "-m", "qst_jax.cli.train", f"--config={config}", *extra],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def _wait_for_checkpoint(run_dir: pathlib.Path, step: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    target = run_dir / "checkpoints" / str(step)
    deadline = time.time() + timeout
    while not target.is_dir():
        if proc.poll() is not None:
            raise AssertionError(f"run ended before checkpoint {step}: {proc.stdout.read()}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for a checkpoint")
        time.sleep(0.005)


@pytest.mark.slow
def test_sigkill_then_resume_is_bitwise_exact(model_dir, tmp_path):
    steps = {"train.steps": 20, "train.checkpoint_every": 3, "data.eval": ""}
    reference_dir = tmp_path / "reference"
    reference_dir.mkdir()
    # The uninterrupted reference writes no checkpoints: saving must not change training either.
    ref = Trainer(tiny_config(model_dir, reference_dir, **{**steps, "train.checkpoint_every": 0}), log=quiet)
    ref.run()

    run_dir = tmp_path / "killed"
    run_dir.mkdir()
    cfg = _config_file(run_dir, model_dir, **steps)
    proc = _cli(cfg)
    _wait_for_checkpoint(run_dir / "run", 3, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (run_dir / "run" / "side.safetensors").exists()

    resumed = _cli(cfg, "--resume")
    output, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, output
    assert "resumed from step" in output
    a = load_file(str(reference_dir / "run" / "side.safetensors"))
    b = load_file(str(run_dir / "run" / "side.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].tobytes() == b[key].tobytes(), key


def test_resume_keeps_each_parameter_groups_optimizer_state(model_dir, tmp_path):
    """With read-out and gate rates of their own (optax.multi_transform state), resuming is exact too."""
    groups = {"optim.readout_lr": 1e-2, "optim.gate_lr": 5e-2, "data.eval": "", "train.steps": 6}
    (tmp_path / "reference").mkdir()
    Trainer(tiny_config(model_dir, tmp_path / "reference", **{**groups, "train.checkpoint_every": 0}), log=quiet).run()
    (tmp_path / "halves").mkdir()
    config = tiny_config(model_dir, tmp_path / "halves", **{**groups, "train.checkpoint_every": 3})
    Trainer(config, log=quiet).run()
    shutil.rmtree(tmp_path / "halves" / "run" / "checkpoints" / "6")  # as if stopped after step 3's checkpoint
    lines = []
    Trainer(config, resume=True, log=lines.append).run()
    assert "resumed from step 3" in lines
    a = load_file(str(tmp_path / "reference" / "run" / "side.safetensors"))
    b = load_file(str(tmp_path / "halves" / "run" / "side.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].tobytes() == b[key].tobytes(), key


@pytest.mark.slow
@pytest.mark.parametrize("checkpoint_every", [3, 0])
def test_sigterm_saves_a_checkpoint(model_dir, tmp_path, checkpoint_every):
    """Also with periodic checkpoints off: a stop always leaves one to resume from."""
    cfg = _config_file(tmp_path, model_dir, **{"train.steps": 400, "train.checkpoint_every": checkpoint_every,
                                               "data.eval": ""})
    proc = _cli(cfg)
    if checkpoint_every:
        _wait_for_checkpoint(tmp_path / "run", 3, proc)
    else:
        metrics, deadline = tmp_path / "run" / "metrics.jsonl", time.time() + 240
        while not (metrics.is_file() and '"train"' in metrics.read_text()) and time.time() < deadline:
            time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, output
    assert "stopped by signal" in output and "resume with --resume" in output
    stopped = int(output.split("at step ")[1].split(";")[0])
    assert (tmp_path / "run" / "checkpoints" / str(stopped)).is_dir()


def test_nan_loss_stops_and_keeps_last_good_checkpoint(model_dir, tmp_path):
    config = tiny_config(model_dir, tmp_path, **{"optim.lr": 1e12, "train.checkpoint_every": 1, "data.eval": "",
                                                  "optim.clip_norm": 0.0, "train.steps": 20})
    with pytest.raises(TrainingError, match=r"non-finite loss .* at step (\d+).*last good checkpoint is step \d+"):
        Trainer(config, log=quiet).run()
    assert not (tmp_path / "run" / "side.safetensors").exists()


def test_empty_dataset(model_dir, tmp_path):
    config = tiny_config(model_dir, tmp_path)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    config.data.train = str(empty)
    with pytest.raises(DataError, match="empty"):
        Trainer(config, log=quiet)


def test_missing_column_and_label_out_of_range(model_dir, tmp_path):
    config = tiny_config(model_dir, tmp_path, **{"data.eval": ""})
    config.task = "classification"
    data = tmp_path / "cls.tsv"
    data.write_text("sentence\tlabel\n" + "".join(f"good film {i}\t{i % 2}\n" for i in range(12)) + "bad\t7\n")
    config.data.train = str(data)
    config.data.text_column = "text"
    with pytest.raises(DataError, match=r"missing column\(s\) \['text'\]; the data has \['sentence', 'label'\]"):
        Trainer(config, log=quiet)
    config.data.text_column = "sentence"
    with pytest.raises(DataError, match=r"cls.tsv, record 13: label 7 is out of range for 2 classes \(1 such rows\)"):
        Trainer(config, log=quiet)


def test_classification_run(model_dir, tmp_path):
    config = tiny_config(model_dir, tmp_path)
    config.task = "classification"
    rows = "".join(f"{'great fun' if i % 2 else 'dull and slow'} {i}\t{i % 2}\n" for i in range(32))
    (tmp_path / "cls.tsv").write_text("sentence\tlabel\n" + rows)
    config.data.train = config.data.eval = str(tmp_path / "cls.tsv")
    config.data.text_column = "sentence"
    summary = Trainer(config, log=quiet).run()
    assert 0.0 <= summary["eval_after"]["accuracy"] <= 1.0
    params, info = load_side(str(tmp_path / "run"))
    assert params["score"]["w"].shape == (2, 256) and info["task"] == "classification"


def test_missing_model_path(tmp_path, model_dir):
    config = tiny_config(model_dir, tmp_path)
    config.model.path = str(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no such file or directory"):
        Trainer(config, log=quiet)


@pytest.mark.parametrize("key, value, match", [
    ("side", "zero3", r"parallel.side: 'zero3' is not one of \('replicated', 'fsdp'\)"),
    ("fsdp", 3, "train.batch_size: 2 must divide by parallel.data x parallel.fsdp = 3"),
])
def test_bad_parallel_settings_fail_before_loading(tmp_path, model_dir, key, value, match):
    config = tiny_config(model_dir, tmp_path)
    config.parallel[key] = value
    with pytest.raises(ValueError, match=match):
        Trainer(config, log=quiet)


def test_cli_unknown_config_key(model_dir, tmp_path):
    proc = _cli(_config_file(tmp_path, model_dir), "--config.train.learning_rate=0.1")
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "learning_rate" in output


def test_custom_optax_transformation(model_dir, tmp_path):
    import optax

    config = tiny_config(model_dir, tmp_path, **{"data.eval": "", "train.steps": 2})
    seen = []

    def schedule(step):
        seen.append(step)
        return 1e-3

    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(schedule))
    trainer = Trainer(config, tx=tx, schedule=schedule, log=quiet)
    summary = trainer.run()
    assert summary["steps"] == 2 and seen  # the user's schedule was used
    assert trainer.tx is tx  # and the user's own transformation, not one built from the config


def _fake_step(losses: dict[int, float]):
    """A train step that only counts: loss `losses.get(step, step)` (a known sequence), grad norm 1."""
    import dataclasses

    import jax.numpy as jnp

    table = jnp.asarray([losses.get(s, float(s)) for s in range(64)], jnp.float32)

    def step(state, _backbone_params, _batch):
        new = state.step + 1
        metrics = {"loss": table[new], "grad_norm": jnp.ones((), jnp.float32), "weight": jnp.full((), 8.0)}
        return dataclasses.replace(state, step=new), metrics

    return jax.jit(step)


def test_logged_train_loss_is_the_window_mean(model_dir, tmp_path):
    config = tiny_config(model_dir, tmp_path, **{"train.steps": 7, "train.log_every": 3, "data.eval": "",
                                                  "train.checkpoint_every": 0})
    trainer = Trainer(config, log=quiet)
    trainer.train_step = _fake_step({})  # step s has loss s
    trainer.run()
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert [(r["step"], r["loss"], r["steps"], r["weight"]) for r in train] == [
        (3, 2.0, 3, 24.0), (6, 5.0, 3, 24.0), (7, 7.0, 1, 8.0)]  # means of 1..3, 4..6, 7; weights summed


def test_non_finite_loss_inside_a_window_is_caught_before_the_checkpoint(model_dir, tmp_path):
    config = tiny_config(model_dir, tmp_path, **{"train.steps": 6, "train.log_every": 5, "data.eval": "",
                                                  "train.checkpoint_every": 3})
    trainer = Trainer(config, log=quiet)
    trainer.train_step = _fake_step({2: float("nan")})
    with pytest.raises(TrainingError, match=r"^non-finite loss nan at step 2; stopped without saving\. "
                                            r"No checkpoint was written yet\.$"):
        trainer.run()
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


def test_bad_config_is_reported_before_anything_is_loaded(model_dir, tmp_path):
    config = tiny_config(model_dir, tmp_path, **{"train.steps": 0, "data.seq_len": 1})
    config.model.path = str(tmp_path / "no-such-model")  # would be a CheckpointError, were it reached
    config.side.downsampler = "conv"
    config.optim.lr = float("inf")
    with pytest.raises(ConfigError) as err:
        Trainer(config, log=quiet)
    assert str(err.value).splitlines() == [
        "bad config:",
        "  side.downsampler: 'conv' is not one of ('adapter', 'lora', 'linear', 'maxpool', 'avgpool')",
        "  train.steps: 0 must be an integer >= 1",
        "  data.seq_len: 1 must be an integer >= 2",
        "  optim.lr: inf must be a finite number > 0",
    ]


def test_seq_len_beyond_the_models_context_is_a_config_error(model_dir, tmp_path):
    context = load_config(model_dir).max_position_embeddings
    config = tiny_config(model_dir, tmp_path, **{"data.seq_len": context + 1})
    with pytest.raises(ConfigError, match=f"data.seq_len: {context + 1} exceeds the model's context of {context}"):
        Trainer(config, log=quiet)


@pytest.mark.parametrize("args, message", [
    (["--config=configs/nope.py"], "qst-train: error: --config configs/nope.py: no such file (recipes are in configs/)"),
    (["--config=configs/default.py", "--config.train.stepz=2"],
     "qst-train: error: --config.train.stepz: no such config key (every key and its default: qst_jax/train/config.py)"),
    (["--config=configs/default.py", "--config.train.steps=0", "--config.model.path=/no/such/model"],
     "qst-train: error: bad config:\n  train.steps: 0 must be an integer >= 1"),
])
def test_cli_config_errors_are_one_line_each(args, message):
    env = dict(os.environ, PYTHONPATH=str(REPO), QST_NO_PROGRESS="1")
    proc = subprocess.run([sys.executable, "-m", "qst_jax.cli.train", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and proc.stderr.strip() == message and "Traceback" not in proc.stdout
