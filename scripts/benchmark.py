"""Step time, compile time and peak memory of QST, QLoRA and the backbone alone.

    python scripts/benchmark.py --shape 7b --batch 16 --seq 512          # on a GPU
    python scripts/benchmark.py --shape tiny --batch 2 --seq 64 --steps 3 # CPU smoke run

Backbones are random LLaMA-2 shapes (tiny, 7b, 13b, 70b) built directly as NF4
on the device, no checkpoint needed. Methods: `qst:<downsampler>` (adapter,
lora, linear, maxpool, avgpool), `qlora` (rematerialised), `qlora:noremat`,
`forward` (backbone forward and loss only, the floor of a QST step). For each
(batch, seq, method): compile time, median step time over `--steps` steps
after warm-up, tokens/s, peak device memory (`memory_stats`, where the
backend reports it), trainable parameters, and whether the loss is finite and
the gradient norm non-zero. One JSON line per measurement (also to `--out`),
then a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from qst_jax.models.random_init import llama2_config, random_params
from qst_jax.methods.side_config import SideConfig
from qst_jax.methods import FrozenModel, QLoRAModel, QSTModel
from qst_jax.tree import count_params
from qst_jax.eval.tasks import make_eval_step
from qst_jax.train.step import init_train_state, make_train_step

ALL_METHODS = "forward,qst:adapter,qst:lora,qst:linear,qst:maxpool,qst:avgpool,qlora,qlora:noremat"


def build_model(method: str, cfg, ce_chunk: int, side_heads: int, attention: str | None):
    if method == "forward":
        return FrozenModel(cfg, ce_chunk=ce_chunk, attention_impl=attention)
    if method.startswith("qst"):
        down = method.split(":")[1] if ":" in method else "adapter"
        side = SideConfig(downsampler=down, side_heads=side_heads or None)
        return QSTModel(cfg, side, ce_chunk=ce_chunk, attention_impl=attention)
    if method.startswith("qlora"):
        return QLoRAModel(cfg, remat=not method.endswith("noremat"), ce_chunk=ce_chunk, attention_impl=attention)
    raise ValueError(f"unknown method {method!r}")


def peak_memory() -> int | None:
    stats = jax.devices()[0].memory_stats()
    if not stats:
        return None
    return int(stats.get("peak_bytes_in_use", stats.get("bytes_in_use", 0)))


def measure(method: str, cfg, backbone, batch: int, seq: int, steps: int, args) -> dict:
    model = build_model(method, cfg, args.ce_chunk, args.side_heads, args.attention or None)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, (1, batch, seq)).astype(np.int32)
    data = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.ones_like(ids), "loss_mask": jnp.ones_like(ids)}
    record = {"shape": args.shape, "method": method, "batch": batch, "seq": seq, "device": jax.devices()[0].device_kind}
    if method == "forward":
        fn = make_eval_step(model)
        micro = jax.tree.map(lambda x: x[0], data)
        start = time.perf_counter()
        compiled = fn.lower({}, backbone, micro).compile()
        record["compile_s"] = time.perf_counter() - start

        def run():
            total, weight, _ = compiled({}, backbone, micro)
            return total / weight, jnp.float32(1.0)

        record["trainable_params"] = 0
    else:
        tx = optax.adamw(1e-4)
        state = init_train_state(model, tx, jax.random.PRNGKey(0))
        record["trainable_params"] = count_params(state.params)
        step = make_train_step(model, tx)
        start = time.perf_counter()
        compiled = step.lower(state, backbone, data).compile()
        record["compile_s"] = time.perf_counter() - start
        holder = {"state": state}

        def run():
            holder["state"], metrics = compiled(holder["state"], backbone, data)
            return metrics["loss"], metrics["grad_norm"]

    loss, grad_norm = jax.block_until_ready(run())  # warm-up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss, grad_norm = jax.block_until_ready(run())
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    record.update(
        step_s=median,
        tokens_per_s=batch * seq / median,
        peak_bytes=peak_memory(),
        loss=float(loss),
        loss_finite=bool(np.isfinite(float(loss))),
        grad_norm_nonzero=bool(float(grad_norm) > 0),
    )
    return record


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="tiny", choices=["tiny", "7b", "13b", "70b"])
    parser.add_argument("--batch", default="16", help="comma-separated batch sizes")
    parser.add_argument("--seq", default="512", help="comma-separated sequence lengths")
    parser.add_argument("--methods", default=ALL_METHODS)
    parser.add_argument("--steps", type=int, default=10, help="timed steps after one warm-up step")
    parser.add_argument("--ce-chunk", type=int, default=2048)
    parser.add_argument("--side-heads", type=int, default=0, help="0: the backbone's (official layout)")
    parser.add_argument("--attention", default="", help="'', xla or cudnn")
    parser.add_argument("--out", help="append JSON lines here")
    args = parser.parse_args(argv)

    cfg = llama2_config(args.shape)
    backbone = random_params(cfg, jax.random.PRNGKey(0))
    records = []
    for batch in (int(b) for b in args.batch.split(",")):
        for seq in (int(s) for s in args.seq.split(",")):
            for method in args.methods.split(","):
                try:
                    record = measure(method, cfg, backbone, batch, seq, args.steps, args)
                except Exception as err:  # out of memory and the like: record it, go on
                    record = {"shape": args.shape, "method": method, "batch": batch, "seq": seq,
                              "error": f"{type(err).__name__}: {str(err)[:200]}"}
                records.append(record)
                line = json.dumps(record)
                print(line, flush=True)
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(line + "\n")
    print(f"\n{'method':<14} {'B x T':>9} {'compile s':>9} {'step s':>8} {'tok/s':>9} {'peak GiB':>8} {'trainable':>11} ok")
    for r in records:
        if "error" in r:
            print(f"{r['method']:<14} {r['batch']:>4} x {r['seq']:<4} {r['error'][:60]}")
            continue
        peak = f"{r['peak_bytes'] / 2**30:.2f}" if r["peak_bytes"] else "n/a"
        ok = "yes" if r["loss_finite"] and r["grad_norm_nonzero"] else "NO"
        print(f"{r['method']:<14} {r['batch']:>4} x {r['seq']:<4} {r['compile_s']:>9.1f} {r['step_s']:>8.3f} "
              f"{r['tokens_per_s']:>9.0f} {peak:>8} {r['trainable_params']:>11,} {ok}")
    return records


if __name__ == "__main__":
    main()
