"""The FastAPI routes of `qst-serve` over a `Server` (app.py): JSON, SSE streams, auth, disconnects."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from qst_jax.serve import openai_api as api
from qst_jax.serve.page import PAGE

POLL_S = 0.1  # how often a non-streamed request checks that its client is still there


def build_app(server: Any) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_app):
        server.start()
        try:
            yield
        finally:  # SIGTERM: uvicorn stops accepting; running requests finish within the drain timeout
            finished = await run_in_threadpool(server.runner.drain, server.drain_timeout)
            print("qst-serve: drained: " + ("every running request finished" if finished else
                                            f"requests still running after {server.drain_timeout:g} s were cut"),
                  file=sys.stderr, flush=True)

    app = FastAPI(title="qst-serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    def error(err: api.APIError) -> JSONResponse:
        headers = {"Retry-After": "1"} if err.status == 429 else None
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    @app.middleware("http")
    async def authorize(request: Request, call_next):
        if server.api_key and request.url.path not in ("/health", "/ready"):
            if request.headers.get("authorization", "") != f"Bearer {server.api_key}":
                return error(api.APIError(401, "a valid API key is required: Authorization: Bearer <key>", None,
                                          "authentication_error"))
        return await call_next(request)

    async def body_of(request: Request) -> Any:
        """The JSON body, parsed on a worker thread (a large one never holds up the event loop)."""

        def too_large(size: int) -> api.APIError:
            return api.APIError(413, f"the body is {size:,} bytes; this server takes at most "
                                     f"{server.max_body_bytes:,} (--max-body-mb)")

        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > server.max_body_bytes:  # refused before it is read
            raise too_large(int(declared))
        raw = await request.body()
        if len(raw) > server.max_body_bytes:
            raise too_large(len(raw))
        try:
            return await run_in_threadpool(json.loads, raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise api.APIError(400, f"the body is not valid JSON ({err})") from None

    @app.get("/health")
    async def health():  # liveness: the process answers, whatever it is doing
        if not server.runner.accepting:
            return {"status": "draining"}
        return {"status": {"ready": "ok"}.get(server.status, server.status)}

    @app.get("/ready")
    async def ready():  # readiness: requests are served now
        status = server.status if server.runner.accepting else "draining"
        return JSONResponse({"status": status}, status_code=200 if status == "ready" else 503)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(server.metrics.text(server.engine), media_type="text/plain; version=0.0.4")

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE)

    @app.get("/v1/models")
    async def models():
        return server.models()

    @app.post("/v1/load_side")
    async def load_side(request: Request):
        try:
            body = await body_of(request)
            if not isinstance(body, dict):
                raise api.APIError(400, "the request body must be a JSON object {name, path} or {name, hub}")
            return await run_in_threadpool(server.load_side, body.get("name"), body.get("path"), body.get("hub"))
        except api.APIError as err:
            return error(err)

    @app.post("/v1/unload_side")
    async def unload_side(request: Request):
        try:
            body = await body_of(request)
            return await run_in_threadpool(server.unload_side, body.get("name") if isinstance(body, dict) else None)
        except api.APIError as err:
            return error(err)

    async def generate(request: Request, kind: str):
        try:
            parsed = await run_in_threadpool(server.parse, await body_of(request), kind)  # tokenizing: off the loop
            queues = server.submit(parsed)
        except api.APIError as err:
            return error(err)
        rid = api.new_id(parsed)
        if parsed.stream:
            return StreamingResponse(stream(parsed, queues, rid), media_type="text/event-stream")
        try:
            for q in queues:
                while True:
                    try:
                        kind_, _ = await asyncio.wait_for(q.get(), POLL_S)
                    except asyncio.TimeoutError:
                        if await request.is_disconnected():
                            return JSONResponse({}, status_code=499)
                        continue
                    if kind_ == "done":
                        break
        finally:
            for r in parsed.requests:
                server.runner.cancel(r)  # a client gone mid-request frees its slots
        return api.response(parsed, rid)

    async def stream(parsed: api.Parsed, queues: list[asyncio.Queue], rid: str):
        try:
            merged: asyncio.Queue = asyncio.Queue()

            async def pump(i: int, q: asyncio.Queue):
                while True:
                    event = await q.get()
                    await merged.put((i, *event))
                    if event[0] == "done":
                        return

            tasks = [asyncio.create_task(pump(i, q)) for i, q in enumerate(queues)]
            started, finished = set(), 0
            while finished < len(queues):
                i, kind_, value = await merged.get()
                if kind_ == "token":
                    yield api.chunk(parsed, rid, i, value, first=i not in started)
                    started.add(i)
                else:
                    finished += 1
                    if i not in started and parsed.kind == "chat":
                        yield api.chunk(parsed, rid, i, None, first=True)
                        started.add(i)
                    yield api.chunk(parsed, rid, i, None, finish=api.FINISH[value.finish_reason])
            if parsed.include_usage:
                yield api.usage_chunk(parsed, rid)
            yield api.DONE
        finally:  # also when the client disconnects: the generator is closed, the slots freed at once
            for r in parsed.requests:
                server.runner.cancel(r)
            for t in locals().get("tasks", []):
                t.cancel()

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, "completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, "chat")

    return app
