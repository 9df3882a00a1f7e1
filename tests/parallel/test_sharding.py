"""Sharded train steps on 8 simulated CPU devices equal the single-device step."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from tests.helpers import script

HERE = pathlib.Path(__file__).parent


@pytest.fixture(scope="module")
def result():
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    out = subprocess.run([sys.executable, str(HERE / "sharded_check.py")], capture_output=True, text=True,
                         timeout=1200, env=env)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert out.returncode == 0 and lines, out.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("RESULT "))


@pytest.mark.parametrize("mesh", ["8x1x1", "1x8x1", "2x2x2"])
def test_sharded_step_equals_single_device(result, mesh):
    r = result["meshes"][mesh]
    assert r["loss_diff"] < 1e-5, r
    assert r["param_diff"] < 1e-4, r


@pytest.mark.parametrize("mesh, parts", [("1x8x1", 8), ("2x2x2", 4), ("8x1x1", 1)])
def test_backbone_bytes_are_distributed(result, mesh, parts):
    """Each device holds 1/(fsdp x tensor) of the packed codes; `data` replicates them."""
    r = result["meshes"][mesh]
    assert r["devices_holding"] == 8
    assert r["packed_shard_sizes"] == [r["packed_total"] // parts]


@pytest.mark.parametrize("mesh", ["8x1x1", "1x8x1", "2x2x2"])
def test_loading_onto_the_mesh_equals_placing_the_loaded_tree(result, mesh):
    """`load_backbone(path, mesh=...)` streams layers to their shards; same values, same shardings."""
    assert result["meshes"][mesh]["direct_load_equal"] is True


def test_checkpoint_restores_onto_another_mesh(result):
    assert result["checkpoint"] == {"values_equal": True, "on_target_mesh": True, "meta": "cross-mesh"}


def test_trainer_on_a_mesh_equals_one_device(result):
    """qst-train with parallel.fsdp=8 and parallel.side=fsdp (backbone loaded onto the mesh, side
    params and optimizer state split 8 ways) gives the single-device side params (float32 compute)."""
    assert result["trainer_param_diff"] < 1e-4


def test_fsdp_side_state_is_split(result):
    assert result["side_fsdp"]["split_leaves"] >= 6  # the side blocks' weights, their Adam moments, ...
    assert result["side_fsdp"]["largest_leaf_fraction_per_device"] == 1 / 8


def test_memory_plan_splits_the_backbone():
    import jax

    from qst_jax.models.random_init import llama2_config, random_params

    plan = script("memory_plan")
    params = jax.eval_shape(lambda k: random_params(llama2_config("70b"), k), jax.random.PRNGKey(0))
    one = plan.backbone_bytes_per_device(params, plan._Sizes(1, 1, 1))
    eight = plan.backbone_bytes_per_device(params, plan._Sizes(1, 8, 1))
    assert 33e9 < one < 40e9  # 70B at 4.127 bits plus bf16 embeddings and head
    assert one / 8 <= eight < one / 8 * 1.01


@pytest.mark.slow
def test_two_processes_train_and_checkpoint(testdata, tmp_path):
    """Two jax.distributed processes on localhost (CPU, gloo), side state split between them (fsdp)."""
    from tests.helpers import TEXT, tiny_model_dir

    model_dir = tiny_model_dir(testdata, tmp_path)
    (tmp_path / "train.txt").write_text(TEXT * 30)
    module = script("two_process_train")
    out = tmp_path / "out"
    code = module.main(["--model", str(model_dir), "--data", str(tmp_path / "train.txt"), "--seq-len", "32",
                        "--side", "fsdp", "--out", str(out)])
    assert code == 0
    run = out / "run"
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "3"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3]  # one writer: process 0
    evals = [r for r in records if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [0, 3] and all(r["loss"] > 0 for r in evals)  # both processes evaluate
    assert (run / "side.safetensors").is_file()  # side params split over the processes, gathered to export
    from qst_jax.models import load_config
    from qst_jax.methods import load_side

    params, info = load_side(str(run), load_config(model_dir))
    assert info["step"] == 3 and params["gates"].shape == (4, 32)
