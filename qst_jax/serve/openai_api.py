"""The OpenAI API's request fields and response shapes, for `/v1/completions` and `/v1/chat/completions`.

`parse_request` turns a JSON body into engine `Request`s (one per `n`) and
refuses, in one line naming the field, anything it cannot honour; the
`*_response` and `*_chunk` functions build the bodies and SSE events the
`openai` client reads (`usage` and `finish_reason` on every response,
`stream_options.include_usage`, `data: [DONE]`).
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
import uuid
from typing import Any

from qst_jax.errors import QSTError
from qst_jax.generate.engine import Request

COMMON = ("model", "max_tokens", "temperature", "top_p", "seed", "stop", "n", "stream", "stream_options", "user")
FIELDS = {"completion": (*COMMON, "prompt"), "chat": (*COMMON, "messages", "max_completion_tokens")}
FINISH = {"stop": "stop", "length": "length", "cancelled": "abort"}
MAX_N = 16
MAX_STOP = 4


class APIError(QSTError):
    """An OpenAI-style error: HTTP status, message, the offending field (`param`)."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message, field=param)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}


@dataclasses.dataclass
class Parsed:
    """What a request asks for: the model name, each prompt's ids, and the engine requests (one per choice).

    Invariant: `requests[p * n + j]` is choice j of prompt p (OpenAI's choice index for a list of prompts).
    """

    model: str
    prompts: list[list[int]]
    requests: list[Request]
    stream: bool
    include_usage: bool
    kind: str


def _number(body: dict, key: str, default: float, low: float, high: float, integer: bool = False) -> float:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or (integer and not isinstance(value, int)):
        raise APIError(400, f"{key}: {value!r} is not {'an integer' if integer else 'a number'}", key)
    if not low <= value <= high:
        raise APIError(400, f"{key}: {value} is not in [{low}, {high}]", key)
    return value


def parse_request(body: Any, kind: str, encode, max_len: int) -> Parsed:
    """Checks a completions (`kind="completion"`) or chat (`"chat"`) body.

    `encode(body)` gives the prompts' ids: one list for a chat or a single prompt, several for a completions
    `prompt` given as a list of prompts (each then has `n` choices).

    Raises:
      APIError: 400 naming the field (unknown or unsupported, wrong type or range, too long).
    """
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    unknown = sorted(set(body) - set(FIELDS[kind]))
    if unknown:
        raise APIError(400, f"{unknown[0]}: not supported by this server (supported: {', '.join(FIELDS[kind])})",
                       unknown[0])
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise APIError(400, "model: required, the name of a model from GET /v1/models", "model")
    prompts = encode(body)
    field = "messages" if kind == "chat" else "prompt"
    if not prompts or any(len(p) == 0 for p in prompts):
        raise APIError(400, f"{field}: empty", field)
    prompt = max(prompts, key=len)
    room = max_len - len(prompt)
    if room < 1:
        raise APIError(400, f"{field}: {len(prompt)} tokens leave no room in the context of {max_len}", field)
    key = "max_completion_tokens" if kind == "chat" and "max_completion_tokens" in body else "max_tokens"
    default = 16 if kind == "completion" else room
    max_tokens = int(_number(body, key, default, 1, 10**9, integer=True))
    if max_tokens > room:
        raise APIError(400, f"{key}: {max_tokens} with a prompt of {len(prompt)} tokens exceeds the context of "
                            f"{max_len}", key)
    temperature = float(_number(body, "temperature", 1.0, 0.0, 2.0))
    top_p = float(_number(body, "top_p", 1.0, 0.0, 1.0))
    if top_p == 0:
        raise APIError(400, "top_p: must be > 0", "top_p")
    n = int(_number(body, "n", 1, 1, MAX_N, integer=True))
    if n * len(prompts) > MAX_N:
        raise APIError(400, f"n: {n} choices for each of {len(prompts)} prompts exceed {MAX_N} in one request", "n")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise APIError(400, f"seed: {seed!r} is not an integer", "seed")
    seed = random.randrange(2**31) if seed is None else seed % 2**31
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > MAX_STOP:
        raise APIError(400, f"stop: a string or a list of at most {MAX_STOP} non-empty strings", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, f"stream: {stream!r} is not a boolean", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise APIError(400, "stream_options: only {\"include_usage\": bool} is supported", "stream_options")
    if options and not stream:
        raise APIError(400, "stream_options: only with stream: true", "stream_options")
    requests = [Request(ids, side=None, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                        seed=(seed + i) % 2**31, stop=tuple(stop)) for i, ids in
                enumerate(ids for ids in prompts for _ in range(n))]
    return Parsed(model, prompts, requests, stream, bool(options.get("include_usage", False)), kind)


def _is_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool)
                                                          for t in value)


def prompt_list(prompt: Any) -> list[tuple[str | list[int], str]]:
    """The completions `prompt` as (prompt, its field path) pairs.

    OpenAI's four forms: a string, a list of strings, a list of token ids, a list of lists of token ids.

    Raises:
      APIError: 400 naming `prompt` (or the list element) when it is none of them.
    """
    if isinstance(prompt, str) or _is_ids(prompt):
        return [(prompt, "prompt")]
    if isinstance(prompt, list) and prompt:
        for i, p in enumerate(prompt):
            if not (isinstance(p, str) or _is_ids(p)):
                raise APIError(400, f"prompt[{i}]: {type(p).__name__} is neither a string nor a non-empty list of "
                                    "token ids", "prompt")
        return [(p, f"prompt[{i}]") for i, p in enumerate(prompt)]
    raise APIError(400, "prompt: required, a string, a list of strings, or a list of token ids", "prompt")


def _usage(parsed: Parsed) -> dict[str, int]:
    completion = sum(len(r.tokens) for r in parsed.requests)
    prompt = sum(len(p) for p in parsed.prompts)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _head(parsed: Parsed, rid: str, chunk: bool = False) -> dict[str, Any]:
    obj = {"completion": "text_completion", "chat": "chat.completion.chunk" if chunk else "chat.completion"}
    return {"id": rid, "object": obj[parsed.kind], "created": int(time.time()), "model": parsed.model}


def new_id(parsed: Parsed) -> str:
    return ("cmpl-" if parsed.kind == "completion" else "chatcmpl-") + uuid.uuid4().hex


def response(parsed: Parsed, rid: str) -> dict[str, Any]:
    """The whole (non-streamed) response body."""
    choices = []
    for i, r in enumerate(parsed.requests):
        reason = FINISH[r.finish_reason]
        if parsed.kind == "completion":
            choices.append({"index": i, "text": r.text, "logprobs": None, "finish_reason": reason})
        else:
            choices.append({"index": i, "message": {"role": "assistant", "content": r.text}, "logprobs": None,
                            "finish_reason": reason})
    return {**_head(parsed, rid), "choices": choices, "usage": _usage(parsed)}


def chunk(parsed: Parsed, rid: str, index: int, text: str | None, finish: str | None = None,
          first: bool = False) -> str:
    """One SSE event of a streamed response: `text` added to choice `index` (its finish reason at the end)."""
    if parsed.kind == "completion":
        choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
    else:
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if text:
            delta["content"] = text
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
    return sse({**_head(parsed, rid, chunk=True), "choices": [choice]})


def usage_chunk(parsed: Parsed, rid: str) -> str:
    return sse({**_head(parsed, rid, chunk=True), "choices": [], "usage": _usage(parsed)})


def sse(payload: Any) -> str:
    return f"data: {json.dumps(payload)}\n\n"


DONE = "data: [DONE]\n\n"
