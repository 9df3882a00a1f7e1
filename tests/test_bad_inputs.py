"""Hostile inputs to the four commands: each fails with one line naming the file, row or key, and a finished
run's directory is byte-for-byte unchanged afterwards. Plus the run-directory rules and resume."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest

from qst_jax.cli import eval as eval_cli
from qst_jax.cli import generate as generate_cli
from qst_jax.run_dir import RunDirectory
from qst_jax.train.trainer import Trainer
from tests.helpers import tiny_config, tiny_model_dir

REPO = pathlib.Path(__file__).parents[1]


def quiet(*_args):
    pass


def snapshot(directory: pathlib.Path) -> dict[str, str]:
    """Every file under `directory` with the sha256 of its bytes."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def model_dir(testdata, tmp_path_factory):
    return tiny_model_dir(testdata, tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def finished(model_dir, tmp_path_factory):
    """A finished QST run (LM, 3 steps, a checkpoint at 3) and its config file."""
    root = tmp_path_factory.mktemp("finished")
    config = tiny_config(model_dir, root, **{"train.steps": 3, "train.checkpoint_every": 3})
    Trainer(config, log=quiet).run()
    return root, _config_file(root, model_dir, {"train.steps": 3, "train.checkpoint_every": 3})


def _config_file(root: pathlib.Path, model_dir: pathlib.Path, overrides: dict, name: str = "cfg.py") -> pathlib.Path:
    path = root / name
    path.write_text(
        "import pathlib\nfrom tests.helpers import tiny_config\n\n"
        f"def get_config():\n    return tiny_config(pathlib.Path({str(model_dir)!r}), pathlib.Path({str(root)!r}), "
        f"**{overrides!r})\n"
    )
    return path


def qst_train(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), QST_NO_PROGRESS="1")
    return subprocess.run([sys.executable, "-m", "qst_jax.cli.train", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _bad_tsv(root: pathlib.Path) -> str:
    path = root / "labels.tsv"
    path.write_text("sentence\tlabel\n" + "".join(f"film {i}\t{i % 2}\n" for i in range(12)) + "meh\t0.5\n")
    return str(path)


# (name, extra args beyond --config, a function of (root, model_dir) giving more args, expected stderr pattern)
TRAIN_CASES = [
    ("new run into a finished run", [], None,
     r"run: already holds a run \(side.safetensors, qst_config.json, metrics.jsonl, summary.json, loss.png, "
     r"checkpoints/, tb/\); continue it with --resume, delete it and start over with --overwrite, or set another "
     r"train.output_dir"),
    ("resume and overwrite", ["--resume", "--overwrite"], None, r"--resume and --overwrite contradict each other"),
    ("resume with nothing to resume", ["--resume"], lambda root, m: [f"--config.train.output_dir={root / 'empty'}"],
     r"empty: --resume, but there is no checkpoint in .*empty/checkpoints to resume from"),
    ("resume with another side width", ["--resume", "--config.side.reduction_factor=4"], None,
     r"--resume: side.reduction_factor 8 -> 4: the checkpoint's params or optimizer state have other shapes"),
    ("bad value and a missing model", ["--config.optim.lr=-1", "--config.model.path=/no/such/model"], None,
     r"bad config:\n  optim.lr: -1.0 must be a finite number > 0$"),
    ("sweep value that is not a number", ["--config.sweep.lr=1e-3,x"], None, r"bad config:\n  sweep.lr: 'x' is not a float$"),
    ("seq_len beyond the context", ["--config.data.seq_len=100000"], None,
     r"data.seq_len: 100000 exceeds the model's context of \d+ positions"),
    ("fractional class label", ["--config.task=classification", "--config.data.eval=", "--config.data.text_column=sentence"],
     lambda root, m: [f"--config.data.train={_bad_tsv(root)}", f"--config.train.output_dir={root / 'cls'}"],
     r"labels.tsv, record 13: label 0.5 in 'label'; class labels must be integer ids in \[0, 2\)"),
    ("model without a tokenizer", [], lambda root, m: [f"--config.model.path={_no_tokenizer(root, m)}",
                                                       f"--config.train.output_dir={root / 'notok'}"],
     r"no-tokenizer: no tokenizer in this model directory \(none of tokenizer.json"),
    ("corrupt config.json", [], lambda root, m: [f"--config.model.path={_corrupt_config(root, m)}",
                                                 f"--config.train.output_dir={root / 'badcfg'}"],
     r"bad-config/config.json:1: not valid JSON"),
    ("invalid UTF-8 in a jsonl", [], lambda root, m: [f"--config.data.train={_data(root, 'bad.jsonl', BAD_UTF8)}",
                                                      f"--config.train.output_dir={root / 'utf8'}"],
     r"^\S+/bad.jsonl:2: not UTF-8 \(byte 0xff\); save the file as UTF-8$"),
    ("whitespace-only jsonl", [], lambda root, m: [f"--config.data.train={_data(root, 'blank.jsonl', BLANK)}",
                                                   f"--config.train.output_dir={root / 'blank'}"],
     r"^\S+/blank.jsonl: no records \(only whitespace\)$"),
    ("a path split at a comma", [], lambda root, m: [f"--config.data.train={root / 'no,such.txt'}",
                                                     f"--config.train.output_dir={root / 'comma'}"],
     r"^\S+/no: no such file or directory; the paths were split at commas \(write \\, for a comma inside a "
     r"path\)$"),
    ("resume a sweep with another list", ["--resume", "--config.sweep.lr=1e-3,2e-3"], None,
     r"^--resume: sweep.lr '' -> '1e-3,2e-3': a sweep's members are its list's values \(each named by them: "
     r"members/<name>/, metrics tagged by name\), so another list is other members, whose params and optimizer "
     r"state the checkpoint does not hold; keep the checkpoint's list, or start over with --overwrite$"),
]
BLANK = b"  \n\n "
BAD_UTF8 = b'{"text": "fine"}\n{"text": "bad \xff byte"}\n'


def _data(root: pathlib.Path, name: str, content: bytes) -> pathlib.Path:
    path = root / name
    path.write_bytes(content)
    return path


def test_overrides_without_a_config_name_the_missing_flag():
    proc = qst_train("--config.train.steps=3")
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("qst-train: error: --config.train.steps overrides a key of a config file, but no "
                                   "--config was given: add --config configs/default.py (or another recipe) before it")


def test_qst_quantize_names_a_file_it_cannot_read(tmp_path, capsys):
    from qst_jax.cli import quantize

    garbage, truncated = tmp_path / "garbage.safetensors", tmp_path / "truncated.safetensors"
    garbage.write_text("not a safetensors file")
    truncated.write_bytes((REPO / "tests/testdata/tiny-llama-bf16/model.safetensors").read_bytes()[:200])
    for path, reason in ((garbage, "header too large"), (truncated, "invalid header length")):
        assert quantize.main([str(path)]) == 2
        assert capsys.readouterr().err.strip() == (f"qst-quantize: {path}: cannot read as safetensors (Error while "
                                                   f"deserializing header: {reason}); give a .safetensors weights file")


def test_a_byte_order_mark_is_not_text(tmp_path):
    from qst_jax.data.sources import load_records

    for name, content, column in (("bom.txt", "hello\n", "text"), ("bom.jsonl", '{"text": "hello"}\n', "text"),
                                  ("bom.csv", "text\nhello\n", "text")):
        (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + content.encode())
        assert load_records(str(tmp_path / name))[0][column].strip() == "hello", name


def test_exports_get_the_umask_mode(finished):
    root, _ = finished
    modes = {p.name: p.stat().st_mode & 0o777 for p in (root / "run").iterdir() if p.is_file() and p.name != ".lock"}
    umask = os.umask(0o022)
    os.umask(umask)
    assert modes["side.safetensors"] == modes["qst_config.json"] == 0o666 & ~umask, modes


def test_one_side_and_records_that_name_sides(finished, model_dir, capsys):
    root, _ = finished
    prompts = _bad_prompts(root, '{"prompt": "a", "side": "lr=1e-3"}\n')
    assert generate_cli.main(["--model", str(model_dir), "--side", str(root / "run"), "--file", str(prompts)]) == 1
    assert capsys.readouterr().err.strip() == (
        f"qst-generate: error: {prompts}:1: the record's 'side' field names 'lr=1e-3', but this run has one --side "
        f"({root / 'run'}): a 'side' field chooses among two or more --side folders (each named by its folder); give "
        "them, or drop the field")


def _no_tokenizer(root: pathlib.Path, model_dir: pathlib.Path) -> pathlib.Path:
    target = root / "no-tokenizer"
    if not target.exists():
        shutil.copytree(model_dir, target)
        for p in target.iterdir():
            if p.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template")):
                p.unlink()
    return target


def _corrupt_config(root: pathlib.Path, model_dir: pathlib.Path) -> pathlib.Path:
    target = root / "bad-config"
    if not target.exists():
        shutil.copytree(model_dir, target)
        (target / "config.json").write_text('{"model_type": "llama", ')
    return target


@pytest.mark.parametrize("name, args, more, pattern", TRAIN_CASES, ids=[c[0] for c in TRAIN_CASES])
def test_qst_train_refuses(finished, model_dir, name, args, more, pattern):
    root, config = finished
    before = snapshot(root / "run")
    extra = more(root, model_dir) if more else []
    proc = qst_train(f"--config={config}", *args, *extra)
    assert proc.returncode != 0, proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith("qst-train: error: ") and "Traceback" not in proc.stderr, proc.stderr
    import re

    assert re.search(pattern, proc.stderr.strip().removeprefix("qst-train: error: "), re.M), proc.stderr
    assert snapshot(root / "run") == before


def _corrupt_side(root: pathlib.Path) -> pathlib.Path:
    target = root / "corrupt-side"
    if not target.exists():
        shutil.copytree(root / "run", target, ignore=shutil.ignore_patterns("checkpoints", "tb", ".lock"))
        weights = target / "side.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    return target


def _mismatched_side(root: pathlib.Path) -> pathlib.Path:
    target = root / "mismatched-side"
    if not target.exists():
        shutil.copytree(root / "run", target, ignore=shutil.ignore_patterns("checkpoints", "tb", ".lock"))
        info = json.loads((target / "qst_config.json").read_text())
        info["model"]["side"]["reduction_factor"] = 4
        (target / "qst_config.json").write_text(json.dumps(info))
    return target


def _bad_prompts(root: pathlib.Path, text: str) -> pathlib.Path:
    path = root / f"prompts-{hashlib.sha256(text.encode()).hexdigest()[:8]}.jsonl"
    path.write_text(text)
    return path


def _truncated_weights(root: pathlib.Path, model_dir: pathlib.Path) -> pathlib.Path:
    target = root / "truncated-weights"
    if not target.exists():
        shutil.copytree(model_dir, target)
        weights = target / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return target


def _truncated_gguf(root: pathlib.Path) -> pathlib.Path:
    from qst_jax.data.offline import MissingPackageError, smollm2_gguf

    try:
        source = smollm2_gguf()
    except MissingPackageError as err:
        pytest.skip(str(err))
    target = root / "truncated.gguf"
    if not target.exists():
        with open(source, "rb") as f:
            target.write_bytes(f.read(2_000_000))
    return target


def test_qst_quantize_refuses_what_it_cannot_write(tmp_path, capsys):
    from qst_jax.cli import quantize

    weights = tmp_path / "w.safetensors"
    weights.write_bytes((REPO / "tests/testdata/tiny-llama-bf16/model.safetensors").read_bytes())
    before = weights.read_bytes()
    for args, message in (
            ([str(weights), "--out", str(weights)], f"--out {weights}: is the input file; write the NF4 checkpoint "
                                                    "to another file"),
            ([str(weights), "--out", str(tmp_path / "missing" / "q.safetensors")],
             f"--out {tmp_path / 'missing' / 'q.safetensors'}: the folder {tmp_path / 'missing'} does not exist"),
            ([str(tmp_path)], f"{tmp_path}: is a folder; give its .safetensors weights file"),
            (["--random", "4096"], "--random 4096: give OUTxIN, two positive integers such as 4096x4096"),
            (["--random", "64x64", "--blocksize", "0"], "--blocksize 0: a positive power of two (bitsandbytes uses 64)")):
        with pytest.raises(SystemExit) as exit_:
            quantize.main(args)
        assert exit_.value.code == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == f"qst-quantize: error: {message}", args
    assert weights.read_bytes() == before


READ_CASES = [
    ("eval: truncated model.safetensors", eval_cli,
     lambda root, m: ["perplexity", "--model", str(_truncated_weights(root, m)), "--data", str(root / "eval.txt")],
     r"truncated-weights/model.safetensors: cannot read as safetensors .*; the file is truncated or corrupt$"),
    ("eval: truncated GGUF", eval_cli,
     lambda root, m: ["perplexity", "--model", str(_truncated_gguf(root)), "--data", str(root / "eval.txt")],
     r"truncated.gguf: cannot read as GGUF .*; the file is truncated or corrupt$"),
    ("eval: corrupt side.safetensors", eval_cli,
     lambda root, m: ["perplexity", "--model", str(m), "--side", str(_corrupt_side(root)), "--data", str(root / "eval.txt")],
     r"corrupt-side/side.safetensors: cannot read as safetensors"),
    ("eval: qst_config.json disagrees with the weights", eval_cli,
     lambda root, m: ["perplexity", "--model", str(m), "--side", str(_mismatched_side(root)), "--data",
                      str(root / "eval.txt")],
     r"mismatched-side/side.safetensors: down/norm/bias has shape \(4, 32\), qst_config.json implies \(4, 64\)$"),
    ("eval: classify with an LM run", eval_cli,
     lambda root, m: ["classify", "--model", str(m), "--side", str(root / "run"), "--task", "sst2", "--data", "x.tsv"],
     r"classify needs a side network trained with task=classification"),
    ("generate: a line that is not JSON", generate_cli,
     lambda root, m: ["--model", str(m), "--side", str(root / "run"), "--file",
                      str(_bad_prompts(root, '{"prompt": "a"}\n\n{"prompt": "b",\n'))],
     r"prompts-\w+.jsonl:3: not valid JSON"),
    ("generate: several side networks for one prompt", generate_cli,
     lambda root, m: ["--model", str(m), "--side", str(root / "run"), "--side", str(root / "run"), "--prompt", "a"],
     r"several --side serve --file records, each naming its side network in a 'side' field"),
    ("eval: a window of one token", eval_cli,
     lambda root, m: ["perplexity", "--model", str(m), "--data", str(root / "eval.txt"), "--seq-len", "1"],
     r"^qst-eval: error: --seq-len 1: at least 2 \(a window scores the tokens after its first\)$"),
    ("eval: windows beyond the model's context", eval_cli,
     lambda root, m: ["perplexity", "--model", str(m), "--data", str(root / "eval.txt"), "--seq-len", "4096"],
     r"^qst-eval: error: --seq-len 4096: exceeds the model's context of 512 positions$"),
    ("eval: no batch", eval_cli,
     lambda root, m: ["perplexity", "--model", str(m), "--data", str(root / "eval.txt"), "--batch-size", "0"],
     r"^qst-eval: error: --batch-size 0: must be at least 1$"),
    ("eval: --out under a file", eval_cli,
     lambda root, m: ["perplexity", "--model", str(m), "--data", str(root / "eval.txt"), "--out",
                      str(root / "eval.txt" / "out.json")],
     r"^qst-eval: error: --out .*eval.txt/out.json: .*eval.txt is not a folder$"),
    ("generate: an empty stop string", generate_cli,
     lambda root, m: ["--model", str(m), "--prompt", "a", "--stop", ""],
     r"^qst-generate: error: --stop '': an empty stop string would end every completion before its first token$"),
    ("generate: an empty prompts file", generate_cli,
     lambda root, m: ["--model", str(m), "--file", str(_bad_prompts(root, "\n\n"))],
     r"prompts-\w+.jsonl: holds no records \(one JSON object a line, with 'prompt' or 'messages'\)$"),
    ("generate: a record with a bad chat role", generate_cli,
     lambda root, m: ["--model", str(m), "--file", str(_bad_prompts(
         root, '{"prompt": "a"}\n{"messages": [{"role": "wizard", "content": "hi"}]}\n'))],
     r"prompts-\w+.jsonl:2: unknown chat role 'wizard'"),
    ("generate: a prompt that is not a string", generate_cli,
     lambda root, m: ["--model", str(m), "--file", str(_bad_prompts(root, '{"prompt": 3}\n'))],
     r"prompts-\w+.jsonl:1: 'prompt' must be a non-empty string, not 3$"),
    ("generate: a record without a prompt", generate_cli,
     lambda root, m: ["--model", str(m), "--file", str(_bad_prompts(root, '{"text": "a"}\n'))],
     r"prompts-\w+.jsonl:1: a record needs 'prompt' or 'messages'; it has \['text'\]"),
]


@pytest.mark.parametrize("name, cli, make_args, pattern", READ_CASES, ids=[c[0] for c in READ_CASES])
def test_eval_and_generate_refuse(finished, model_dir, capsys, name, cli, make_args, pattern):
    import re

    root, _ = finished
    before = snapshot(root / "run")
    assert cli.main(make_args(root, model_dir)) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(pattern, err), err
    assert snapshot(root / "run") == before


def test_eval_uses_the_runs_seq_len_and_reproduces_its_perplexity(finished, model_dir, capsys):
    root, _ = finished
    summary = json.loads((root / "run" / "summary.json").read_text())
    out = root / "ppl.json"
    assert eval_cli.main(["perplexity", "--model", str(model_dir), "--side", str(root / "run"), "--data",
                          str(root / "eval.txt"), "--max-windows", "8", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["perplexity"] == pytest.approx(summary["eval_after"]["perplexity"], rel=1e-5)


def test_generate_says_when_the_context_cuts_max_new_tokens(finished, model_dir, capsys):
    root, _ = finished
    assert generate_cli.main(["--model", str(model_dir), "--prompt", "To be", "--max-new-tokens", "100000"]) == 0
    err = capsys.readouterr().err
    assert "note: max_new_tokens 100000 cut to" in err and "the model's context is" in err


def test_a_second_process_cannot_write_the_same_directory(finished, model_dir, tmp_path):
    root, _ = finished
    holder = RunDirectory(str(tmp_path / "busy"))
    holder.acquire(resume=False, overwrite=False)
    try:
        config = _config_file(tmp_path, model_dir, {"train.output_dir": str(tmp_path / "busy")})
        proc = qst_train(f"--config={config}")
    finally:
        holder.release()
    assert proc.returncode != 0
    assert f"busy: in use by another qst-train (pid {os.getpid()}: " in proc.stderr, proc.stderr


def test_overwrite_starts_over(model_dir, tmp_path):
    config = tiny_config(model_dir, tmp_path, **{"train.steps": 2, "data.eval": ""})
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "my-notes.txt").write_text("not part of a run")
    Trainer(config, log=quiet).run()
    Trainer(config, overwrite=True, log=quiet).run()
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2]  # the first run's rows are gone
    assert (tmp_path / "run" / "my-notes.txt").read_text() == "not part of a run"


def test_resume_cuts_metrics_back_and_skips_a_damaged_checkpoint(model_dir, tmp_path):
    overrides = {"train.steps": 6, "train.checkpoint_every": 2, "train.keep_checkpoints": 3, "data.eval": ""}
    config = tiny_config(model_dir, tmp_path, **overrides)
    Trainer(config, log=quiet).run()
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()) == [2, 4, 6]
    shutil.rmtree(checkpoints / "6")  # killed after step 6 was logged, before its checkpoint
    damaged = max((p for p in (checkpoints / "4").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    lines: list[str] = []
    config.optim.lr = 1e-3
    summary = Trainer(config, resume=True, log=lines.append).run()
    assert summary["steps"] == 6
    assert any(line.startswith(f"checkpoint {checkpoints}/4 is damaged") for line in lines), lines
    assert "resuming from step 2, the newest intact checkpoint" in lines
    assert any(line.startswith("resuming with changed settings: optim.lr 0.003 -> 0.001") for line in lines), lines
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]  # no duplicate rows


def test_a_resume_from_the_final_step_writes_no_row_twice(model_dir, tmp_path):
    config = tiny_config(model_dir, tmp_path, **{"train.steps": 2, "train.checkpoint_every": 2})
    Trainer(config, log=quiet).run()
    metrics = tmp_path / "run" / "metrics.jsonl"
    first = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert any(r["split"] != "train" and r["step"] == 2 for r in first)  # the after-training evaluation
    summary = Trainer(config, resume=True, log=quiet).run()
    again = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [(r["step"], r["split"]) for r in again] == [(r["step"], r["split"]) for r in first], (first, again)
    assert summary["steps"] == 2 and summary["eval_after"]["loss"] == first[-1]["loss"]


def _signal_at(tmp_path: pathlib.Path, driver_code: str, config: pathlib.Path, marker: str, sig: int) -> None:
    """Runs qst-train through `driver_code` and sends `sig` once it prints `marker` (or after 240 s)."""
    driver = tmp_path / "driver.py"
    driver.write_text(driver_code)
    env = dict(os.environ, PYTHONPATH=str(REPO), QST_NO_PROGRESS="1")
    proc = subprocess.Popen([sys.executable, str(driver), f"--config={config}"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    for line in proc.stdout:
        if marker in line or time.time() > deadline:
            break
    proc.send_signal(sig)
    proc.wait(timeout=60)


KILL_DURING_SAVE = """
import asyncio, sys
from orbax.checkpoint._src.path import async_path
from qst_jax.cli import train

original = async_path.rename

async def rename(src, dst):
    if dst.name == "6":
        print("WRITING 6", flush=True)
        await asyncio.sleep(600)
    return await original(src, dst)

async_path.rename = rename
train.run()
"""


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_write_then_resume(model_dir, tmp_path):
    config = _config_file(tmp_path, model_dir, {"train.steps": 8, "train.checkpoint_every": 3, "data.eval": ""})
    _signal_at(tmp_path, KILL_DURING_SAVE, config, "WRITING 6", signal.SIGKILL)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert not (checkpoints / "6").exists() and (checkpoints / "3").is_dir()
    resumed = qst_train(f"--config={config}", "--resume")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from step 3" in resumed.stdout
    assert json.loads((tmp_path / "run" / "qst_config.json").read_text())["step"] == 8


def _user_files(run: pathlib.Path) -> dict[str, str]:
    """Files a user keeps inside a run's folders (not the run's): written, then returned as a snapshot."""
    for rel in ("checkpoints/README.txt", "tb/notes.txt", "members/keep.txt", "members/lr=1e-3/notes.txt",
                "my-notes.txt"):
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_text(f"mine: {rel}\n")
    return {rel: digest for rel, digest in snapshot(run).items()
            if rel.endswith(("README.txt", "notes.txt", "keep.txt"))}


def test_overwrite_deletes_exactly_the_run_files(model_dir, tmp_path):
    config = tiny_config(model_dir, tmp_path, **{"train.steps": 3, "train.checkpoint_every": 3, "data.eval": ""})
    Trainer(config, log=quiet).run()
    run = tmp_path / "run"
    mine = _user_files(run)
    lines: list[str] = []
    Trainer(config, overwrite=True, log=lines.append).run()
    assert {rel: d for rel, d in snapshot(run).items() if rel in mine} == mine  # every user file, byte for byte
    assert (f"{run}: deleted the previous run's files (side.safetensors, qst_config.json, metrics.jsonl, "
            "summary.json, loss.png, checkpoints/, tb/)") in lines
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3]


def test_overwrite_clears_a_previous_sweeps_members(model_dir, tmp_path):
    config = tiny_config(model_dir, tmp_path, **{"train.steps": 2, "train.checkpoint_every": 0, "data.eval": ""})
    config.sweep.lr = "1e-3,2e-3"
    Trainer(config, log=quiet).run()
    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "members").iterdir()) == ["lr=1e-3", "lr=2e-3"]
    mine = _user_files(run)
    config.sweep.lr = "3e-3,4e-3"
    Trainer(config, overwrite=True, log=quiet).run()
    assert sorted(p.name for p in (run / "members").iterdir()) == ["keep.txt", "lr=1e-3", "lr=3e-3", "lr=4e-3"]
    assert sorted(p.name for p in (run / "members" / "lr=1e-3").iterdir()) == ["notes.txt"]  # the user's file only
    config.sweep.lr = ""
    Trainer(config, overwrite=True, log=quiet).run()  # a single run over a sweep's directory
    assert sorted(str(p.relative_to(run)) for p in (run / "members").rglob("*")) == [
        "members/keep.txt", "members/lr=1e-3", "members/lr=1e-3/notes.txt"]
    assert {rel: d for rel, d in snapshot(run).items() if rel in mine} == mine


def _nan_side(root: pathlib.Path) -> pathlib.Path:
    from safetensors.numpy import load_file, save_file

    target = root / "nan-side"
    if not target.exists():
        shutil.copytree(root / "run", target, ignore=shutil.ignore_patterns("checkpoints", "tb", ".lock"))
        tensors = load_file(str(target / "side.safetensors"))
        key = sorted(tensors)[1]
        tensors[key] = tensors[key].copy()
        tensors[key].flat[3] = float("nan")
        save_file(tensors, str(target / "side.safetensors"), metadata={"format": "qst_jax"})
    return target


def test_nan_side_weights_are_refused(finished, model_dir, capsys):
    from safetensors.numpy import load_file

    root, _ = finished
    side = _nan_side(root)
    bad = sorted(load_file(str(side / "side.safetensors")))[1]
    before = snapshot(side)
    expected = (f"{side}/side.safetensors: tensor '{bad}' holds NaN or infinite values; this side network cannot be "
                "used (retrain it, or export an earlier checkpoint)")
    assert generate_cli.main(["--model", str(model_dir), "--side", str(side), "--prompt", "To be"]) == 1
    assert capsys.readouterr().err.strip() == f"qst-generate: error: {expected}"
    assert eval_cli.main(["perplexity", "--model", str(model_dir), "--side", str(side), "--data",
                          str(root / "eval.txt"), "--max-windows", "2"]) == 1
    assert capsys.readouterr().err.strip() == f"qst-eval: error: {expected}"
    assert snapshot(side) == before


STOP_DURING_FIRST_EVAL = """
import sys, time
from qst_jax.cli import train
from qst_jax.train.single_run import SingleRun

def evaluate_start(self, *args, **kwargs):
    print("EVALUATING", flush=True)
    time.sleep(600)

SingleRun.evaluate_start = evaluate_start
train.run()
"""


def test_a_run_stopped_in_its_first_evaluation_does_not_block_the_next(model_dir, tmp_path):
    config = _config_file(tmp_path, model_dir, {"train.steps": 2, "train.checkpoint_every": 0})
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "my-notes.txt").write_text("kept")
    _signal_at(tmp_path, STOP_DURING_FIRST_EVAL, config, "EVALUATING", signal.SIGTERM)
    run = tmp_path / "run"
    assert (run / "metrics.jsonl").read_text() == "" and not list((run / "checkpoints").iterdir())
    resumed = qst_train(f"--config={config}", "--resume")
    assert resumed.returncode != 0 and "--resume, but there is no checkpoint" in resumed.stderr
    again = qst_train(f"--config={config}")
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"{run}: replaced the leftovers of a run that stopped before its first checkpoint (metrics.jsonl" \
        in again.stdout
    assert (run / "my-notes.txt").read_text() == "kept"
    assert json.loads((run / "summary.json").read_text())["steps"] == 2


def test_a_refused_run_leaves_no_directory_behind(finished, model_dir, tmp_path):
    root, config = finished
    target = tmp_path / "new" / "run"
    proc = qst_train(f"--config={config}", "--resume", f"--config.train.output_dir={target}")
    assert proc.returncode != 0 and "--resume, but there is no checkpoint" in proc.stderr
    assert not (tmp_path / "new").exists()
    bad = _data(tmp_path, "bad.jsonl", BAD_UTF8)  # fails after the directory was taken, while loading the data
    proc = qst_train(f"--config={config}", f"--config.data.train={bad}", f"--config.train.output_dir={target}")
    assert proc.returncode != 0 and "bad.jsonl:2: not UTF-8" in proc.stderr
    assert not (tmp_path / "new").exists()
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    proc = qst_train(f"--config={config}", f"--config.train.output_dir={blocker / 'run'}")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip() == (f"qst-train: error: {blocker / 'run'}: {blocker} is a file, not a directory; "
                                   "set another train.output_dir")
    assert blocker.read_text() == "x"


def test_a_run_that_fails_before_its_first_checkpoint_leaves_nothing(model_dir, tmp_path, monkeypatch):
    """A failure inside the run (here its first state) after the directory was taken: the new directory goes."""
    config = tiny_config(model_dir, tmp_path, **{"train.output_dir": str(tmp_path / "new" / "run")})
    trainer = Trainer(config)
    assert (tmp_path / "new" / "run" / ".lock").exists()

    def fail(self, checkpointer):
        assert (tmp_path / "new" / "run" / "checkpoints").is_dir()  # the checkpointer made its folder
        raise RuntimeError("out of device memory")

    monkeypatch.setattr(Trainer, "_initial_state", fail)
    with pytest.raises(RuntimeError, match="out of device memory"):
        trainer.run()
    assert not (tmp_path / "new").exists()
