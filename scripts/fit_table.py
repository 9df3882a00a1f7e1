"""Which run fits which GPU or TPU: every recipe in configs/ and the benchmark shapes, compiled for each target.

    python scripts/fit_table.py [--targets t4,l4,rtx4090,...,h200] [--out runs/fit.jsonl]

Each recipe is planned as `qst-train --config configs/R.py --plan T` plans it
(`train/plan.py`: the run's own step, micro-batches and optimizer, from the
model's config alone); a recipe whose `model.path` names no local model gets
the LLaMA-2 shape it was written for (`RECIPE_SHAPES`). The benchmark shapes
are `scripts/compile_for_gpu.py`'s programs at B16 x T512. Targets of one
GPU architecture compile to the same program (A100 40/80 GB, H100/H200), so
each architecture is compiled once and its peak compared with every target of
it. Prints one JSON line per compile, then a markdown table: peak GiB and
whether it fits, per target (a recipe streaming its backbone from host memory,
`model.offload`, is judged on its device peak; its pinned host RAM is shown
beside it). Compile-only figures (XLA's buffer assignment,
no autotuning, about +-20%), never measurements. Multi-device recipes
(`parallel.*` > 1) are listed with a pointer to `scripts/memory_plan.py`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
REPO = pathlib.Path(__file__).parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from compile_for_gpu import program  # noqa: E402

from qst_jax.aot.compile import compile_report  # noqa: E402
from qst_jax.aot.targets import TARGETS, target  # noqa: E402
from qst_jax.models.random_init import llama2_config  # noqa: E402
from qst_jax.train.plan import plan_run  # noqa: E402

# The shape each recipe was written for, where its model.path is not a local model here.
RECIPE_SHAPES = {"instruct_7b": "llama2-7b", "glue_sst2": "", "default": "", "qlora_default": ""}
BENCHMARKS = [("7b", "qst"), ("7b", "qst:maxpool"), ("7b", "qlora"), ("7b", "sweep:8"),
              ("70b", "qst"), ("70b", "qst:maxpool"), ("70b", "qlora")]
# What the peers measured on one H100 at B16 x T512 (shared/docs/anchors.md), GiB.
PEERS = {"7b": "torch QST 14.5, HF QLoRA 11.0", "70b": "torch QST 74.4, HF QLoRA 60.6"}


def _recipe(name: str):
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    if not config.model.shape and RECIPE_SHAPES.get(name):
        config.model.shape = RECIPE_SHAPES[name]
    return config


def architectures(names: list[str]) -> dict[str, list[str]]:
    """Targets grouped by compute capability (a TPU: by generation), the largest memory first.

    XLA's GPU compiler sees the device memory only when a program does not
    fit (it then rematerializes to try), so one compile serves every target
    of an architecture that holds its peak; a smaller one it exceeds is
    compiled on its own (`_compiled`).
    """
    groups: dict[str, list[str]] = {}
    for name in sorted(names, key=lambda n: -target(n).memory_bytes):
        t = target(name)
        key = t.generation if t.platform == "tpu" else "sm_{}{}".format(*t.compute_capability)
        groups.setdefault(key, []).append(name)
    return groups


def _compiled(row: dict, members: list[str], compile_one):
    """Rows for one program over one architecture's targets: compiled for the largest, again where it exceeds one."""
    done: dict | None = None
    for name in members:
        if done is not None and "error" not in done and done["peak_bytes"] <= target(name).memory_bytes:
            done["targets"].append(name)
            continue
        if done is not None:
            yield done
        done = {**row, "arch": row["arch"], "targets": [name]}
        try:
            done.update(compile_one(name))
        except Exception as err:  # noqa: BLE001 - a refusal is a row of the table, not the end
            done["error"] = str(err).splitlines()[0][:200]
    if done is not None:
        yield done


def rows(targets: list[str], only: list[str] = ()):
    """One record per compile (recipes, then benchmark shapes); `only`: rows whose name contains one of these."""
    groups = architectures(targets)
    for path in sorted((REPO / "configs").glob("*.py")):
        name = path.stem
        if only and not any(o in name for o in only):
            continue
        config = _recipe(name)
        p = config.parallel
        if p.data * p.fsdp * p.tensor != 1:
            yield {"row": f"configs/{name}.py", "mesh": f"data {p.data} x fsdp {p.fsdp} x tensor {p.tensor}"}
            continue

        def plan(t, config=config):
            report, notes = plan_run(config, t, cost=False)
            return {"peak_bytes": report.peak_bytes, "host_bytes": report.host_bytes, "compile_s": report.compile_s,
                    "notes": notes}

        for arch, members in groups.items():
            yield from _compiled({"row": f"configs/{name}.py", "arch": arch}, members, plan)
    for shape, spec in BENCHMARKS:
        if only and not any(o in f"{shape} {spec}" for o in only):
            continue
        layers = llama2_config(shape).num_layers

        def bench(t, shape=shape, spec=spec, layers=layers):
            dtype = "bfloat16" if target(t).has_bf16 else "float16"
            report = compile_report(t, program(spec, shape, 16, 512, t), layers=layers, cost=False, dtype=dtype)
            return {"peak_bytes": report.peak_bytes, "compile_s": report.compile_s}

        for arch, members in groups.items():
            yield from _compiled({"row": f"{shape} {spec} B16xT512", "arch": arch}, members, bench)


def table(records: list[dict], targets: list[str]) -> str:
    head = "| run | " + " | ".join(f"{t} ({target(t).memory_bytes / 2**30:.0f} GiB)" for t in targets) + " |"
    lines = [head, "|---|" + "---|" * len(targets)]
    by_row: dict[str, dict[str, str]] = {}
    for r in records:
        cells = by_row.setdefault(r["row"], {})
        if "mesh" in r:
            cells.update({t: f"mesh ({r['mesh']}): memory_plan.py" for t in targets})
            continue
        for t in r["targets"]:
            if "error" in r:
                cells[t] = "refused (out of memory)" if "memory" in r["error"].lower() else f"refused: {r['error'][:60]}"
            else:
                gib = r["peak_bytes"] / 2**30
                host = f" (+{r['host_bytes'] / 2**30:.2f} host)" if r.get("host_bytes") else ""
                cells[t] = f"{gib:.2f}{host} {'fits' if r['peak_bytes'] <= target(t).memory_bytes else '**no**'}"
    for row, cells in by_row.items():
        lines.append(f"| {row} | " + " | ".join(cells.get(t, "") for t in targets) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--out", help="append JSON lines here")
    parser.add_argument("--only", default="", help="comma-separated: rows whose recipe or program contains one")
    args = parser.parse_args(argv)
    targets = args.targets.split(",")
    records = []
    for row in rows(targets, [o for o in args.only.split(",") if o]):
        records.append(row)
        line = json.dumps(row)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")
    print()
    print(table(records, targets))
    for shape, peers in PEERS.items():
        print(f"peers at {shape} B16xT512 (measured, one H100): {peers}")
    return records


if __name__ == "__main__":
    main()
