"""The fused NF4 kernel against the reference path, at few tokens (decoding, batch 1).

    python scripts/kernel_benchmark.py --shape 7b                       # on a GPU
    python scripts/kernel_benchmark.py --shape tiny --interpret --steps 2  # CPU smoke run

Two measurements, each with the reference path (dequantize, then XLA's
matmul) and with the fused Pallas kernel (`quant/nf4_kernel.py`):

  * `matmul`: one NF4 linear of each LLaMA-2 projection shape (q, gate, down)
    at `--tokens` tokens: median time and the effective rate at which the
    4-bit weight is read (packed bytes / time);
  * `forward`: the whole random-weight backbone (every layer, `lax.scan`) on
    `--tokens` tokens of one sequence, the weight-bound cost of a decode step;
  * `decode`: greedy KV-cached decoding of `--decode` new tokens for one
    sequence through `generate.Generator`: time and tokens per second.

`--interpret` runs the kernel in Pallas interpret mode (any backend; numbers
are then only a smoke test). One JSON line per measurement, then a table.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from qst_jax.models.decoder import logits_fn
from qst_jax.models.random_init import llama2_config, random_nf4, random_params
from qst_jax.quant.matmul import matmul, set_kernel_mode
from qst_jax.quant.nf4_kernel import MAX_FUSED_TOKENS, block_n_for, nf4_matmul


def _median_time(fn, args, steps: int) -> tuple[float, float]:
    """(compile seconds, median step seconds) of jitted `fn(*args)`."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - start
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return compile_s, statistics.median(times)


def _modes(interpret: bool) -> list[tuple[str, str]]:
    return [("reference", "off"), ("fused", "interpret" if interpret else "auto")]


def bench_matmul(cfg, tokens: int, steps: int, interpret: bool, block_n: int | None = None) -> list[dict]:
    shapes = {"q": (cfg.num_heads * cfg.head_dim, cfg.hidden_size), "gate": (cfg.intermediate_size, cfg.hidden_size),
              "down": (cfg.hidden_size, cfg.intermediate_size)}
    paths = {
        "reference": lambda x, w: matmul(x, w),  # with the kernel mode "off"
        "fused": functools.partial(nf4_matmul, interpret=interpret, block_n=block_n),
    }
    records = []
    for name, (out_dim, in_dim) in shapes.items():
        w = random_nf4(jax.random.PRNGKey(0), (), (out_dim, in_dim))
        x = jax.random.normal(jax.random.PRNGKey(1), (tokens, in_dim), jnp.bfloat16)
        outputs = {}
        previous = set_kernel_mode("off")
        try:
            for path, fn in paths.items():
                compile_s, step_s = _median_time(fn, (x, w), steps)
                outputs[path] = np.asarray(jax.jit(fn)(x, w), np.float32)
                records.append({"bench": "matmul", "layer": name, "shape": [out_dim, in_dim], "tokens": tokens,
                                "path": path, "compile_s": compile_s, "step_s": step_s,
                                "block_n": (block_n or block_n_for(out_dim)) if path == "fused" else None,
                                "weight_gb_per_s": w.packed.nbytes / step_s / 1e9})
        finally:
            set_kernel_mode(previous)
        diff = np.linalg.norm(outputs["fused"] - outputs["reference"]) / np.linalg.norm(outputs["reference"])
        records[-1]["rel_diff_vs_reference"] = float(diff)
    return records


def bench_forward(cfg, params, tokens: int, steps: int, interpret: bool) -> list[dict]:
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (1, tokens)), jnp.int32)
    mask = jnp.ones_like(ids)
    records = []
    for path, mode in _modes(interpret):
        previous = set_kernel_mode(mode)
        try:
            fn = logits_fn(cfg, dtype=jnp.bfloat16)
            compile_s, step_s = _median_time(fn, (params, ids, mask), steps)
        finally:
            set_kernel_mode(previous)
        records.append({"bench": "forward", "layer": "all", "shape": [cfg.num_layers], "tokens": tokens,
                        "path": path, "compile_s": compile_s, "step_s": step_s, "tokens_per_s": tokens / step_s})
    return records


class _IdTokenizer:
    """Token ids in and out: all the Generator needs to decode from id prompts."""

    pad_token_id, eos_token_id = 0, None

    def decode(self, ids, skip_special_tokens=False) -> str:
        return ""


def bench_decode(cfg, params, new_tokens: int, interpret: bool) -> list[dict]:
    """Greedy KV-cached decoding of one sequence (`generate.Generator`), per new token."""
    from qst_jax.generate.decode import Generator
    from qst_jax.models.backbone import Backbone

    records = []
    for path, mode in _modes(interpret):
        previous = set_kernel_mode(mode)
        try:
            gen = Generator(Backbone(cfg=cfg, params=params), _IdTokenizer())
            prompt = [[1, 2, 3, 4]]
            start = time.perf_counter()
            gen.generate_ids(prompt, max_new_tokens=new_tokens, eos_ids=[])  # compiles prefill and step
            compile_s = time.perf_counter() - start
            start = time.perf_counter()
            out = gen.generate_ids(prompt, max_new_tokens=new_tokens, eos_ids=[])
            seconds = time.perf_counter() - start
        finally:
            set_kernel_mode(previous)
        records.append({"bench": "decode", "layer": "all", "shape": [cfg.num_layers], "tokens": len(out[0]),
                        "path": path, "compile_s": compile_s, "step_s": seconds / len(out[0]),
                        "tokens_per_s": len(out[0]) / seconds})
    return records


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="7b", choices=["tiny", "7b", "13b", "70b"])
    parser.add_argument("--tokens", default="1,16,64", help=f"comma-separated, each <= {MAX_FUSED_TOKENS}")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--interpret", action="store_true", help="kernel in Pallas interpret mode (CPU smoke run)")
    parser.add_argument("--skip-forward", action="store_true", help="no whole-backbone measurements")
    parser.add_argument("--decode", type=int, default=64, help="new tokens of the batch-1 decode run (0: none)")
    parser.add_argument("--block-n", type=int, default=None, help="kernel row tile for the matmul runs (sweeps)")
    parser.add_argument("--out", help="append JSON lines here")
    args = parser.parse_args(argv)
    token_counts = [int(t) for t in args.tokens.split(",")]
    if max(token_counts) > MAX_FUSED_TOKENS:
        parser.error(f"--tokens: the kernel serves at most {MAX_FUSED_TOKENS} tokens")
    if not args.interpret and jax.default_backend() != "gpu":
        parser.error("the compiled kernel needs a GPU; pass --interpret for a CPU smoke run")

    cfg = llama2_config(args.shape)
    params = None if args.skip_forward else random_params(cfg, jax.random.PRNGKey(0))
    records: list[dict] = []

    def emit(batch: list[dict]) -> None:
        for record in batch:
            record["device"] = jax.devices()[0].device_kind
            line = json.dumps(record)
            print(line, flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(line + "\n")
        records.extend(batch)

    for tokens in token_counts:
        emit(bench_matmul(cfg, tokens, args.steps, args.interpret, args.block_n))
        if params is not None:
            emit(bench_forward(cfg, params, tokens, args.steps, args.interpret))
    if params is not None and args.decode > 0:
        emit(bench_decode(cfg, params, args.decode, args.interpret))

    print(f"\n{'bench':<8} {'layer':<6} {'tokens':>6} {'reference ms':>13} {'fused ms':>9} {'speedup':>8} "
          f"{'fused rate':>16}")
    by_key: dict[tuple, dict] = {}
    for r in records:
        by_key.setdefault((r["bench"], r["layer"], r["tokens"]), {})[r["path"]] = r
    for (bench, layer, tokens), pair in by_key.items():
        ref, fused = pair["reference"], pair["fused"]
        rate = (f"{fused['weight_gb_per_s']:.0f} GB/s 4-bit" if "weight_gb_per_s" in fused
                else f"{fused['tokens_per_s']:.1f} tok/s")
        print(f"{bench:<8} {layer:<6} {tokens:>6} {ref['step_s'] * 1e3:>13.3f} {fused['step_s'] * 1e3:>9.3f} "
              f"{ref['step_s'] / fused['step_s']:>7.2f}x {rate:>16}")
    return records


if __name__ == "__main__":
    main()
