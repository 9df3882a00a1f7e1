"""Every recipe in configs/ loads, and builds valid model/side settings."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

from qst_jax.methods.side_config import SideConfig
from qst_jax.train.config import base_config

CONFIGS = sorted((pathlib.Path(__file__).parents[1] / "configs").glob("*.py"))


def _load(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_recipe_is_valid(path):
    c = _load(path)
    assert set(c.keys()) == set(base_config().keys())
    assert c.method in ("qst", "qlora") and c.task in ("lm", "chat", "classification")
    SideConfig(
        reduction_factor=c.side.reduction_factor, adapter_rank=c.side.adapter_rank, downsampler=c.side.downsampler,
        task="classification" if c.task == "classification" else "lm", num_labels=c.data.num_labels,
    )
    with pytest.raises(AttributeError):
        c.train.no_such_key = 1  # locked: unknown keys are errors


def test_70b_recipe_matches_the_paper():
    c = _load(next(p for p in CONFIGS if p.stem == "chat_70b"))
    assert (c.train.batch_size, c.train.micro_batches, c.train.steps) == (1, 16, 1875)
    assert (c.optim.lr, c.optim.schedule, c.optim.warmup_ratio, c.optim.clip_norm) == (1e-4, "constant", 0.03, 0.3)
    assert c.data.seq_len == 512


@pytest.mark.parametrize("name, mesh", [("chat_70b_fsdp2", (1, 2, 1)), ("chat_70b_fsdp8", (1, 8, 1)),
                                        ("chat_70b_2hosts", (2, 8, 1))])
def test_70b_presets_keep_16_sequences_a_step(name, mesh):
    c = _load(next(p for p in CONFIGS if p.stem == name))
    assert (c.parallel.data, c.parallel.fsdp, c.parallel.tensor) == mesh
    assert c.train.batch_size == mesh[0] * mesh[1]  # one sequence per batch shard
    assert c.train.batch_size * c.train.micro_batches == 16
    assert (c.optim.lr, c.train.steps, c.data.seq_len) == (1e-4, 1875, 512)  # the rest is the recipe's
    assert c.parallel.side == "fsdp"  # 1.2 GiB of side params and 2.4 of AdamW state split, not copied 8 ways


def test_on_mesh_refuses_an_uneven_split():
    from qst_jax.train.config import on_mesh

    with pytest.raises(ValueError, match="do not split over data x fsdp = 3"):
        on_mesh(base_config(), fsdp=3, sequences_per_step=16, output_dir="x")


@pytest.mark.slow
def test_glue_sst2_recipe_runs_from_the_checkout(tmp_path):
    """The SST-2 recipe reads only files in the repository (data/glue/sst2/) and the packaged SmolLM2."""
    import json
    import os
    import subprocess
    import sys

    from qst_jax.data.offline import MissingPackageError, smollm2_gguf

    try:
        smollm2_gguf()
    except MissingPackageError as err:
        pytest.skip(str(err))
    repo = pathlib.Path(__file__).parents[1]
    env = dict(os.environ, PYTHONPATH=str(repo), QST_NO_PROGRESS="1")
    args = ["--config=configs/glue_sst2.py", "--config.train.steps=2", "--config.data.eval_examples=16",
            f"--config.train.output_dir={tmp_path / 'run'}"]
    proc = subprocess.run([sys.executable, "-m", "qst_jax.cli.train", *args], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "67349 train examples" in proc.stdout
    info = json.loads((tmp_path / "run" / "qst_config.json").read_text())
    assert info["task"] == "classification" and info["step"] == 2


def test_the_run_config_is_read_off_the_config_dataclasses():
    """SideConfig, SideOptions and QLoRAConfig are the one definition: sections, sweep and shape keys follow them."""
    import dataclasses

    from qst_jax.methods.settings import settings
    from qst_jax.methods.side_config import SideConfig, init_only_fields
    from qst_jax.train.config import SETTINGS, SHAPE_KEYS, SWEEP_KEYS, base_config

    c = base_config()
    keyed = [f for cls in SETTINGS for f in settings(cls) if f.metadata["key"]]
    assert {f.metadata["key"]: f.default for f in keyed} == {
        f.metadata["key"]: c[f.metadata["key"].split(".")[0]][f.metadata["key"].split(".")[1]] for f in keyed}
    assert set(c.side) == {f.metadata["key"].split(".")[1] for f in keyed if f.metadata["key"].startswith("side.")}
    assert set(c.qlora) == {"rank", "alpha", "remat"}
    swept_fields = {f.name: f.metadata["key"] for f in settings(SideConfig) if f.metadata["sweep"]}
    assert {k: v for k, v in SWEEP_KEYS.items() if k in swept_fields} == swept_fields
    assert {f.metadata["key"] for f in keyed if f.metadata["shape"]} <= set(SHAPE_KEYS)
    assert init_only_fields() == ("gate_init", "output_gate_init", "init_std", "init_scheme")
    assert [f.name for f in dataclasses.fields(SideConfig)] == [f.name for f in settings(SideConfig)]  # all declared
