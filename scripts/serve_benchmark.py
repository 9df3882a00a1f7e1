"""Load test of qst-serve, in the way of vLLM's `bench serve`: TTFT, TPOT, ITL, latency and throughput.

    python scripts/serve_benchmark.py [--sides 1,4,16,64] [--concurrency 16] [--requests 64] [--max-tokens 32]
    python scripts/serve_benchmark.py --request-rate 4          # Poisson arrivals instead of a fixed concurrency

Starts `qst-serve` on 127.0.0.1 (a free port) over the packaged SmolLM2
(NF4) with 64 random side networks (exported to a temporary folder), then
for each count K of distinct side networks in the mix sends `--requests`
streamed greedy completions of prompts cut from the packaged plays, each
naming one of K side networks (uniformly, or `--skew` Zipf-like), at
`--concurrency` (or Poisson arrivals at `--request-rate` per second). Beside
those rows: the same requests sent one at a time (TTFT of a lone request),
and the static `qst-generate --file` batch of them. With `--registered N`
(N above the largest K), N side networks are loaded on the host and two
more rows draw every request's side network from all N (Zipf-like, then
uniformly), through a device stack of `--side-capacity` (S-LoRA's test of
thousands of adapters); each row counts the side store's host-to-device
copies (`qst_side_device_loads` in /metrics), and the last record says the
host bytes a side network costs. Every response is
checked against the one-at-a-time run (greedy: batching must change
nothing); a mismatch or an unstated finish is counted as `mixed`. Prints
one JSON line per row, then a table. Stops the server when done.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).parents[1]
sys.path.insert(0, str(REPO))
import qst_jax  # noqa: E402,F401 (before jax: the CPU platform where a CUDA plugin has no GPU)

try:
    import httpx
except ImportError:  # the openai client's newer releases bring httpx2
    import httpx2 as httpx


def export_sides(directory: pathlib.Path, count: int) -> dict[str, str]:
    """`count` random default side networks for SmolLM2 (Up non-zero, so each changes the text)."""
    import jax

    from qst_jax.data.specs import resolve_model_path
    from qst_jax.methods import QSTModel, SideConfig, export_side
    from qst_jax.models import load_config

    cfg = load_config(resolve_model_path("smollm2"))
    model = QSTModel(cfg, SideConfig())
    init = jax.jit(model.init)
    paths = {}
    for i in range(count):
        params = init(jax.random.PRNGKey(i))
        params["up"]["w"] = jax.random.normal(jax.random.PRNGKey(10_000 + i), params["up"]["w"].shape) * 0.05
        paths[f"s{i}"] = str(directory / f"s{i}")
        export_side(paths[f"s{i}"], model, params, cfg)
    return paths


def prompts(n: int, seed: int = 0) -> list[str]:
    from qst_jax.data.offline import shakespeare_plays

    text = " ".join(open(p).read() for p in list(shakespeare_plays().values())[:3]).split()
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        start = rng.randrange(len(text) - 40)
        out.append(" ".join(text[start : start + rng.randrange(12, 30)]))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def one(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    times, text, finish, usage = [], [], None, None
    async with client.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as r:
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"]
            for choice in event["choices"]:
                if choice["text"]:
                    times.append(time.perf_counter())
                    text.append(choice["text"])
                finish = choice["finish_reason"] or finish
    end = time.perf_counter()
    tokens = usage["completion_tokens"] if usage else 0
    ttft = (times[0] if times else end) - start
    return {"model": model, "prompt": prompt, "text": "".join(text), "finish": finish, "tokens": tokens, "ttft": ttft,
            "e2e": end - start, "tpot": (end - start - ttft) / max(tokens - 1, 1),
            "itl": [b - a for a, b in zip(times, times[1:])]}


async def load(url: str, jobs: list[tuple[str, str]], max_tokens: int, concurrency: int, rate: float) -> tuple:
    limits = httpx.Limits(max_connections=max(concurrency, 64))
    async with httpx.AsyncClient(limits=limits) as client:
        gate = asyncio.Semaphore(concurrency)
        rng = random.Random(1)

        async def run(job):
            async with gate:
                return await one(client, url, job[0], job[1], max_tokens)

        start = time.perf_counter()
        tasks = []
        for job in jobs:
            tasks.append(asyncio.create_task(run(job)))
            if rate > 0:
                await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
        return results, time.perf_counter() - start


COUNTED = ("qst_prefill_calls_total", "qst_decode_steps_total", "qst_side_device_loads")


def server_metrics(url: str) -> dict[str, float]:
    """Every unlabelled value of the server's /metrics."""
    values = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        name, _, value = line.partition(" ")
        if not name.startswith("#") and "{" not in name and value:
            values[name] = float(value)
    return values


def engine_counts(url: str) -> tuple[float, ...]:
    """(prefill calls, decode steps, side networks copied to the device) so far, from the server's /metrics."""
    values = server_metrics(url)
    return tuple(values[name] for name in COUNTED)


def measured(url: str, name: str, run, reference: dict | None) -> tuple[dict, list[dict]]:
    """(the summary of `run()`'s (results, wall), with the prefill calls and decode steps it took; the results)."""
    before = engine_counts(url)
    results, wall = run()
    after = engine_counts(url)
    record = summary(name, results, wall, reference)
    record["prefill_calls"], record["decode_steps"], record["side_device_loads"] = (
        int(a - b) for a, b in zip(after, before))
    return record, results


def summary(name: str, results: list[dict], wall: float, reference: dict | None) -> dict:
    def stats(values):
        values = sorted(values)
        if not values:
            return {"mean": None, "p50": None, "p99": None}
        return {"mean": statistics.fmean(values), "p50": values[len(values) // 2],
                "p99": values[min(len(values) - 1, int(0.99 * len(values)))]}

    tokens = sum(r["tokens"] for r in results)
    mixed = sum(1 for r in results if r["finish"] not in ("stop", "length") or
                (reference is not None and reference[(r["model"], r["prompt"])] != r["text"]))
    return {"row": name, "requests": len(results), "wall_s": wall, "req_per_s": len(results) / wall,
            "out_tok_per_s": tokens / wall, "ttft": stats([r["ttft"] for r in results]),
            "tpot": stats([r["tpot"] for r in results]), "itl": stats([x for r in results for x in r["itl"]]),
            "e2e": stats([r["e2e"] for r in results]), "mixed": mixed}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sides", default="1,4,16,64")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--sequential-requests", type=int, default=16, help="requests of the one-at-a-time row")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--request-rate", type=float, default=0.0, help="Poisson arrivals per second (0: all at once)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--skew", action="store_true", help="side networks drawn Zipf-like, not uniformly")
    parser.add_argument("--registered", type=int, default=0,
                        help="side networks loaded on the host (0: the largest of --sides); above it, two rows draw "
                             "from all of them, Zipf-like and uniformly")
    parser.add_argument("--side-capacity", type=int, default=64, help="qst-serve's device stack per side shape")
    parser.add_argument("--no-static", action="store_true", help="leave out the static qst-generate row")
    parser.add_argument("--serve-args", default="", help="more qst-serve arguments, e.g. '--admit-wait-ms 0'")
    parser.add_argument("--out", help="append JSON lines here")
    args = parser.parse_args(argv)
    counts = [int(k) for k in args.sides.split(",")]
    work = pathlib.Path(tempfile.mkdtemp(prefix="qst-serve-bench-"))
    registered = max(args.registered, max(counts))
    paths = export_sides(work, registered)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(work / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "qst_jax.cli.serve", "--port", str(port), "--slots",
                               str(args.slots), "--max-len", "256", "--side-capacity", str(args.side_capacity),
                               *args.serve_args.split(),
                               *[f"--side={n}={p}" for n, p in paths.items()]],
                              cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=log,
                              stderr=subprocess.STDOUT)
    records = []
    try:
        deadline = time.time() + 600
        while True:
            try:
                if httpx.get(f"{url}/ready", timeout=1).status_code == 200:  # compiled: /health answers before
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline or server.poll() is not None:
                raise RuntimeError((work / "server.log").read_text())
            time.sleep(0.5)
        texts = prompts(args.requests)
        rng = random.Random(0)
        mixes = {}
        for k in counts:
            names = [f"s{i}" for i in range(k)]
            weights = [1 / (i + 1) for i in range(k)] if args.skew else None
            mixes[k] = [(rng.choices(names, weights)[0], p) for p in texts]
        if registered > max(counts):
            names = [f"s{i}" for i in range(registered)]
            zipf = rng.sample(names, len(names))  # which side networks are popular: not the first loaded
            mixes[f"{registered} registered, Zipf"] = [(rng.choices(zipf, [1 / (i + 1) for i in range(registered)])[0],
                                                        p) for p in texts]
            mixes[f"{registered} registered, uniform"] = [(rng.choice(names), p) for p in texts]
        reference_jobs = sorted({job for jobs in mixes.values() for job in jobs})
        seq_jobs = reference_jobs[: args.sequential_requests]
        alone_run = lambda: asyncio.run(load(url, seq_jobs, args.max_tokens, 1, 0.0))  # noqa: E731
        record, results = measured(url, "one at a time", alone_run, None)
        records.append(record)
        reference = {(r["model"], r["prompt"]): r["text"] for r in results}
        rest, _ = asyncio.run(load(url, [j for j in reference_jobs if j not in reference], args.max_tokens,
                                   args.concurrency, 0.0))
        reference.update({(r["model"], r["prompt"]): r["text"] for r in rest})  # checked against the alone runs
        alone = {(r["model"], r["prompt"]): r["text"] for r in results}
        for k in mixes:
            name = k if isinstance(k, str) else f"{k} side networks"
            record, results = measured(url, name, lambda: asyncio.run(
                load(url, mixes[k], args.max_tokens, args.concurrency, args.request_rate)), reference)
            record["mixed_vs_alone"] = sum(1 for r in results if (r["model"], r["prompt"]) in alone and
                                           alone[(r["model"], r["prompt"])] != r["text"])
            records.append(record)
        values = server_metrics(url)
        records[-1]["host_bytes_per_side"] = values["qst_side_networks_host_bytes"] / registered
        if not args.no_static:
            records.append(static_batch(paths, mixes[counts[0]], args))
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)
    for r in records:
        line = json.dumps({k: v for k, v in r.items()})
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")
    print_table(records)
    return records


def static_batch(paths: dict[str, str], jobs: list[tuple[str, str]], args) -> dict:
    """The same requests as one `qst-generate --file` run (a static batch of --slots rows)."""
    work = pathlib.Path(tempfile.mkdtemp(prefix="qst-static-"))
    used = sorted({side for side, _ in jobs})
    one = len(used) == 1  # one --side: records name no side
    (work / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p} if one else {"prompt": p, "side": s}) + "\n"
                                                for s, p in jobs))
    command = [sys.executable, "-m", "qst_jax.cli.generate", "--model", "smollm2", "--file",
               str(work / "prompts.jsonl"), "--max-new-tokens", str(args.max_tokens), "--batch-size",
               str(args.slots), *[a for s in used for a in ("--side", paths[s])]]
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True,
                          text=True)
    wall = time.perf_counter() - start
    ok = proc.returncode == 0
    return {"row": "qst-generate --file (static, incl. load and compile)", "requests": len(jobs), "wall_s": wall,
            "req_per_s": len(jobs) / wall, "ok": ok, "error": None if ok else proc.stderr[-300:]}


def print_table(records: list[dict]) -> None:
    print(f"\n{'row':<52} {'req/s':>6} {'out tok/s':>9} {'TTFT p50':>8} {'p99':>6} {'TPOT p50':>8} {'ITL p50':>7} "
          f"{'E2E p50':>7} {'mixed':>5} {'prefills':>8} {'side loads':>10}")
    for r in records:
        if "ttft" not in r:
            print(f"{r['row']:<52} {r['req_per_s']:>6.2f}  (wall {r['wall_s']:.1f} s{', failed' if not r['ok'] else ''})")
            continue
        print(f"{r['row']:<52} {r['req_per_s']:>6.2f} {r['out_tok_per_s']:>9.1f} {r['ttft']['p50']:>8.3f} "
              f"{r['ttft']['p99']:>6.3f} {r['tpot']['p50']:>8.3f} {(r['itl']['p50'] or 0):>7.3f} "
              f"{r['e2e']['p50']:>7.3f} {r['mixed']:>5} {r.get('prefill_calls', ''):>8} "
              f"{r.get('side_device_loads', ''):>10}")


if __name__ == "__main__":
    main()
