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

Sweeps (`--members 1,2,4,8`): K QST side networks (adapter, each with its own
learning rate) trained by one sweep step, the backbone run once; K = 1 is the
single-run step. `--task classification` trains score heads instead of the
LM loss. `--shape smollm2` is the packaged SmolLM2-135M (NF4):

    python scripts/benchmark.py --shape smollm2 --batch 4 --seq 128 --members 1,2,4,8 --task lm

Flax NNX loops (`--loops functional,nnx.jit,nnx.split`, qst and qlora methods):
the README's two loops over `qst_jax.nnx` modules, `nnx.jit` of
`(model, optimizer, batch)` and `jax.jit` of the pure step after one
`nnx.split`, timed beside `make_train_step` (`functional`, the default); the
table's `vs fn` column is each loop's step time over the functional one's.

    python scripts/benchmark.py --shape smollm2 --batch 4 --seq 128 --methods qst:adapter --loops functional,nnx.jit,nnx.split

`--offload` keeps the frozen layers in pinned host memory and streams them to
the device one layer ahead (`model.offload=weights`); `--offload
weights+states` also keeps QST's stored backbone states in host memory.

Decoding (`--decode-slots 16,64`): the serving engine (`generate.engine`,
half its slots on a QST side network, half on the base model, half sampled)
decodes `--steps` steady steps with every slot busy. Per step: the wall
time of `Engine.step()`, the device time of its jitted generate call alone
(run back to back, each waited for), and the host's share of the step,
`(step - device) / step`: scheduling, reading the tokens back,
detokenizing and callbacks that the device waits for. Tokens/s counts one
token per slot per step.

    python scripts/benchmark.py --shape tiny --decode-slots 16,64 --steps 50

Memory: `peak GiB` where the backend reports it (GPU), and always XLA's own
figure for the compiled step (`xla GiB`: arguments + outputs + temporaries,
less what donation aliases).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
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
from qst_jax.models.loops import streaming_options
from qst_jax.train.step import init_train_state, make_train_step
from qst_jax.methods.side_set import SideSet
from qst_jax.train.sweep import init_sweep_state, make_sweep_step

ALL_METHODS = "forward,qst:adapter,qst:lora,qst:linear,qst:maxpool,qst:avgpool,qlora,qlora:noremat"


def build_model(method: str, cfg, ce_chunk: int, side_heads: int, attention: str | None, offload: str = "none"):
    if method == "forward":
        return FrozenModel(cfg, ce_chunk=ce_chunk, attention_impl=attention)
    if method.startswith("qst"):
        down = method.split(":")[1] if ":" in method else "adapter"
        side = SideConfig(downsampler=down, side_heads=side_heads or None)
        store = "auto@host" if offload == "weights+states" else "auto"  # the kept states in host memory too
        return QSTModel(cfg, side, ce_chunk=ce_chunk, attention_impl=attention, hidden_store=store)
    if method.startswith("qlora"):
        return QLoRAModel(cfg, remat=not method.endswith("noremat"), ce_chunk=ce_chunk, attention_impl=attention)
    raise ValueError(f"unknown method {method!r}")


def peak_memory() -> int | None:
    stats = jax.devices()[0].memory_stats()
    if not stats:
        return None
    return int(stats.get("peak_bytes_in_use", stats.get("bytes_in_use", 0)))


def xla_bytes(compiled) -> int | None:
    """XLA's memory figure for a compiled step: arguments + outputs + temporaries - aliased (donated) bytes."""
    try:
        m = compiled.memory_analysis()
        return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)
    except (AttributeError, NotImplementedError, TypeError):
        return None


def make_batch(cfg, batch: int, seq: int, task: str) -> dict:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, (1, batch, seq)).astype(np.int32)
    data = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.ones_like(ids)}
    if task == "classification":
        data["labels"] = jnp.asarray(rng.integers(0, 2, (1, batch)).astype(np.int32))
        data["example_mask"] = jnp.ones((1, batch), jnp.float32)
    else:
        data["loss_mask"] = jnp.ones_like(ids)
    return data


def nnx_runner(model, cfg, backbone, data, loop: str):
    """(trainable count, run) of one of README's NNX loops over `model`'s method; `run` returns (loss, grad norm)."""
    from flax import nnx

    from qst_jax import nnx as qnnx
    from qst_jax.models.backbone import Backbone

    module = qnnx.Tuned(qnnx.Backbone(Backbone(cfg, backbone)), model, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(module, optax.adamw(1e-4), wrt=nnx.Param)
    micro = jax.tree.map(lambda x: x[0], data)

    def train(model, optimizer, batch):
        (loss, _), grads = nnx.value_and_grad(lambda m: m.loss(batch), has_aux=True)(model)
        optimizer.update(model, grads)
        return loss, optax.tree.norm(grads)

    if loop == "nnx.jit":
        step = nnx.jit(train)
        return count_params(module.params()), lambda: step(module, optimizer, micro)
    graphdef, frozen, state = nnx.split((module, optimizer), qnnx.FrozenWeight, ...)

    @functools.partial(jax.jit, donate_argnums=1)
    def pure(frozen, state, batch):
        model, optimizer = nnx.merge(graphdef, frozen, state)
        loss, grad_norm = train(model, optimizer, batch)
        return nnx.state((model, optimizer), nnx.Not(qnnx.FrozenWeight)), loss, grad_norm

    holder = {"state": state}

    def run():
        holder["state"], loss, grad_norm = pure(frozen, holder["state"], micro)
        return loss, grad_norm

    return count_params(module.params()), run


def measure(method: str, cfg, backbone, batch: int, seq: int, steps: int, args, members: int = 0,
            loop: str = "functional") -> dict:
    model = build_model(method, cfg, args.ce_chunk, args.side_heads, args.attention or None, args.offload)
    if members and not method.startswith("qst"):
        raise ValueError(f"--members needs qst methods, not {method!r}")
    if args.task == "classification" and method.startswith("qst"):
        model = QSTModel(cfg, dataclasses.replace(model.side, task="classification", num_labels=2),
                         ce_chunk=args.ce_chunk, attention_impl=args.attention or None)
    data = make_batch(cfg, batch, seq, args.task)
    record = {"shape": args.shape, "offload": args.offload, "method": method,
              "task": args.task, "batch": batch, "seq": seq, "device": jax.devices()[0].device_kind, "loop": loop}
    compiled = None
    if loop != "functional":
        if method == "forward" or members > 1:
            raise ValueError(f"--loops {loop} runs single qst/qlora steps, not {method!r} with K={members}")
        record["trainable_params"], run = nnx_runner(model, cfg, backbone, data, loop)
        start = time.perf_counter()
        jax.block_until_ready(run())  # the first call traces and compiles
        record["compile_s"] = time.perf_counter() - start
    elif method == "forward":
        fn = make_eval_step(model)
        micro = jax.tree.map(lambda x: x[0], data)
        start = time.perf_counter()
        compiled = fn.lower({}, backbone, micro).compile(streaming_options(args.offload))
        record["compile_s"] = time.perf_counter() - start

        def run():
            total, weight, _ = compiled({}, backbone, micro)
            return total / weight, jnp.float32(1.0)

        record["trainable_params"] = 0
    else:
        if members > 1:  # a sweep: K members with their own learning rates, one backbone pass
            sides = SideSet.of([model] * members)
            txs = [optax.adamw(1e-4 * (i + 1)) for i in range(members)]
            state = init_sweep_state(sides, txs, list(range(members)), seed=0)
            step = make_sweep_step(sides, txs, compiler_options=streaming_options(args.offload))
        else:
            tx = optax.adamw(1e-4)
            state = init_train_state(model, tx, jax.random.PRNGKey(0))
            step = make_train_step(model, tx, compiler_options=streaming_options(args.offload))
        record["members"] = members or None
        record["trainable_params"] = count_params(state.params)
        start = time.perf_counter()
        compiled = step.lower(state, backbone, data).compile()
        record["compile_s"] = time.perf_counter() - start
        holder = {"state": state}

        def run():
            holder["state"], metrics = compiled(holder["state"], backbone, data)
            return jnp.max(metrics["loss"]), jnp.min(metrics["grad_norm"])  # every member finite and non-zero

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
        xla_bytes=xla_bytes(compiled) if compiled is not None else None,
        loss=float(loss),
        loss_finite=bool(np.isfinite(float(loss))),
        grad_norm_nonzero=bool(float(grad_norm) > 0),
    )
    return record


class _DigitsTokenizer:
    """Token ids as text ("12 7 300"): what the engine's detokenizer and stop strings work on."""

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return " ".join(str(int(i)) for i in ids)


def measure_decode(cfg, backbone_params, slots: int, steps: int, shape: str) -> dict:
    """The decoding engine's steady step with `slots` busy slots: wall and device time, host share, tokens/s."""
    from qst_jax.generate.engine import Engine, Request
    from qst_jax.generate.side_store import SideStore
    from qst_jax.models.backbone import Backbone

    backbone = Backbone(cfg, backbone_params, dtype=jnp.bfloat16)
    side = QSTModel(cfg, SideConfig(), dtype=jnp.bfloat16)
    store = SideStore(cfg, {"side": (side, side.init(jax.random.PRNGKey(1)))}, dtype=jnp.bfloat16)
    prompt_len, warm = 8, 3
    max_len = prompt_len + warm + steps + 4
    engine = Engine(backbone, _DigitsTokenizer(), slots=slots, max_len=max_len, sides=store, eos_ids=[])
    start = time.perf_counter()
    engine.warmup()
    compile_s = time.perf_counter() - start
    rng = np.random.default_rng(0)
    requests = [engine.submit(Request(rng.integers(0, cfg.vocab_size, prompt_len).tolist(),
                                      side="side" if i % 2 else None, max_tokens=max_len, eos_ids=[],
                                      temperature=0.8 * (i // 2 % 2), seed=i)) for i in range(slots)]
    for _ in range(warm):  # admission, then steady steps
        engine.step()
    jax.block_until_ready(engine.state)
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    jax.block_until_ready(engine.state)
    step_s = (time.perf_counter() - start) / steps
    core, params, state = engine.core, engine.model_params(), engine.state
    start = time.perf_counter()
    for _ in range(steps):  # the jitted call alone, each waited for
        state, tokens = core.generate(backbone.params, params, state)
        tokens.block_until_ready()
    device_s = (time.perf_counter() - start) / steps
    engine.state = state
    busy = engine.busy
    engine.cancel_all()
    valid = all(0 <= t < cfg.vocab_size for r in requests for t in r.tokens)
    return {"bench": "decode", "shape": shape, "method": "decode", "slots": slots, "steps": steps,
            "busy_slots": busy, "compile_s": compile_s, "step_s": step_s, "device_s": device_s,
            "host_share": max(0.0, (step_s - device_s) / step_s), "tokens_per_s": slots / step_s,
            "tokens_valid": valid and all(len(r.tokens) >= steps for r in requests)}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="tiny", choices=["tiny", "7b", "13b", "70b", "smollm2"])
    parser.add_argument("--batch", default="16", help="comma-separated batch sizes")
    parser.add_argument("--seq", default="512", help="comma-separated sequence lengths")
    parser.add_argument("--methods", default=ALL_METHODS)
    parser.add_argument("--steps", type=int, default=10, help="timed steps after one warm-up step")
    parser.add_argument("--ce-chunk", type=int, default=2048)
    parser.add_argument("--side-heads", type=int, default=0, help="0: the backbone's (official layout)")
    parser.add_argument("--attention", default="", help="'', xla or cudnn")
    parser.add_argument("--out", help="append JSON lines here")
    parser.add_argument("--members", default="", help="comma-separated sweep sizes K (qst methods), e.g. 1,2,4,8")
    parser.add_argument("--task", default="lm", choices=["lm", "classification"])
    parser.add_argument("--offload", nargs="?", const="weights", default="none",
                        choices=["none", "weights", "weights+states"],
                        help="stream the frozen layers from pinned host memory (model.offload=weights; "
                             "weights+states: QST's kept states too); the random backbone is built on the CPU so the "
                             "device never holds it whole")
    parser.add_argument("--loops", default="functional",
                        help="comma-separated: functional (make_train_step), nnx.jit, nnx.split (qst_jax.nnx loops)")
    parser.add_argument("--decode-slots", default="",
                        help="comma-separated slot counts: measure the decoding engine's step instead of training")
    args = parser.parse_args(argv)

    if args.shape == "smollm2":
        from qst_jax.data.specs import resolve_model_path
        from qst_jax.models import load_backbone

        loaded = load_backbone(resolve_model_path("smollm2"))
        cfg, backbone = loaded.cfg, loaded.params
    elif args.offload != "none":
        from qst_jax.models.loader import layers_in_host_memory

        cfg = llama2_config(args.shape)
        with jax.default_device(jax.devices("cpu")[0]):
            built = random_params(cfg, jax.random.PRNGKey(0))
        host, device = layers_in_host_memory(), jax.devices()[0]
        backbone = {k: jax.device_put(v, host if k == "layers" else device) for k, v in built.items()}
        del built
    else:
        cfg = llama2_config(args.shape)
        backbone = random_params(cfg, jax.random.PRNGKey(0))
    if args.decode_slots:
        records = [measure_decode(cfg, backbone, int(s), args.steps, args.shape) for s in args.decode_slots.split(",")]
        for r in records:
            print(json.dumps(r), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(r) + "\n")
        print(f"\n{'slots':>5} {'step ms':>8} {'device ms':>9} {'host share':>10} {'tok/s':>8} ok")
        for r in records:
            print(f"{r['slots']:>5} {r['step_s'] * 1e3:>8.2f} {r['device_s'] * 1e3:>9.2f} {r['host_share']:>10.1%} "
                  f"{r['tokens_per_s']:>8.0f} {'yes' if r['tokens_valid'] else 'NO'}")
        return records
    member_counts = [int(k) for k in args.members.split(",") if k] or [0]
    records = []
    for batch in (int(b) for b in args.batch.split(",")):
        for seq in (int(s) for s in args.seq.split(",")):
            for method in args.methods.split(","):
                for k, loop in ((k, loop) for k in member_counts for loop in args.loops.split(",")):
                    try:
                        record = measure(method, cfg, backbone, batch, seq, args.steps, args, members=k, loop=loop)
                    except Exception as err:  # out of memory and the like: record it, go on
                        record = {"shape": args.shape, "method": method, "batch": batch, "seq": seq, "members": k,
                                  "loop": loop, "error": f"{type(err).__name__}: {str(err)[:200]}"}
                    records.append(record)
                    line = json.dumps(record)
                    print(line, flush=True)
                    if args.out:
                        with open(args.out, "a") as f:
                            f.write(line + "\n")
    print_table(records)
    return records


def print_table(records: list[dict]) -> None:
    print(f"\n{'method':<14} {'loop':<10} {'K':>2} {'B x T':>9} {'compile s':>9} {'step s':>8} {'vs K=1':>6} "
          f"{'vs fn':>5} {'tok/s':>9} {'peak GiB':>8} {'xla GiB':>8} {'trainable':>11} ok")
    single = {(r["method"], r["batch"], r["seq"]): r["step_s"] for r in records
              if r.get("members") == 1 and "step_s" in r}
    functional = {(r["method"], r["batch"], r["seq"], r.get("members")): r["step_s"] for r in records
                  if r.get("loop", "functional") == "functional" and "step_s" in r}
    for r in records:
        k, loop = r.get("members") or "", r.get("loop", "functional")
        if "error" in r:
            print(f"{r['method']:<14} {loop:<10} {k:>2} {r['batch']:>4} x {r['seq']:<4} {r['error'][:60]}")
            continue
        peak = f"{r['peak_bytes'] / 2**30:.2f}" if r["peak_bytes"] else "n/a"
        xla = f"{r['xla_bytes'] / 2**30:.2f}" if r.get("xla_bytes") else "n/a"
        base = single.get((r["method"], r["batch"], r["seq"]))
        ratio = f"{r['step_s'] / base:.2f}" if base and k else ""
        fn = functional.get((r["method"], r["batch"], r["seq"], r.get("members")))
        vs_fn = f"{r['step_s'] / fn:.2f}" if fn and loop != "functional" else ""
        ok = "yes" if r["loss_finite"] and r["grad_norm_nonzero"] else "NO"
        print(f"{r['method']:<14} {loop:<10} {k:>2} {r['batch']:>4} x {r['seq']:<4} {r['compile_s']:>9.1f} "
              f"{r['step_s']:>8.3f} {ratio:>6} {vs_fn:>5} {r['tokens_per_s']:>9.0f} {peak:>8} {xla:>8} {r['trainable_params']:>11,} {ok}")


if __name__ == "__main__":
    main()
