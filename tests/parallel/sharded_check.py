"""Run in a fresh process with 8 simulated CPU devices (see test_sharding.py).

Prints one JSON object: per mesh, the largest relative difference of loss and
side params from the single-device run, how the backbone's bytes spread, and a
cross-mesh checkpoint round trip.
"""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import json  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

REPO = pathlib.Path(__file__).parents[2]
sys.path.insert(0, str(REPO))

from qst_jax.models import load_backbone  # noqa: E402
from qst_jax.parallel import ShardedPlacement, backbone_shardings, batch_sharding, make_mesh, replicated  # noqa: E402
from qst_jax.methods.side_config import SideConfig  # noqa: E402
from qst_jax.methods import QSTModel  # noqa: E402
from qst_jax.checkpoints import Checkpointer  # noqa: E402
from qst_jax.train.step import init_train_state, make_train_step  # noqa: E402
from tests.helpers import lm_batch  # noqa: E402

MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2)]


def main() -> None:
    assert len(jax.devices()) == 8, jax.devices()
    path = REPO / "tests" / "testdata" / "tiny-llama-nf4"
    backbone = load_backbone(path, dtype=jnp.float32)
    model = QSTModel(backbone.cfg, SideConfig(reduction_factor=8), dtype=jnp.float32)
    tx = optax.adamw(1e-3)
    batch = lm_batch(micro=1, batch=8, length=16)

    def train(mesh_shape):
        state = init_train_state(model, tx, jax.random.PRNGKey(0))
        if mesh_shape is None:
            step, params = make_train_step(model, tx), backbone.params
        else:
            mesh = make_mesh(*mesh_shape)
            backbone_sh = backbone_shardings(backbone.params, mesh)
            # Loaded straight onto the mesh, layer by layer; must equal placing the whole tree.
            params = load_backbone(path, dtype=jnp.float32, placement=ShardedPlacement(mesh)).params
            placed = jax.device_put(backbone.params, backbone_sh)
            direct_load_equal[mesh_shape] = all(
                a.sharding.is_equivalent_to(b.sharding, a.ndim) and np.array_equal(np.asarray(a), np.asarray(b))
                for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(placed))
            )
            state_sh = replicated(state, mesh)
            state = jax.device_put(state, state_sh)
            step = make_train_step(model, tx, shardings=(state_sh, backbone_sh, batch_sharding(mesh)))
        losses = []
        for _ in range(2):
            state, metrics = step(state, params, batch)
            losses.append(float(metrics["loss"]))
        return losses, state, params

    direct_load_equal = {}
    ref_losses, ref_state, _ = train(None)
    ref_leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(ref_state.params)]
    result = {"meshes": {}}
    states = {}
    for shape in MESHES:
        losses, state, params = train(shape)
        states[shape] = state
        leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(state.params)]
        param_diff = max(
            float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12)) for a, b in zip(leaves, ref_leaves)
        )
        packed = params["layers"]["mlp"]["gate"]["w"].packed
        result["meshes"]["x".join(map(str, shape))] = {
            "loss_diff": max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses)),
            "param_diff": param_diff,
            "packed_total": int(packed.size),
            "packed_shard_sizes": sorted({int(s.data.size) for s in packed.addressable_shards}),
            "devices_holding": len({s.device for s in packed.addressable_shards}),
            "direct_load_equal": direct_load_equal[shape],
        }

    # Saved on the (2, 2, 2) mesh, restored onto the (8, 1, 1) mesh.
    with tempfile.TemporaryDirectory() as tmp:
        saver = Checkpointer(tmp)
        saver.save(2, states[(2, 2, 2)], {"note": "cross-mesh"})
        target = states[(8, 1, 1)]
        restored, meta, _ = Checkpointer(tmp).restore(target)
        same = all(
            np.array_equal(np.asarray(a), np.asarray(b))
            for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(states[(2, 2, 2)]))
        )
        target_mesh = jax.tree_util.tree_leaves(target.params)[0].sharding.mesh
        on_target = all(x.sharding.mesh == target_mesh for x in jax.tree_util.tree_leaves(restored.params))
        result["checkpoint"] = {"values_equal": same, "on_target_mesh": on_target, "meta": meta["note"]}
    # qst-train's Trainer on a 1 x 8 x 1 mesh against one device (float32 compute).
    from safetensors.numpy import load_file

    from qst_jax.train.trainer import Trainer
    from tests.helpers import tiny_config, tiny_model_dir

    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        model_dir = tiny_model_dir(REPO / "tests" / "testdata", tmp)
        summaries, trainers = {}, {}
        for name, fsdp, side in (("single", 1, "replicated"), ("side_fsdp", 8, "fsdp")):
            out = tmp / name
            out.mkdir()
            config = tiny_config(model_dir, out, **{"train.steps": 3, "train.batch_size": 8, "data.eval": ""})
            config.model.dtype = "float32"
            config.parallel.fsdp = fsdp
            config.parallel.side = side
            trainers[name] = Trainer(config, log=lambda *a: None)
            trainers[name].run()
            summaries[name] = load_file(str(out / "run" / "side.safetensors"))

        def diff(name):
            return max(
                float(np.linalg.norm(summaries[name][k] - v) / max(np.linalg.norm(v), 1e-12))
                for k, v in summaries["single"].items()
            )

        result["trainer_param_diff"] = diff("side_fsdp")  # backbone split 8 ways and side state split too
        shardings = jax.tree_util.tree_leaves(trainers["side_fsdp"].spec.state_shardings)
        abstract = jax.tree_util.tree_leaves(
            jax.eval_shape(lambda k: init_train_state(trainers["side_fsdp"].spec.model, trainers["side_fsdp"].tx, k),
                           jax.random.PRNGKey(0)))
        largest = max(range(len(abstract)), key=lambda i: int(np.prod(abstract[i].shape)))
        shard_shape = shardings[largest].shard_shape(abstract[largest].shape)
        result["side_fsdp"] = {
            "param_diff": diff("side_fsdp"),
            "split_leaves": sum("fsdp" in tuple(s.spec) for s in shardings),
            "largest_leaf_fraction_per_device": int(np.prod(shard_shape)) / int(np.prod(abstract[largest].shape)),
        }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
