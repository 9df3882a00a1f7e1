"""`qst-eval`: perplexity, GLUE-style classification, MMLU-style multiple choice.

    qst-eval perplexity --model smollm2 [--side runs/default] --data hamlet.txt [--seq-len N]
    qst-eval classify   --model M --side D --task sst2 --data dev.tsv
    qst-eval mmlu       --model M [--side D] --data /path/to/mmlu [--shots 5]
    qst-eval perplexity --model M --side A --side B ... --data D   # several: one backbone pass, a row each
    qst-eval perplexity --model M --offload weights --data D        # the layers streamed from host memory

Prints a table and writes the results as JSON (`--out`, default stdout only).
`--seq-len` defaults to the run's `data.seq_len` with `--side` (so perplexity
reproduces the figure training printed), else 128 (2048 for mmlu).

Several `--side` (QST exports, e.g. a sweep's `members/*`) are evaluated
together: one backbone pass per batch feeds every side network; the table
has a row per side network (named by its folder) and, for perplexity and
mmlu, one for the frozen backbone.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from qst_jax.errors import InputError, QSTError
from qst_jax.cli.common import add_model_args, load_model, use_compile_cache
from qst_jax.models.loops import streaming_options


def _perplexity(args, backbone, tokenizer, model, params, info) -> dict:
    from qst_jax.data.examples import lm_windows, pad_id
    from qst_jax.data.sources import load_records
    from qst_jax.data.specs import resolve_data
    from qst_jax.eval.tasks import make_eval_step, perplexity

    examples = lm_windows(load_records(resolve_data(args.data, args.holdout)), tokenizer, args.seq_len,
                          args.text_column, "--data")
    if args.max_windows:
        examples.tokens, examples.loss_masks = examples.tokens[: args.max_windows], examples.loss_masks[: args.max_windows]
    if len(args.side) > 1:
        from qst_jax.eval.tasks import make_sides_eval_step, split_members

        if model.task != "lm":
            raise InputError("perplexity needs LM side networks; these were trained for classification")
        result = perplexity(make_sides_eval_step(model, include_base=True,
                                                 compiler_options=streaming_options(args.offload)),
                            params, backbone.params, examples,
                            batch_size=args.batch_size, pad_token=pad_id(tokenizer))
        return split_members(result, ["frozen", *info])
    return perplexity(make_eval_step(model, streaming_options(args.offload)), params, backbone.params, examples,
                      batch_size=args.batch_size, pad_token=pad_id(tokenizer))


def _classify(args, backbone, tokenizer, model, params, info) -> dict:
    import jax

    from qst_jax.eval.glue import GLUE_TASKS, GlueTask
    from qst_jax.eval.tasks import classify

    if model.task != "classification":
        raise InputError("classify needs a side network trained with task=classification (--side)")
    task = GLUE_TASKS.get(args.task)
    if task is None:
        labels = tuple(str(i) for i in range(model.num_labels))
        task = GlueTask(args.task, args.text_column, args.text_pair_column, args.label_column, labels, ("accuracy",))
    logits = jax.jit(lambda bp, ids, mask: model.logits(params, bp, ids, mask),
                     compiler_options=streaming_options(args.offload))
    fn = lambda ids, mask: logits(backbone.params, ids, mask)  # noqa: E731 (the backbone an argument, not a constant)
    several = len(args.side) > 1
    result = classify(fn, tokenizer, task, args.data, seq_len=args.seq_len, batch_size=args.batch_size,
                      members=several)
    return dict(zip(info, result)) if several else result


def _mmlu(args, backbone, tokenizer, model, params, info) -> dict:
    import jax

    from qst_jax.eval.tasks import mmlu

    several = len(args.side) > 1
    if model.task != "lm":
        raise InputError("mmlu needs LM side networks; these were trained for classification")
    options = streaming_options(args.offload)
    if several:
        last = jax.jit(lambda bp, ids, mask: model.logits(params, bp, ids, mask, last_only=True)[:, :, -1],
                       compiler_options=options)
    else:
        last = jax.jit(lambda bp, ids, mask: model.logits(params, bp, ids, mask)[:, -1], compiler_options=options)
    fn = lambda ids, mask: last(backbone.params, ids, mask)  # noqa: E731
    subjects = args.subjects.split(",") if args.subjects else None
    result = mmlu(fn, tokenizer, args.data, shots=args.shots, max_len=args.seq_len, subjects=subjects,
                  batch_size=args.batch_size, members=several)
    return dict(zip(["frozen", *info], result)) if several else result


def _print_rows(kind: str, rows: dict[str, dict]) -> None:
    """One row per side network (several --side)."""
    if kind == "mmlu":
        rows = {n: {"average": r["average"], "questions": r["questions"]} for n, r in rows.items()}
    keys = [k for k, v in next(iter(rows.values())).items() if isinstance(v, float | int) and k != "examples"]
    width = max(len(n) for n in [*rows, "side"])
    print(f"{'side':<{width}}  " + "  ".join(f"{k:>12}" for k in keys))
    for name, r in rows.items():
        print(f"{name:<{width}}  " + "  ".join(f"{r[k]:>12.4f}" if isinstance(r[k], float) else f"{r[k]:>12}"
                                                for k in keys))


def _print(kind: str, result: dict) -> None:
    if kind == "mmlu":
        width = max(len(s) for s in result["subjects"])
        for subject, acc in sorted(result["subjects"].items()):
            print(f"{subject:<{width}}  {acc:.4f}")
        print(f"{'average':<{width}}  {result['average']:.4f}  ({result['questions']} questions, {result['shots']}-shot)")
        return
    for key, value in result.items():
        print(f"{key:<12} {value:.4f}" if isinstance(value, float) else f"{key:<12} {value}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qst-eval", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="kind", required=True)
    for kind in ("perplexity", "classify", "mmlu"):
        p = sub.add_parser(kind)
        add_model_args(p, offload=True)
        p.add_argument("--data", required=True)
        p.add_argument("--out", help="write the results as JSON here")
        p.add_argument("--batch-size", type=int, default=8)
        p.add_argument("--seq-len", type=int, default=None,
                       help="default: the run's data.seq_len with --side, else " + ("2048" if kind == "mmlu" else "128"))
        if kind == "perplexity":
            p.add_argument("--text-column", default="text")
            p.add_argument("--max-windows", type=int, default=0)
            p.add_argument("--holdout", default="hamlet", help="for shakespeare:heldout")
        if kind == "classify":
            p.add_argument("--task", required=True, help="cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, or a name")
            p.add_argument("--text-column", default="sentence")
            p.add_argument("--text-pair-column", default=None)
            p.add_argument("--label-column", default="label")
        if kind == "mmlu":
            p.add_argument("--shots", type=int, default=5)
            p.add_argument("--subjects", default="")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    use_compile_cache(not args.no_compile_cache)
    try:
        if args.batch_size < 1:
            raise InputError(f"--batch-size {args.batch_size}: must be at least 1")
        if args.out and not os.path.isdir(folder := os.path.dirname(os.path.abspath(args.out))):
            raise InputError(f"--out {args.out}: {folder} is not a folder")
        if args.seq_len is not None and args.seq_len < 2:
            raise InputError(f"--seq-len {args.seq_len}: at least 2 (a window scores the tokens after its first)")
        loaded = load_model(args)
        context = loaded[0].cfg.max_position_embeddings
        if args.seq_len is None:
            info = loaded[-1] if len(args.side) < 2 else next(iter(loaded[-1].values()))
            args.seq_len = min(2048, context) if args.kind == "mmlu" else int(info.get("seq_len") or min(128, context))
        if args.seq_len > context:
            raise InputError(f"--seq-len {args.seq_len}: exceeds the model's context of {context} positions")
        result = {"perplexity": _perplexity, "classify": _classify, "mmlu": _mmlu}[args.kind](args, *loaded)
    except (QSTError, OSError, ValueError) as err:  # ValueError, OSError: what a tokenizer or a file read raises
        print(f"qst-eval: error: {err}", file=sys.stderr)
        return 1
    (_print_rows if len(args.side) > 1 else _print)(args.kind, result)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
