"""`qst-serve`'s FastAPI app: OpenAI routes over one engine, side networks loaded and unloaded live.

    server = Server(backbone, tokenizer, engine, base_name="smollm2", side_root="runs")
    app = server.app()          # uvicorn.run(app, host="127.0.0.1", port=8000)

Routes: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions`
(`model` picks the side network; the base model by its own name),
`POST /v1/load_side {name, path}`, `POST /v1/unload_side {name}`,
`GET /health` (liveness: answers from the start, `warming_up` while the
programs compile), `GET /ready` (readiness: 200 once requests are served,
503 before and while draining), `GET /metrics` (Prometheus), `GET /` (the
chat page). Requests that come during the warm-up wait in the queue.
Errors are OpenAI's error JSON: 400 naming the field, 401 without the API
key, 404 for an unknown model, 429 with `Retry-After` when the queue is full,
503 while draining.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from qst_jax.generate.decode import GenerationError, render_chat, unicode_text
from qst_jax.generate.engine import Engine, EngineError
from qst_jax.hub import HubError, is_repo_id
from qst_jax.methods import ExportError, load_tuned
from qst_jax.methods.export import side_directory
from qst_jax.serve import openai_api as api
from qst_jax.serve.metrics import ServeMetrics
from qst_jax.serve.runner import Draining, EngineRunner, QueueFull


class Server:
    """The engine behind the HTTP routes (see the module docstring).

    Args:
      backbone, tokenizer: the frozen model.
      engine: the decoding engine (its `sides` store holds the side networks).
      base_name: the `model` name of the backbone alone.
      side_paths: where each loaded side network came from (`/v1/models`' `root`).
      side_root: the folder `load_side` may read under (None: `load_side` is off for paths).
      hub_sides: `load_side` may pull `{"hub": "org/name"}` from the Hugging Face Hub.
      api_key: required as `Authorization: Bearer <key>` on every route but `/health`.
      max_queue, drain_timeout: queue bound (429 beyond it), seconds SIGTERM waits for running requests.
      admit_wait: seconds without a new arrival that end a burst (`EngineRunner`; None: 5% of a prefill).
      max_body_bytes: the largest request body taken (413 beyond it).

    Attributes:
      status: "warming_up" until `start`'s warm-up has compiled every program,
        then "ready"; "failed" if the warm-up raised.
    """

    def __init__(self, backbone: Any, tokenizer: Any, engine: Engine, *, base_name: str,
                 side_paths: dict[str, str] | None = None, side_root: str | None = None, api_key: str | None = None,
                 max_queue: int = 256, drain_timeout: float = 30.0, admit_wait: float | None = None,
                 hub_sides: bool = False, max_body_bytes: int = 16 * 2**20):
        self.backbone, self.tokenizer, self.engine = backbone, tokenizer, engine
        self.base_name, self.side_paths = base_name, dict(side_paths or {})
        self.side_root = os.path.realpath(side_root) if side_root else None
        self.hub_sides, self.max_body_bytes = hub_sides, max_body_bytes
        self.api_key, self.drain_timeout = api_key, drain_timeout
        self.metrics = ServeMetrics()
        self.runner = EngineRunner(engine, max_queue=max_queue, admit_wait=admit_wait,
                                   on_step=self.metrics.observe_engine, on_finish=self.metrics.finished)
        self.created = int(time.time())
        self.status = "warming_up"
        self.on_warmup_failure: Callable[[], None] | None = None  # qst-serve: stop the HTTP server

    def start(self, log: Callable[[str], None] | None = None, on_failure: Callable[[], None] | None = None
              ) -> threading.Thread:
        """Compiles the engine's programs on a thread, then starts the engine's; `/health` answers meanwhile.

        Args:
          log: where the warm-up's line goes (default stderr).
          on_failure: called if the warm-up raises (default `on_warmup_failure`: qst-serve stops, exit status 1).
        """
        log = log or (lambda m: print(m, file=sys.stderr, flush=True))
        on_failure = on_failure or self.on_warmup_failure

        def warm() -> None:
            started = time.perf_counter()
            try:
                self.engine.warmup()  # every prefill bucket and the decode step, before the first request
            except Exception as err:  # noqa: BLE001 - said in one line, then the server stops
                self.status = "failed"
                log(f"qst-serve: error: the warm-up failed: {type(err).__name__}: {err}")
                if on_failure is not None:
                    on_failure()
                return
            log(f"qst-serve: compiled {len(self.engine.compiled)} programs (a prefill and an insert for each of the "
                f"buckets {self.engine.buckets()}, "
                f"one decode step) in {time.perf_counter() - started:.1f} s; ready")
            self.runner.start()
            self.status = "ready"

        thread = threading.Thread(target=warm, name="qst-warmup", daemon=True)
        thread.start()
        return thread

    # -- models -------------------------------------------------------------------------------
    def models(self) -> dict[str, Any]:
        base = {"id": self.base_name, "object": "model", "created": self.created, "owned_by": "qst_jax",
                "root": self.backbone.source, "parent": None}
        sides = [{"id": name, "object": "model", "created": self.created, "owned_by": "qst_jax",
                  "root": self.side_paths.get(name, ""), "parent": self.base_name}
                 for name in self.engine.sides.names()]
        return {"object": "list", "data": [base, *sides]}

    def side_of(self, model: str) -> str | None:
        if model == self.base_name:
            return None
        if model in self.engine.sides:
            return model
        known = [self.base_name, *self.engine.sides.names()]
        raise api.APIError(404, f"model: {model!r} does not exist (GET /v1/models lists {known})", "model",
                           "not_found_error")

    def resolve_side_path(self, path: Any) -> str:
        """`path` under `side_root`, refusing absolute paths, `..` and symlinks that lead out of it."""
        if self.side_root is None:
            raise api.APIError(403, "load_side is off: start qst-serve with --side-root DIR to allow it", "path",
                               "permission_error")
        if not isinstance(path, str) or not path:
            raise api.APIError(400, "path: required, a folder under the side root", "path")
        if os.path.isabs(path) or ".." in path.replace("\\", "/").split("/"):
            raise api.APIError(400, f"path: {path!r} must be relative to the side root, without '..'", "path")
        full = os.path.realpath(os.path.join(self.side_root, path))
        if os.path.commonpath([full, self.side_root]) != self.side_root:
            raise api.APIError(400, f"path: {path!r} leads out of the side root (a symlink)", "path")
        return full

    def hub_side(self, repo: Any) -> str:
        """The local copy of Hub repo `repo` (an export), when the server was started with --hub-sides."""
        if not self.hub_sides:
            raise api.APIError(403, "hub: loading from the Hub is off: start qst-serve with --hub-sides to allow it",
                               "hub", "permission_error")
        if not isinstance(repo, str) or not is_repo_id(repo):
            raise api.APIError(400, f"hub: {repo!r} must be a Hub repo, org/name", "hub")
        try:
            return side_directory(repo)
        except HubError as err:
            raise api.APIError(400, f"hub: {err}", "hub") from None

    def load_side(self, name: Any, path: Any, hub: Any = None) -> dict[str, Any]:
        if not isinstance(name, str) or not name or name == self.base_name:
            raise api.APIError(400, f"name: {name!r} must be a non-empty name other than the base model's", "name")
        if self.engine.fixed is not None:
            raise api.APIError(400, "name: this server serves one adapter in every slot (--adapter); it loads no "
                                    "side networks", "name")
        if hub is not None and path is not None:
            raise api.APIError(400, "path: give path (under the side root) or hub (org/name), not both", "path")
        full = self.hub_side(hub) if hub is not None else self.resolve_side_path(path)
        try:
            model, params, _ = load_tuned(full, self.backbone)  # the fingerprint refuses another backbone's
        except ExportError as err:
            raise api.APIError(400, f"path: {err}", "path") from None
        if model.name != "qst" or model.task != "lm":
            raise api.APIError(400, f"path: {path!r} holds a {model.name} {model.task} model; only QST language-model "
                                    "side networks are served", "path")
        self.engine.load_side(name, model, params)  # converting and compiling off the decode path
        self.side_paths[name] = full
        return {"status": "loaded", "name": name}

    def unload_side(self, name: Any) -> dict[str, Any]:
        with self.engine.lock:
            removed = isinstance(name, str) and self.engine.sides.remove(name)
        if not removed:
            raise api.APIError(404, f"name: {name!r} is not a loaded side network", "name", "not_found_error")
        self.side_paths.pop(name, None)
        return {"status": "unloaded", "name": name}

    # -- generation -----------------------------------------------------------------------------
    def parse(self, body: Any, kind: str) -> api.Parsed:
        def encode(b: dict) -> list[list[int]]:
            if kind == "chat":
                messages = b.get("messages")
                if not isinstance(messages, list) or not messages:
                    raise api.APIError(400, "messages: required, a non-empty list of {role, content}", "messages")
                try:
                    return [render_chat(self.tokenizer, messages)]
                except GenerationError as err:
                    raise api.APIError(400, f"messages: {err}", "messages") from None
            return [self._prompt_ids(p, where) for p, where in api.prompt_list(b.get("prompt"))]

        parsed = api.parse_request(body, kind, encode, self.engine.max_len)
        side = self.side_of(parsed.model)
        for r in parsed.requests:
            r.side = side
        return parsed

    def _prompt_ids(self, prompt: str | list[int], where: str) -> list[int]:
        """One prompt's ids: a string through the tokenizer, or token ids checked against the vocabulary."""
        if isinstance(prompt, str):
            try:
                return list(self.tokenizer(unicode_text(prompt, where)).input_ids)
            except GenerationError as err:
                raise api.APIError(400, str(err), "prompt") from None
        vocab = self.backbone.cfg.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise api.APIError(400, f"{where}: token id {bad[0]} is outside the vocabulary of {vocab}", "prompt")
        return list(prompt)

    def submit(self, parsed: api.Parsed) -> list[asyncio.Queue]:
        loop = asyncio.get_running_loop()
        queues = []
        try:
            for r in parsed.requests:
                queues.append(self.runner.submit(r, loop))
        except QueueFull as err:
            for r in parsed.requests:
                self.runner.cancel(r)
            raise api.APIError(429, str(err), None, "rate_limit_error") from None
        except Draining as err:
            raise api.APIError(503, str(err), None, "server_error") from None
        except EngineError as err:
            for r in parsed.requests:
                self.runner.cancel(r)
            raise api.APIError(400, str(err), err.field if err.field in api.FIELDS[parsed.kind] else None) from None
        self.metrics.requests.labels(model=parsed.model).inc(len(parsed.requests))
        return queues

    def app(self):
        from qst_jax.serve.routes import build_app

        return build_app(self)
