"""Compile qst_jax's GPU programs for named GPUs on a machine without one; one JSON line per program and target.

    python scripts/compile_for_gpu.py --shape 7b --batch 16 --seq 512 \
        --programs qst,qst:maxpool,qst:compute,qlora,qlora:noremat,forward,sweep:8,prefill:16,decode:1 \
        --targets h100,a100-80 [--cost]

Programs: `qst[:DOWNSAMPLER][:compute]` (the default QST step: adapter, fp8
states, side remat; `compute` keeps bf16 states), `qst:noremat`, `qlora` /
`qlora:noremat`, `forward` (the frozen backbone's eval step), `sweep:K` (K
default side networks over one backbone pass), `prefill:ROWS` and
`decode:ROWS` (QST generation: a prompt of --seq tokens, one token against
a cache of --seq slots). Random LLaMA-2 shapes, nothing materialised
(`jax.eval_shape`). Figures are compile-only: XLA's buffer assignment
without autotuning (about +-20%), never a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from qst_jax.aot.compile import compile_report, replicated_on  # noqa: E402
from qst_jax.aot.targets import abstract_mesh, target  # noqa: E402
from qst_jax.eval.tasks import make_eval_step  # noqa: E402
from qst_jax.methods import FrozenModel, QLoRAModel, QSTModel, SideConfig, SideSet  # noqa: E402
from qst_jax.models.random_init import llama2_config, random_params  # noqa: E402
from qst_jax.train.step import init_train_state, make_train_step  # noqa: E402
from qst_jax.train.sweep import init_sweep_state, make_sweep_step  # noqa: E402


def program(spec: str, shape: str, batch: int, seq: int, name: str):
    """`make(layers, for_cost)` for one program spec on target `name`."""
    mesh = abstract_mesh(name)
    dtype = jnp.bfloat16 if target(name).has_bf16 else jnp.float16
    kind, *opts = spec.split(":")

    def make(layers: int, for_cost: bool):
        import dataclasses

        cfg = dataclasses.replace(llama2_config(shape), num_layers=layers)
        backbone = replicated_on(mesh, jax.eval_shape(lambda k: random_params(cfg, k, dtype=dtype), jax.random.PRNGKey(0)))
        ids = jax.ShapeDtypeStruct((1, batch, seq), jnp.int32)
        data = replicated_on(mesh, {"input_ids": ids, "attention_mask": ids, "loss_mask": ids})
        tx = optax.adamw(1e-4)
        if kind == "forward":
            micro = replicated_on(mesh, jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape[1:], s.dtype), data))
            return make_eval_step(FrozenModel(cfg, dtype)), ({}, backbone, micro)
        if kind == "qlora":
            model = QLoRAModel(cfg, dtype=dtype, remat="noremat" not in opts)
        elif kind == "sweep":
            k = int(opts[0])
            sides = SideSet(cfg, (SideConfig(),) * k, dtype=dtype)
            txs = [tx] * k
            state = replicated_on(mesh, jax.eval_shape(lambda: init_sweep_state(sides, txs, list(range(k)), 0)))
            return make_sweep_step(sides, txs), (state, backbone, data)
        elif kind == "qst":
            down = next((o for o in opts if o not in ("compute", "noremat")), "adapter")
            model = QSTModel(cfg, SideConfig(downsampler=down), dtype=dtype,
                             hidden_store="compute" if "compute" in opts else "fp8", remat_side="noremat" not in opts)
        if kind in ("prefill", "decode"):
            rows = int(opts[0])
            model = QSTModel(cfg, SideConfig(), dtype=dtype)
            params = replicated_on(mesh, jax.eval_shape(model.init, jax.random.PRNGKey(0)))
            caches = replicated_on(mesh, jax.eval_shape(lambda: model.init_caches(rows, seq)))
            length = seq if kind == "prefill" else 1
            tok = jax.ShapeDtypeStruct((rows, length), jnp.int32)
            index = jax.ShapeDtypeStruct((), jnp.int32)
            key_mask = jax.ShapeDtypeStruct((rows, seq), jnp.int32)

            def run(p, bp, ids, mask, key_mask, caches, index):
                o, caches = model.hidden(p, bp, ids, mask, key_mask=key_mask, caches=caches, cache_index=index)
                return model.head(p, bp, o[:, -1:], mask[:, -1:]), caches

            args = (params, backbone, *replicated_on(mesh, (tok, tok, key_mask)), caches, replicated_on(mesh, index))
            return jax.jit(run, donate_argnums=(5,)), args
        state = replicated_on(mesh, jax.eval_shape(lambda: init_train_state(model, tx, jax.random.PRNGKey(0))))
        return make_train_step(model, tx), (state, backbone, data)

    return make


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="7b")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--programs", default="qst,qst:maxpool,qlora,forward")
    parser.add_argument("--targets", default="h100")
    parser.add_argument("--cost", action="store_true", help="also flops, bytes and the roofline estimate (slower)")
    args = parser.parse_args()
    layers = llama2_config(args.shape).num_layers
    for name in args.targets.split(","):
        for spec in args.programs.split(","):
            row = {"program": spec, "shape": args.shape, "batch": args.batch, "seq": args.seq, "target": name}
            try:
                report = compile_report(name, program(spec, args.shape, args.batch, args.seq, name), layers=layers,
                                        cost=args.cost, dtype="bfloat16" if target(name).has_bf16 else "float16")
            except Exception as err:  # noqa: BLE001 (a program XLA refuses is a row of the table, not the end)
                row["error"] = str(err).splitlines()[0][:300]
            else:
                row.update(report.to_dict())
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
