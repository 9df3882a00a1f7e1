"""How well each method learns, at equal steps and at equal wall-clock (issue: QST vs QLoRA quality).

    python benchmarks/studies/quality.py [--steps 250] [--batch 16] [--only qst-new,qlora] [--lm-steps 50]

SST-2 (the repo's `data/glue/sst2/`): trains on a fixed random slice of the
train split with `configs/glue_sst2.py`'s recipe otherwise, and scores the
whole dev split, never trained on. Shakespeare (`configs/default.py`): trains
on the packaged plays and scores held-out Hamlet. Every variant runs on the
packaged SmolLM2-135M-Instruct (NF4), loaded once. Prints one table per task:
trainable parameters, step time (after the first, compiling step), held-out
metric, mean train loss (and accuracy) over the last 50 steps; then QLoRA
re-run for the number of steps that fits in QST's wall-clock time.
Results also go to `--out` as JSON.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import pathlib
import random
import sys

REPO = pathlib.Path(__file__).parents[2]
sys.path.insert(0, str(REPO / "benchmarks" / "studies"))

# name -> (method, overrides of the recipe, whose QST defaults are the new ones: residual mix, wide heads, SST-2 lr
# 2e-3): the variants measured. "qst-old" is the official layout and the old default (gated mix, the backbone's head
# count, the authors' lr 4e-4); QLoRA keeps the authors' lr 4e-4 (the reference run).
SST2_VARIANTS = {
    "probe": ("frozen", {"optim.lr": 4e-4}),
    "probe-lr1e-2": ("frozen", {"optim.lr": 1e-2}),
    "qst-old": ("qst", {"side.output_mix": "gated", "side.head_layout": "official", "optim.lr": 4e-4}),
    "qst-residual": ("qst", {"side.head_layout": "official", "optim.lr": 4e-4}),
    "qst-residual-lr2e-3": ("qst", {"side.head_layout": "official"}),
    "qst-residual-1head-lr2e-3": ("qst", {}),
    "qst-residual-1head-lr5e-3": ("qst", {"optim.lr": 5e-3}),
    "qst-gated-1head-lr2e-3": ("qst", {"side.output_mix": "gated"}),
    "qst-new": ("qst", {}),
    "qst-input-norm": ("qst", {"side.input_norm": "backbone"}),
    "qst-pool-mean": ("qst", {"data.pool": "mean"}),
    "qst-pool-mean-gate2": ("qst", {"data.pool": "mean", "side.gate_init": 2.0}),
    "qst-fan-in-lr1e-3": ("qst", {"side.init_scheme": "fan_in", "optim.lr": 1e-3}),
    "qst-official": ("qst", {"side.head_layout": "official"}),
    "qst-pruned-official": ("qst", {"side.head_layout": "official", "pruned": True}),
    # + linear downsamplers that start by picking the pruned dims of each h_i
    "qst-pruned-select": ("qst", {"side.head_layout": "official", "side.downsampler": "linear", "pruned": True}),
    "qst-head-lr1e-2": ("qst", {"optim.readout_lr": 1e-2}),
    "qst-gate-lr2e-2": ("qst", {"optim.gate_lr": 2e-2}),
    # what the backward keeps (issue 23): the old default (bf16 states, no side remat) against the lean one
    # (fp8 states, side remat), each over init seeds 0-2
    **{f"qst-{store}-s{seed}": ("qst", {"side.hidden_store": store, "side.remat": store == "fp8", "train.seed": seed})
       for store in ("compute", "fp8") for seed in range(3)},
    "qlora": ("qlora", {"optim.lr": 4e-4}),
    "qlora-last3": ("qlora", {"optim.lr": 4e-4, "lora_last_layers": 3}),  # LoRA in the last 3 layers only
}
LM_VARIANTS = {
    "qst-old": ("qst", {"side.output_mix": "gated", "side.head_layout": "official"}),
    "qst-new": ("qst", {}),
    "qst-official": ("qst", {"side.head_layout": "official"}),
    "qst-pruned-official": ("qst", {"side.head_layout": "official", "pruned": True}),
    "qst-pruned-select": ("qst", {"side.head_layout": "official", "side.downsampler": "linear", "pruned": True}),
    "qlora": ("qlora", {}),
    # LoRA updates only in the backbone's last n layers (B stays zero below): how deep must adaptation reach?
    "qlora-last1": ("qlora", {"lora_last_layers": 1}),
    "qlora-last3": ("qlora", {"lora_last_layers": 3}),
    "qlora-last10": ("qlora", {"lora_last_layers": 10}),
}


def _load_recipe(name: str):
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def sst2_slice(rows: int, path: str, seed: int = 0) -> str:
    """A fixed random `rows`-row slice of SST-2 train, written as a GLUE TSV."""
    with open(REPO / "data" / "glue" / "sst2" / "train.tsv", newline="", encoding="utf-8") as f:
        lines = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    header, body = lines[0], lines[1:]
    random.Random(seed).shuffle(body)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\")
        writer.writerows([header, *body[:rows]])
    return path


def _last_window(metrics_path: str, steps: int) -> dict[str, float]:
    """Mean train loss (and accuracy) over the last `steps` steps, from the run's window records."""
    records = [json.loads(line) for line in open(metrics_path)]
    train = [r for r in records if r["split"] == "train"]
    picked, count = [], 0
    for r in reversed(train):
        if count >= steps:
            break
        picked.append(r)
        count += r["steps"]
    loss = sum(r["loss"] * r["steps"] for r in picked) / max(sum(r["steps"] for r in picked), 1)
    result = {"train_loss": loss}
    if "correct" in picked[0]:
        result["train_accuracy"] = sum(r["correct"] for r in picked) / max(sum(r["weight"] for r in picked), 1)
    return result


def _pruned_init(ctx, spec, state):
    """The Trainer's `init` hook: side blocks start pruned from the backbone's (benchmarks/studies/side_prune.py)."""
    import dataclasses

    from side_prune import dense_weights, pruned_dims, pruned_side_layers, selecting_downsamplers

    backbone, side = ctx.backbone, spec.model.side
    weights = dense_weights(backbone.params)  # dequantized once, for both
    layers, final = pruned_side_layers(backbone.params, backbone.cfg, side, weights)
    params = {**state.params, "layers": layers, "norm": final}
    if side.downsampler == "linear":  # D_i picks the pruned dims: the side stream starts as h_i's
        dims = pruned_dims(backbone.params, final["scale"].shape[0], weights)
        params["down"] = selecting_downsamplers(dims, backbone.cfg.num_layers, backbone.cfg.hidden_size)
    return dataclasses.replace(state, params=params, opt_state=spec.tx.init(params))


def _only_last_layers(count: int):
    """An optax transformation that zeroes the LoRA updates of every layer but the last `count`.

    LoRA's B starts at zero, so the layers below keep the frozen backbone's
    weights: LoRA on the last `count` layers only (the rest still runs and
    is backpropagated through).
    """
    import jax
    import jax.numpy as jnp
    import optax

    from qst_jax.tree import path_names

    def update(updates, state, params=None):
        def keep(path, u):
            if "lora" not in path_names(path):
                return u
            layers = u.shape[0]
            mask = (jnp.arange(layers) >= layers - count).astype(u.dtype)
            return u * mask.reshape((-1,) + (1,) * (u.ndim - 1))

        return jax.tree_util.tree_map_with_path(keep, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def run_variant(task: str, name: str, method: str, overrides: dict, steps: int, batch: int, out_dir: str,
                shared: dict, train_file: str | None) -> dict:
    from qst_jax.train.trainer import Trainer

    config = _load_recipe("glue_sst2" if task == "sst2" else "default")
    config.method = method
    config.train.steps = steps
    config.train.batch_size = batch
    config.train.eval_every = config.train.checkpoint_every = 0
    config.train.eval_batch_size = 32
    config.train.eval_at_start = task != "sst2"  # the frozen perplexity is part of the LM table
    config.train.log_every = 10
    config.train.output_dir = os.path.join(out_dir, task, name)
    if task == "sst2":
        config.data.train = train_file
    else:
        config.data.eval_examples = 32
    for key, value in overrides.items():
        if "." in key:
            section, field = key.split(".")
            config[section][field] = value
    tx = schedule = None
    if overrides.get("lora_last_layers"):
        import optax

        from qst_jax.train.optim import make_optimizer

        tx, schedule = make_optimizer(config.optim, steps)
        tx = optax.chain(tx, _only_last_layers(overrides["lora_last_layers"]))
    trainer = Trainer(config, tx=tx, schedule=schedule, backbone=shared.get("backbone"),
                      tokenizer=shared.get("tokenizer"), overwrite=True, log=lambda *a: None,
                      init=_pruned_init if overrides.get("pruned") else None)
    shared.update(backbone=trainer.backbone, tokenizer=trainer.tokenizer)
    summary = trainer.run()
    row = {"task": task, "variant": name, "method": method, "steps": steps, "params": summary["trainable_params"],
           "step_s": summary.get("step_seconds", float("nan")),
           **_last_window(os.path.join(config.train.output_dir, "metrics.jsonl"), 50)}
    after = summary["eval_after"]
    row["held_out"] = after["accuracy"] if task == "sst2" else after["perplexity"]
    if task != "sst2":
        row["frozen"] = summary["eval_frozen"]["perplexity"]
    print(json.dumps(row), flush=True)
    return row


def _equal_time_qlora(rows: list[dict], task: str, steps: int, batch: int, out_dir: str, shared: dict,
                      train_file: str | None) -> list[dict]:
    """QLoRA re-run for as many steps as fit in the new QST default's wall-clock time (its measured step times)."""
    by_name = {r["variant"]: r for r in rows if r["task"] == task}
    if not {"qst-new", "qlora"} <= set(by_name):
        return []
    budget = steps * by_name["qst-new"]["step_s"]
    qlora_steps = max(int(budget / by_name["qlora"]["step_s"]), 1)
    variants = SST2_VARIANTS if task == "sst2" else LM_VARIANTS
    return [run_variant(task, "qlora-equal-time", *variants["qlora"], qlora_steps, batch, out_dir, shared,
                        train_file)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=250, help="SST-2 steps (0: skip SST-2)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--train-rows", type=int, default=8000)
    parser.add_argument("--lm-steps", type=int, default=50, help="Shakespeare steps (0: skip)")
    parser.add_argument("--only", default="", help="comma-separated variant names")
    parser.add_argument("--no-wallclock", action="store_true", help="skip the equal-wall-clock QLoRA run")
    parser.add_argument("--output", default="runs/quality")
    parser.add_argument("--out", default="runs/quality/results.json")
    args = parser.parse_args()
    only = {v for v in args.only.split(",") if v}
    os.makedirs(args.output, exist_ok=True)
    train_file = sst2_slice(args.train_rows, os.path.join(args.output, "sst2_train_slice.tsv"))
    shared: dict = {}
    rows = []
    for name, (method, overrides) in SST2_VARIANTS.items():
        if args.steps and (not only or name in only):
            rows.append(run_variant("sst2", name, method, overrides, args.steps, args.batch, args.output, shared,
                                    train_file))
    if not args.no_wallclock:
        rows += _equal_time_qlora(rows, "sst2", args.steps, args.batch, args.output, shared, train_file)
    if args.lm_steps:
        for name, (method, overrides) in LM_VARIANTS.items():
            if not only or name in only:
                rows.append(run_variant("lm", name, method, overrides, args.lm_steps, 4, args.output, shared, None))
        if not args.no_wallclock:
            rows += _equal_time_qlora(rows, "lm", args.lm_steps, 4, args.output, shared, None)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=2)
    print(f"\n{'task':<6} {'variant':<28} {'steps':>5} {'trainable':>10} {'step s':>7} {'held-out':>9} "
          f"{'train loss':>10} {'train acc':>9}")
    for r in rows:
        metric = f"{100 * r['held_out']:.1f}%" if r["task"] == "sst2" else f"ppl {r['held_out']:.2f}"
        acc = f"{100 * r['train_accuracy']:.1f}%" if "train_accuracy" in r else "-"
        print(f"{r['task']:<6} {r['variant']:<28} {r['steps']:>5} {r['params']:>10,} {r['step_s']:>7.3f} "
              f"{metric:>9} {r['train_loss']:>10.3f} {acc:>9}")


if __name__ == "__main__":
    main()
