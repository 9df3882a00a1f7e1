"""`qst-serve`: one frozen backbone serving many QST side networks behind an OpenAI-compatible API.

    qst-serve                                              # the packaged SmolLM2 on 127.0.0.1:8000
    qst-serve --model smollm2 --side poet=runs/a --side runs/b --port 8000
    qst-serve --side-root runs --api-key "$KEY"            # POST /v1/load_side may read under runs/

`model` in a request picks the side network (`GET /v1/models`: the base model
by `--model-name`, each side by its name: NAME=PATH, or the folder's name).
Continuous batching over `--slots` decode slots, one backbone pass per token
for all of them (`qst_jax/generate/engine.py`); SIGTERM lets running requests
finish for `--drain-timeout` seconds, then exits. README's "Serving" shows
curl and the `openai` client.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys
from qst_jax.cli.common import add_compile_cache_arg, use_compile_cache
from qst_jax.errors import InputError, QSTError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qst-serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2",
                        help="HF dir, bnb NF4 dir, .gguf file, 'smollm2', or a Hub repo org/name (org/name:file.gguf)")
    parser.add_argument("--revision", default=None, help="the Hub repo's branch, tag or commit (default: main)")
    parser.add_argument("--model-name", help="the base model's `model` name (default: the model's folder name)")
    parser.add_argument("--side", action="append", default=[], help="NAME=PATH or PATH of a QST export (repeatable)")
    parser.add_argument("--adapter", help="serve one QLoRA export or PEFT LoRA adapter (a folder or a Hub repo "
                                          "org/name) as the model, in every slot (not with --side)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--slots", type=int, default=8, help="decode slots (requests decoded together)")
    parser.add_argument("--prefill-rows", type=int, default=0,
                        help="requests prefilled together (default: --slots, so a full wave is one prefill)")
    parser.add_argument("--admit-wait-ms", type=float, default=None,
                        help="admit a burst once no request has arrived for this long (at most 5x), so it is "
                             "prefilled together (0: at once; default 5%% of a prefill call, 2-50 ms)")
    parser.add_argument("--max-len", type=int, default=1024, help="tokens per slot: prompt and completion")
    parser.add_argument("--side-capacity", type=int, default=64, help="side networks per shape held on the device")
    parser.add_argument("--max-queue", type=int, default=256, help="requests that may wait; more get 429")
    parser.add_argument("--api-key", default=os.environ.get("QST_API_KEY"),
                        help="require Authorization: Bearer KEY on every route but /health (or $QST_API_KEY)")
    parser.add_argument("--side-root", help="folder POST /v1/load_side may load from (default: load_side is off)")
    parser.add_argument("--hub-sides", action="store_true",
                        help="POST /v1/load_side may pull {\"hub\": \"org/name\"} from the Hugging Face Hub")
    parser.add_argument("--drain-timeout", type=float, default=30.0, help="seconds SIGTERM waits for running requests")
    parser.add_argument("--max-body-mb", type=float, default=16.0, help="the largest request body taken (413 beyond)")
    parser.add_argument("--no-quantize", action="store_true", help="keep the backbone dense instead of NF4")
    parser.add_argument("--dtype", default="bfloat16")
    add_compile_cache_arg(parser)
    return parser


def side_args(values: list[str]) -> dict[str, str]:
    """`{name: path}` of `--side NAME=PATH` / `--side PATH` (the folder's name)."""
    sides: dict[str, str] = {}
    for value in values:
        name, path = value.split("=", 1) if "=" in value and not os.path.exists(value) else (None, value)
        name = name or os.path.basename(os.path.normpath(path))
        if name in sides:
            raise InputError(f"--side {value}: the name {name!r} is given twice; write NAME=PATH")
        sides[name] = path
    return sides


def build_server(args: argparse.Namespace, log=print):
    import jax.numpy as jnp

    from qst_jax.data.specs import resolve_model_path
    from qst_jax.generate.engine import Engine
    from qst_jax.generate.side_store import SideStore
    from qst_jax.methods import load_tuned
    from qst_jax.models import load_backbone, load_tokenizer
    from qst_jax.models.hub import resolve_model
    from qst_jax.serve.app import Server

    path = resolve_model(resolve_model_path(args.model), args.revision)
    if args.max_body_mb <= 0:
        raise InputError(f"--max-body-mb {args.max_body_mb:g}: must be more than 0")
    if args.adapter and args.side:
        raise InputError("--adapter serves one LoRA adapter in every slot; give it without --side")
    backbone = load_backbone(path, quantize=not args.no_quantize, dtype=jnp.dtype(args.dtype))
    tokenizer = load_tokenizer(path)
    fixed = {}
    if args.adapter:
        model, params, _ = load_tuned(args.adapter, backbone)
        if model.name != "qlora" or model.task != "lm":
            raise InputError(f"--adapter {args.adapter}: holds a {model.name} {model.task} model; --adapter serves "
                             "a QLoRA or PEFT LoRA language model (QST side networks: --side)")
        fixed = {"model": model, "params": params}
    sides, paths = {}, {}
    for name, side_path in side_args(args.side).items():
        model, params, _ = load_tuned(side_path, backbone)
        sides[name], paths[name] = (model, params), os.path.realpath(side_path)
    store = SideStore(backbone.cfg, sides, capacity=args.side_capacity, dtype=backbone.dtype)
    engine = Engine(backbone, tokenizer, slots=args.slots, max_len=min(args.max_len,
                                                                      backbone.cfg.max_position_embeddings),
                    sides=store, prefill_rows=args.prefill_rows or args.slots, **fixed)
    base = args.model_name or ("smollm2" if args.model == "smollm2" else os.path.basename(os.path.normpath(path)))
    if args.adapter and not args.model_name:
        base = os.path.basename(os.path.normpath(args.adapter))
    return Server(backbone, tokenizer, engine, base_name=base, side_paths=paths, side_root=args.side_root,
                  api_key=args.api_key, max_queue=args.max_queue, drain_timeout=args.drain_timeout,
                  admit_wait=None if args.admit_wait_ms is None else args.admit_wait_ms / 1000,
                  hub_sides=args.hub_sides, max_body_bytes=int(args.max_body_mb * 2**20))


class OneLineCancellation(logging.Filter):
    """Says a request cancelled at shutdown in one line, not uvicorn's traceback of `asyncio.CancelledError`.

    A SIGTERM whose running requests outlast the drain timeout has uvicorn
    cancel their tasks and log each with its traceback; the operator needs
    one line.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], asyncio.CancelledError):
            record.msg, record.args = ("qst-serve: a request still running at the end of the drain timeout was "
                                       f"cancelled ({record.exc_info[1] or 'shutdown'})"), ()
            record.exc_info = record.exc_text = None
        return True


def log_config() -> dict:
    """uvicorn's logging config with `OneLineCancellation` on its error handler."""
    import copy

    import uvicorn.config

    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config.setdefault("filters", {})["one_line_cancellation"] = {"()": OneLineCancellation}
    config["handlers"]["default"]["filters"] = ["one_line_cancellation"]
    return config


def port_in_use(host: str, port: int) -> str | None:
    """Why `host:port` cannot be served (the OS's reason), or None: checked before minutes of warm-up."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no obstacle
            probe.bind(address)
    except OSError as err:
        return err.strerror or str(err)
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import uvicorn

    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    busy = port_in_use(args.host, args.port)
    if busy:
        print(f"qst-serve: error: --port {args.port}: cannot serve on {args.host}:{args.port} ({busy}); stop what "
              "holds it or choose another --port", file=sys.stderr)
        return 1
    use_compile_cache(not args.no_compile_cache)  # a restart loads its programs instead of compiling them
    try:
        server = build_server(args, log)
    except (QSTError, OSError, ValueError) as err:  # ValueError, OSError: what a tokenizer or a file read raises
        print(f"qst-serve: error: {err}", file=sys.stderr)
        return 1
    sides = server.engine.sides.names() if server.engine.sides is not None else []
    names = ", ".join([server.base_name, *sides]) if len(sides) <= 8 else (
        f"{server.base_name} and {len(sides):,} side networks ({', '.join(sides[:4])}, ...)")
    log(f"qst-serve: {names} on http://{args.host}:{args.port} ({args.slots} slots, {server.engine.max_len} tokens "
        f"each{', API key required' if args.api_key else ''})")
    http = uvicorn.Server(uvicorn.Config(server.app(), host=args.host, port=args.port, log_level="warning",
                                         log_config=log_config(), timeout_graceful_shutdown=args.drain_timeout))
    server.on_warmup_failure = lambda: setattr(http, "should_exit", True)
    http.run()  # /health answers at once; the programs compile meanwhile (/ready says when they have)
    return 1 if server.status == "failed" else 0


if __name__ == "__main__":
    sys.exit(main())
