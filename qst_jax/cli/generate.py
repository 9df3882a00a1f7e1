"""`qst-generate`: text from a backbone, with or without a tuned side network.

    qst-generate --model smollm2 --prompt "The capital of France is"
    qst-generate --model smollm2 --side runs/default --chat
    qst-generate --model M --side D --file prompts.jsonl > completions.jsonl

`--prompt` streams the continuation; `--chat` keeps the conversation (type
/exit or end input to stop); `--file` reads jsonl records with `prompt` or
`messages` and writes each with a `completion`, `--batch-size` records
decoding together in the engine's slots (`generate/engine.py`, the one
`qst-serve` runs).

Several `--side` (QST exports) serve one file: each record names its side
network in a `"side"` field (the folder's name; absent or null: the base
model), and the slots decode together whatever side each holds, one backbone
pass per token:

    qst-generate --model M --side runs/a --side runs/b --file prompts.jsonl
    {"prompt": "...", "side": "a"}
"""

from __future__ import annotations

import argparse
import json
import sys

from qst_jax.errors import QSTError
from qst_jax.cli.common import add_model_args, load_model, use_compile_cache


def _stream(gen, prompt_ids, args, sampling) -> str:
    printed = [0]

    def on_token(_step: int, texts: list[str]) -> None:
        text = texts[0]
        sys.stdout.write(text[printed[0] :])
        sys.stdout.flush()
        printed[0] = len(text)

    ids = gen.generate_ids([prompt_ids], max_new_tokens=args.max_new_tokens, sampling=sampling, seed=args.seed,
                           stop_strings=args.stop, on_token=on_token)[0]
    sys.stdout.write("\n")
    return gen.tokenizer.decode(ids, skip_special_tokens=True)


def _records(path: str) -> list[tuple[int, dict]]:
    """(1-based line, record) of every non-blank line of a jsonl file; a bad line is named."""
    from qst_jax.generate.decode import GenerationError

    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError as err:
        raise GenerationError(f"{path}: not UTF-8 ({err.reason})") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise GenerationError(f"{path}:{number}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise GenerationError(f"{path}:{number}: a record must be a JSON object")
        records.append((number, record))
    return records


def _complete_file(gen, tokenizer, args, sampling) -> None:
    """Completes every record of `--file`, `--batch-size` at a time, printing each with its completion in order."""
    from qst_jax.generate.decode import GenerationError

    jobs = []
    for line_number, record in _records(args.file):
        if "messages" in record:
            if not isinstance(record["messages"], list) or not record["messages"]:
                raise GenerationError(f"{args.file}:{line_number}: 'messages' must be a non-empty list of "
                                      "{role, content}")
            try:
                prompt = gen.render_chat(record["messages"])
            except GenerationError as err:
                raise GenerationError(f"{args.file}:{line_number}: {err}") from None
        elif "prompt" in record:
            if not isinstance(record["prompt"], str) or not record["prompt"]:
                raise GenerationError(f"{args.file}:{line_number}: 'prompt' must be a non-empty string, not "
                                      f"{record['prompt']!r}")
            prompt = tokenizer(record["prompt"]).input_ids
        else:
            raise GenerationError(f"{args.file}:{line_number}: a record needs 'prompt' or 'messages'; "
                                  f"it has {sorted(record)}")
        side = record.get("side")
        if side is not None and not gen.side_names:
            have = f"one --side ({args.side[0]})" if args.side else "no --side (the base model)"
            raise GenerationError(
                f"{args.file}:{line_number}: the record's 'side' field names {side!r}, but this run has {have}: "
                "a 'side' field chooses among two or more --side folders (each named by its folder); give them, "
                "or drop the field")
        if side is not None and side not in gen.side_names:
            raise GenerationError(f"{args.file}:{line_number}: side {side!r} is not one of {gen.side_names} or "
                                  "null (the base model)")
        jobs.append((record, prompt, side))
    if not jobs:
        raise GenerationError(f"{args.file}: holds no records (one JSON object a line, with 'prompt' or 'messages')")
    # Every record is one request of the engine: `--batch-size` slots decode together, a finished record's slot
    # takes the next one at once (continuous batching), and the completions print in the file's order.
    texts = gen.generate([p for _, p, _ in jobs], max_new_tokens=args.max_new_tokens, sampling=sampling,
                         seed=args.seed, stop_strings=args.stop,
                         side=[s for _, _, s in jobs] if gen.side_names else None)
    for (record, _, _), text in zip(jobs, texts):
        print(json.dumps({**record, "completion": text}), flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qst-generate", description=__doc__.split("\n\n")[0])
    add_model_args(parser)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--prompt")
    mode.add_argument("--chat", action="store_true")
    mode.add_argument("--file")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--system", help="system message for --chat")
    parser.add_argument("--batch-size", type=int, default=8, help="decode slots: --file records decoded together")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    use_compile_cache(not args.no_compile_cache)

    from qst_jax.generate.decode import GenerationError, Generator
    from qst_jax.generate.sampling import SamplingConfig

    try:
        sampling = SamplingConfig(args.temperature, args.top_k, args.top_p)
        if len(args.side) > 1 and args.file is None:
            raise GenerationError("several --side serve --file records, each naming its side network in a 'side' "
                                  "field; --prompt and --chat take one --side")
        if "" in args.stop:
            raise GenerationError("--stop '': an empty stop string would end every completion before its first token")
        if args.batch_size < 1:
            raise GenerationError(f"--batch-size {args.batch_size} must be at least 1")
        backbone, tokenizer, model, params, info = load_model(args)
        note = lambda m: print(f"qst-generate: {m}", file=sys.stderr)  # noqa: E731
        if len(args.side) > 1:  # `model` is the sides' SideSet, `info` their records by name
            members = {name: (model.member(i), p) for i, (name, p) in enumerate(zip(info, model.unstack(params)))}
            gen = Generator(backbone, tokenizer, log=note, sides=members, slots=args.batch_size)
        else:
            gen = Generator(backbone, tokenizer, (model, params), log=note, slots=args.batch_size)
        if args.prompt is not None:
            _stream(gen, tokenizer(args.prompt).input_ids, args, sampling)
        elif args.chat:
            history = [{"role": "system", "content": args.system}] if args.system else []
            while True:
                try:
                    line = input("you> ")
                except EOFError:
                    break
                if line.strip() in ("/exit", "/quit"):
                    break
                history.append({"role": "user", "content": line})
                sys.stdout.write("model> ")
                reply = _stream(gen, gen.render_chat(history), args, sampling)
                history.append({"role": "assistant", "content": reply})
        else:
            _complete_file(gen, tokenizer, args, sampling)
    except (QSTError, OSError, ValueError) as err:  # ValueError, OSError: what a tokenizer or a file read raises
        print(f"qst-generate: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
