"""`qst-train --config ... --plan h100`: the run's own train step, compiled for a GPU or TPU without one.

Nothing is loaded: the backbone's shapes come from the model's `config.json`
(or a GGUF header, or a named LLaMA-2 shape in `model.shape`), its params
are `jax.eval_shape` of a random NF4 backbone of that config (the same
pytree a loaded one has), and the step is the one `qst-train` jits: the
config's method, side settings, optimizer and micro-batches, batch
`[micro_batches, batch_size, seq_len]`. A sweep compiles its sweep step;
a run with `parallel.*` its sharded step over that many devices of the
target (each device's figures).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from qst_jax.aot.compile import CompileReport, compile_report, replicated_on
from qst_jax.aot.targets import abstract_mesh, target as get_target
from qst_jax.data.specs import PACKAGED_MODEL, resolve_model_path
from qst_jax.models.hub import is_hub_id, resolve_model
from qst_jax.methods import SideSet, build_model
from qst_jax.methods.build import method_options
from qst_jax.models import ConfigError, ModelConfig, load_config
from qst_jax.models.random_init import LLAMA2_SHAPES, llama2_config, random_params
from qst_jax.train.config import check_context
from qst_jax.train.optim import make_optimizer
from qst_jax.models.host_layers import host_placement
from qst_jax.models.loops import streaming_options
from qst_jax.train.step import init_train_state, make_train_step
from qst_jax.train.sweep import init_sweep_state, is_sweep, make_sweep_step, plan_members

SHAPE_NAMES = tuple(f"llama2-{k}" for k in LLAMA2_SHAPES)


def model_config(config: Any) -> ModelConfig:
    """The backbone's ModelConfig from `model.path`'s config (never its weights), or `model.shape`.

    Raises:
      ConfigError: neither names a model.
    """
    path, shape = config.model.path, config.model.shape
    if path and (path == PACKAGED_MODEL or os.path.exists(os.path.expanduser(path))):
        return load_config(resolve_model_path(path))
    if path and is_hub_id(path) and ":" not in path:  # a Hub repo: its config.json alone
        return load_config(resolve_model(path, config.model.revision or None, config_only=True))
    if shape:
        if shape not in SHAPE_NAMES:
            raise ConfigError(f"model.shape {shape!r} is not one of {SHAPE_NAMES}")
        return llama2_config(shape.removeprefix("llama2-"))
    raise ConfigError(f"model.path {path!r}: no such model to read config.json from; set it, or --config.model.shape "
                      f"to one of {SHAPE_NAMES}")


def _batch(config: Any, sharding: NamedSharding, micro_batches: int) -> dict[str, Any]:
    """The run's batch `[micro_batches, batch_size, ...]` as ShapeDtypeStructs placed by `sharding`."""
    a, b, t = micro_batches, config.train.batch_size, config.data.seq_len
    tokens = jax.ShapeDtypeStruct((a, b, t), jnp.int32)
    batch = {"input_ids": tokens, "attention_mask": tokens}
    if config.task == "classification":
        label = jnp.float32 if config.data.num_labels == 1 else jnp.int32
        batch.update(labels=jax.ShapeDtypeStruct((a, b), label), example_mask=jax.ShapeDtypeStruct((a, b), jnp.float32))
    else:
        batch["loss_mask"] = tokens
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), batch)


def compute_dtype(config: Any, name: str) -> tuple[Any, str | None]:
    """The compute dtype on target `name`, and a note when the target lacks the configured one.

    bfloat16 on a GPU without it (compute capability below 8.0, e.g. a T4)
    falls back to float16, as `qst-train` does on such a device.
    """
    dtype = config.model.dtype
    if dtype == "bfloat16" and not get_target(name).has_bf16:
        return jnp.float16, f"{name} has no bfloat16: computing in float16 (model.dtype=float16)"
    return jnp.dtype(dtype), None


def _sharded(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), tree, shardings)


def step_program(config: Any, cfg: ModelConfig, name: str, dtype: Any, mesh: Any = None):
    """`make(num_layers, for_cost)` for `compile_report`: the run's jitted step and its abstract arguments.

    With `mesh` (several devices), the step is `qst-train`'s sharded one: the
    backbone split by the partition rules, the side state replicated or
    split (`parallel.side`), the batch over the data axes.
    """
    sharded = mesh is not None
    mesh = mesh if sharded else abstract_mesh(name)
    total = max(config.train.steps, 1)

    def make(layers: int, for_cost: bool):
        layer_cfg = dataclasses.replace(cfg, num_layers=layers)
        micro_batches = 1 if for_cost else config.train.micro_batches
        shapes = jax.eval_shape(lambda k: random_params(layer_cfg, k, quantized=config.model.quantize, dtype=dtype),
                                jax.random.PRNGKey(0))
        backbone = replicated_on(mesh, shapes)
        if config.model.offload != "none":  # the layers in pinned host memory, as the loader places them
            platform = get_target(name).platform
            # A TPU Format needs concrete devices; elsewhere the sharding is kept over the abstract mesh.
            host = NamedSharding(mesh if platform == "tpu" else mesh.abstract_mesh, PartitionSpec(),
                                 memory_kind="pinned_host")
            def placed(s, d):  # a leaf kept on the device (host_placement: None) keeps its device sharding
                return jax.ShapeDtypeStruct(s.shape, s.dtype,
                                            sharding=host_placement(s.shape, s.dtype, host, platform) or d.sharding)

            backbone["layers"] = jax.tree.map(placed, shapes["layers"], backbone["layers"])
        key = jax.random.PRNGKey(0)
        if is_sweep(config):
            members = plan_members(config, total_steps=total)
            options = method_options(config)
            sides = SideSet(layer_cfg, tuple(m.side for m in members), dtype=dtype, ce_chunk=options["ce_chunk"],
                            remat_side=options["remat_side"], attention_impl=options["attention_impl"],
                            hidden_store=options["hidden_store"])
            txs = [m.tx for m in members]
            state = jax.eval_shape(lambda: init_sweep_state(sides, txs, [m.seed for m in members], 0))
            step = make_sweep_step(sides, txs, compiler_options=streaming_options(config.model.offload))
        else:
            model = build_model(config, layer_cfg, dtype=dtype)
            tx, _ = make_optimizer(config.optim, total)
            state = jax.eval_shape(lambda: init_train_state(model, tx, key))
            if sharded:
                from qst_jax.parallel import backbone_shardings, batch_sharding, fsdp_shardings, replicated

                state_sh = (fsdp_shardings if config.parallel.side == "fsdp" else replicated)(state, mesh)
                backbone_sh, batch_sh = backbone_shardings(shapes, mesh), batch_sharding(mesh)
                step = make_train_step(model, tx, shardings=(state_sh, backbone_sh, batch_sh))
                return step, (_sharded(state, state_sh), _sharded(shapes, backbone_sh),
                              _batch(config, batch_sh, micro_batches))
            step = make_train_step(model, tx, compiler_options=streaming_options(config.model.offload))
        return step, (replicated_on(mesh, state), backbone,
                      _batch(config, NamedSharding(mesh, PartitionSpec()), micro_batches))

    return make


def plan_run(config: Any, name: str, *, cost: bool = True) -> tuple[CompileReport, list[str]]:
    """Compile the run's train step for target `name`; (the report, notes to print first).

    Raises:
      ConfigError: a config that names no model, a seq_len beyond its
        context, or a mesh with `model.offload` or a sweep (run on one device).
      InputError: a mesh of more devices than the target has a topology for.
      AotUnavailable: the target's compiler (CUDA plugin, libtpu) is not installed.
    """
    p = config.parallel
    devices = p.data * p.fsdp * p.tensor
    if devices > 1 and (config.model.offload != "none" or is_sweep(config)):
        raise ConfigError(f"--plan over a mesh of {devices} devices: a single-device run only for "
                          f"{'model.offload' if config.model.offload != 'none' else 'a sweep'}, as qst-train runs it")
    mesh = plan_mesh(name, p) if devices > 1 else None
    cfg = model_config(config)
    check_context(config, cfg.max_position_embeddings)  # a step beyond the model's positions is no plan
    dtype, note = compute_dtype(config, name)
    notes = [note] if note else []
    where = f" over a {p.data} x {p.fsdp} x {p.tensor} (data x fsdp x tensor) mesh of {name}" if mesh else ""
    notes.append(f"planning {config.method} on {cfg.model_type} ({cfg.num_layers} layers, hidden {cfg.hidden_size}), "
                 f"batch {config.train.micro_batches} x {config.train.batch_size} x {config.data.seq_len}{where}, "
                 f"no weights read")
    report = compile_report(name, step_program(config, cfg, name, dtype, mesh), layers=cfg.num_layers,
                            repeats=config.train.micro_batches, cost=cost, dtype=jnp.dtype(dtype).name,
                            weight_passes=2 if config.method == "qlora" and config.qlora.remat else 1, mesh=mesh)
    return report, notes


def plan_mesh(name: str, parallel: Any) -> Any:
    """The abstract `(data, fsdp, tensor)` mesh of `parallel`'s sizes over devices of target `name`.

    Raises:
      InputError: the target has no topology of that many devices (a TPU slice).
    """
    from qst_jax.parallel.sharding import MESH_AXES

    return abstract_mesh(name, (parallel.data, parallel.fsdp, parallel.tensor), MESH_AXES)
