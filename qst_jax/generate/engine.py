"""The one decoding engine (`qst-generate` and `qst-serve`): the scheduler over fixed decode slots.

    engine = Engine(backbone, tokenizer, slots=8, sides=SideStore(backbone.cfg, {"a": (model, params)}))
    engine.submit(Request(prompt_ids, side="a", max_tokens=32))
    while engine.step():          # admit waiting requests into free slots, then one decode step for all
        pass

The device programs and the decode state live in `core.DecodeCore` and
`core.DecodeState`; this class is the scheduler around them: the queue, who
holds which slot, side networks' routes, stop strings, the incremental
detokenizer (`detokenize.TextStream`) and the callbacks. Per step it sends
the device nothing but newly admitted prompts (one prefill and one bulk
insert per group of `prefill_rows`), dispatches one `generate` call for
every slot, and reads back one `[slots]` token array; that read is of the
step before (its copy starts as the step is dispatched), so the host's
bookkeeping overlaps the device's next step. A request that ends on a token
(EOS, a stop string) therefore runs one step more than it needs, its token
dropped; one that ends on its length runs none.

New requests are prefilled together (`prefill_rows` of one power-of-two
length bucket, padded to that many rows); each slot's side network is
gathered by index from its shape's stack (`methods.IndexedSides`, via
`SideStore`), so the compiled programs are a prefill and an insert per
bucket plus one generate step, and a step costs the same whatever number of
side networks is loaded. `load_side` compiles a new side shape's programs
on the caller's thread before the swap, so no step waits for a compile.

A request's tokens depend only on itself (its prompt, side network, settings
and seed): its prefill has one shape (its bucket, `prefill_rows` rows), the
decode step has one shape, and its row reads only its own cache slot. So
greedy output is the same alone or among 16 others; tests check it.

Any other method (QLoRA) decodes through the same slots with `model=` and
its `params` (every slot the same model).
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from qst_jax.generate.core import DecodeCore, Rows, bind_fixed, bind_sides
from qst_jax.generate.detokenize import TextStream
from qst_jax.generate.request import FINISH_REASONS, EngineError, Request
from qst_jax.generate.side_store import SideStore
from qst_jax.methods.side_set import shape_of
from qst_jax.models.backbone import Backbone
from qst_jax.models.layers import Params

__all__ = ["FINISH_REASONS", "Engine", "EngineError", "Request"]  # Request and its error live in request.py


@dataclasses.dataclass(eq=False)
class _Running:
    """A request in its slot: its text so far, its side route (pinned), and tokens asked of the device for it."""

    request: Request
    slot: int
    stream: TextStream
    route: tuple[int, int]
    drawn: int = 1  # the prefill's token


@dataclasses.dataclass
class _Pending:
    """Tokens on their way to the host: `tokens[i]` belongs to `owners` (i, run); `started`: a prefill's start."""

    tokens: jax.Array
    owners: list[tuple[int, _Running]]
    started: float | None = None


class Engine:
    """Continuous batching over `slots` decode slots (see the module docstring).

    Args:
      backbone: the frozen Backbone.
      tokenizer: its tokenizer (text of the tokens, stop strings).
      slots: decode slots (rows of the decode step).
      max_len: tokens per slot (prompt + completion); default the model's
        context, at most 2048.
      sides: the QST side networks (`SideStore`); default none (the base model).
      model, params: another method (QLoRA) for every slot instead of `sides`.
      eos_ids: token ids that end a completion (default the model's EOS).
      prefill_rows: requests prefilled together (default min(slots, 8)); every
        prefill has this many rows, padded, so batching never changes a row.
    """

    def __init__(self, backbone: Backbone, tokenizer: Any, *, slots: int = 8, max_len: int | None = None,
                 sides: SideStore | None = None, model: Any = None, params: Params | None = None,
                 eos_ids: Sequence[int] | None = None, prefill_rows: int | None = None):
        if slots < 1:
            raise EngineError(f"slots {slots} must be at least 1")
        self.backbone, self.tokenizer, self.slots = backbone, tokenizer, slots
        self.prefill_rows = int(prefill_rows or min(slots, 8))
        cfg = backbone.cfg
        self.max_len = int(max_len or min(cfg.max_position_embeddings, 2048))
        self.sides = sides if sides is not None or model is not None else SideStore(cfg, dtype=backbone.dtype)
        self.fixed = None if model is None else (model, params if params is not None else {})
        if eos_ids is None:
            eos = cfg.eos_token_id if cfg.eos_token_id is not None else getattr(tokenizer, "eos_token_id", None)
            eos_ids = list(eos) if isinstance(eos, tuple | list) else ([eos] if eos is not None else [])
        self.eos_ids = set(int(e) for e in eos_ids)
        self.lock = threading.RLock()  # one step, or one side swap, at a time
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[_Running | None] = [None] * slots
        self._pending: collections.deque[_Pending] = collections.deque()
        self.core: DecodeCore | None = None
        self.state = None  # the core's DecodeState, on the device
        self.compiled: set[tuple[str, Any]] = set()  # (program, shape) compiled so far
        self.prefills = 0  # prefill calls so far (each `prefill_rows` rows of one bucket)
        self.decode_steps = 0  # generate steps so far
        self.prefill_seconds: float | None = None  # a prefill's time to its first tokens on the host (moving average)

    # -- the device core ---------------------------------------------------------------------
    def _core(self) -> DecodeCore:
        """The core of the current method; rebuilt (and recompiled) when a side shape appears, the running
        slots keeping their caches."""
        model = self.fixed[0] if self.fixed is not None else self.sides.method()
        if self.core is None or self.core.model is not model:
            self._adopt(DecodeCore(model, bind_fixed if self.fixed is not None else bind_sides, slots=self.slots,
                                   max_len=self.max_len), set())
        return self.core

    def _adopt(self, core: DecodeCore, compiled: set[tuple[str, Any]]) -> None:
        """Serves through `core` from now on; a new side shape gets caches beside the running slots' ones."""
        if self.state is None:
            self.state = core.init_state()
        else:
            old = self.state.caches
            fresh = core.model.init_caches(self.slots, self.max_len)["side"][len(old["side"]):]
            self.state = dataclasses.replace(self.state, caches={"backbone": old["backbone"],
                                                                 "side": tuple(old["side"]) + tuple(fresh)})
        self.core, self.compiled = core, compiled

    def load_side(self, name: str, model: Any, params: Params) -> None:
        """Loads (or replaces) QST side network `name` while requests run; a decode step waits only for the filing.

        Reading and converting `params` (`SideStore.prepare`) happen on the
        caller's thread, and so, for a side shape not served yet, does
        compiling the programs of the method with it: every prefill bucket
        with its insert, the generate step and the new stack's update. Under
        the lock the store then files the side and the engine switches to
        those programs, so no running stream waits for a compile. (Two new
        shapes loaded at once: the second compiles at its first step.)

        Raises:
          SideStoreError: `model` is not a QST language-model side network.
        """
        params = self.sides.prepare(name, model, params)
        ahead = None
        if self.fixed is None and shape_of(model.side) not in self.sides.shapes:
            ahead = self._compile_ahead(self.sides.method_with(model), params)
        with self.lock:
            self.sides.add(name, model, params, method=None if ahead is None else ahead[0].model)
            if ahead is not None and self.sides.method() is ahead[0].model:
                self._adopt(*ahead)

    def _compile_ahead(self, method: Any, params: Params) -> tuple[DecodeCore, set[tuple[str, Any]]]:
        """A core for `method` (the served one with `params`' shape added), its programs compiled for the
        arguments serving will give them; reads only shapes and placements of what runs."""
        core = DecodeCore(method, bind_sides, slots=self.slots, max_len=self.max_len)
        with self.lock:  # a consistent picture of the stacks and the state (waits for at most one step)
            self._core()
            shape = lambda tree: jax.tree.map(  # noqa: E731 - placed as a call would place them
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding if x.committed else None), tree)
            stacks = (*shape(tuple(self.sides.stacks)), self.sides.stack_shape(params))
            old = shape(self.state)
        fresh = jax.eval_shape(lambda: method.init_caches(self.slots, self.max_len))["side"][len(old.caches["side"]):]
        state = dataclasses.replace(old, caches={"backbone": old.caches["backbone"],
                                                 "side": tuple(old.caches["side"]) + tuple(fresh)})
        rows, compiled = Rows.padding(self.prefill_rows, self.slots), set()
        for bucket in self.buckets():
            ids = np.zeros((self.prefill_rows, bucket), np.int32)
            core.prefill.lower(self.backbone.params, stacks, ids, rows).compile()
            prefix, first = jax.eval_shape(core.prefill, self.backbone.params, stacks, ids, rows)
            core.insert.lower(state, prefix, first, rows).compile()
            compiled |= {("prefill", (self.prefill_rows, bucket)), ("insert", (self.prefill_rows, bucket))}
        core.generate.lower(self.backbone.params, stacks, state).compile()
        self.sides.compile_put(params)
        return core, compiled | {("decode", self.slots)}

    def model_params(self) -> Any:
        """What the core's programs take as the method's params: the side stacks, or the fixed method's params."""
        return self.fixed[1] if self.fixed is not None else tuple(self.sides.stacks)

    def buckets(self) -> list[int]:
        """The prefill lengths: powers of two from 16, and `max_len` itself."""
        out, b = [], 16
        while b < self.max_len:
            out.append(b)
            b *= 2
        return out + [self.max_len]

    def bucket_of(self, length: int) -> int:
        """The prefill length a prompt of `length` tokens is padded to: the smallest bucket that holds it."""
        return next(b for b in self.buckets() if b >= length)

    def warmup(self) -> None:
        """Compiles what serving runs, so no request waits for a compile.

        That is every prefill bucket with its insert, the generate step, and
        each side stack's update; the arrays go in as the requests' do
        (numpy), and the inserts write nothing (every row is padding).
        """
        with self.lock:
            core = self._core()
            rows = self.prefill_rows
            padding = Rows.padding(rows, self.slots)
            for bucket in self.buckets():
                prefix, first = core.prefill(self.backbone.params, self.model_params(),
                                             np.zeros((rows, bucket), np.int32), padding)
                self.state = core.insert(self.state, prefix, first, padding)
                self.compiled |= {("prefill", (rows, bucket)), ("insert", (rows, bucket))}
            self.state, tokens = core.generate(self.backbone.params, self.model_params(), self.state)
            np.asarray(tokens)
            self.compiled.add(("decode", self.slots))
            if self.fixed is None:
                self.sides.warmup()

    # -- requests ----------------------------------------------------------------------------
    def check(self, request: Request) -> None:
        """Raises EngineError for a request that cannot run (the server answers 400 / 404 with it)."""
        if len(request.prompt) == 0:
            raise EngineError("prompt: empty", field="prompt")
        if len(request.prompt) + 1 > self.max_len:
            raise EngineError(f"prompt: {len(request.prompt)} tokens do not fit the context of {self.max_len} "
                              "(prompt and at least one new token)", field="prompt")
        if request.max_tokens < 1:
            raise EngineError(f"max_tokens: {request.max_tokens} must be at least 1", field="max_tokens")
        if request.temperature < 0 or request.top_k < 0 or not 0 < request.top_p <= 1:
            raise EngineError(f"sampling: temperature {request.temperature} must be >= 0, top_k {request.top_k} "
                              f">= 0, top_p {request.top_p} in (0, 1]", field="sampling")
        if request.side is not None and (self.fixed is not None or request.side not in self.sides):
            raise EngineError(f"side {request.side!r} is not loaded", field="side")

    def submit(self, request: Request) -> Request:
        """Queues `request` (checked first); it is admitted when a slot frees."""
        self.check(request)
        request.t_submit = time.perf_counter()
        self.waiting.append(request)  # deque appends are atomic: no wait for a running step
        return request

    @property
    def busy(self) -> int:
        """Slots holding a request."""
        return sum(run is not None for run in self.running)

    @property
    def queued(self) -> int:
        """Requests waiting for a slot."""
        return len(self.waiting)

    def arrivals(self) -> tuple[float, float] | None:
        """`t_submit` of the oldest and the newest waiting request (None: none waits)."""
        waiting = list(self.waiting)  # a snapshot: the deque may grow meanwhile
        return (waiting[0].t_submit, waiting[-1].t_submit) if waiting else None

    def pending(self) -> bool:
        """Whether a step has anything to do (requests waiting or running, tokens on their way)."""
        return bool(self.waiting) or self.busy > 0 or bool(self._pending)

    def cancel_all(self) -> None:
        """Finishes every running and waiting request now, "cancelled" (a failed step, a shutdown)."""
        with self.lock:
            for slot, run in enumerate(self.running):
                if run is not None:
                    self._finish(slot, "cancelled")
            while self.waiting:
                self._done(self.waiting.popleft(), "cancelled")
            self._pending.clear()

    def generate(self, requests: Sequence[Request]) -> list[Request]:
        """Runs `requests` to completion here (qst-generate); they share the slots as a server's would."""
        for r in requests:
            self.submit(r)
        while any(r.finish_reason is None for r in requests):
            self.step()
        return list(requests)

    # -- one step ----------------------------------------------------------------------------
    def step(self, admit: bool = True) -> bool:
        """Admits waiting requests into free slots (prefilled `prefill_rows` at a time), dispatches one decode
        step, and handles the tokens of the step before it.

        Args:
          admit: False: no admission this step (the server waits for the rest of a burst).

        Returns whether work remains.
        """
        with self.lock:
            for slot, run in enumerate(self.running):
                if run is not None and run.request.cancelled:
                    self._finish(slot, "cancelled")
            core = self._core()
            if admit:
                self._admit_waiting(core)
            owners = [(slot, run) for slot, run in enumerate(self.running) if run is not None and self._wants(run)]
            if owners:
                self.state, tokens = core.generate(self.backbone.params, self.model_params(), self.state)
                tokens.copy_to_host_async()
                self.compiled.add(("decode", self.slots))
                self.decode_steps += 1
                for _, run in owners:
                    run.drawn += 1
                self._pending.append(_Pending(tokens, owners))
            self._receive(keep=1 if owners else 0)
            return self.pending()

    def _wants(self, run: _Running) -> bool:
        """Whether `run` may need another token (not yet at its max_tokens or the slot's end, counting the
        tokens already asked for)."""
        return run.drawn < run.request.max_tokens and len(run.request.prompt) + run.drawn < self.max_len

    def _admit_waiting(self, core: DecodeCore) -> None:
        admitted: dict[int, list[tuple[int, Request]]] = {}
        free = [slot for slot, run in enumerate(self.running) if run is None]
        while self.waiting and free:
            r = self.waiting.popleft()
            if r.cancelled:
                self._done(r, "cancelled")
                continue
            admitted.setdefault(self.bucket_of(len(r.prompt)), []).append((free.pop(0), r))
        for bucket, group in admitted.items():
            for start in range(0, len(group), self.prefill_rows):
                self._admit(core, bucket, group[start : start + self.prefill_rows])

    def _admit(self, core: DecodeCore, bucket: int, group: list[tuple[int, Request]]) -> None:
        """Prefills up to `prefill_rows` requests of one length bucket together and inserts them into their slots
        (two device calls); their first tokens join the tokens on their way to the host.

        The prefill always has `prefill_rows` rows (unused ones are padding),
        so a request's prefill is the same program whatever arrived with it.
        """
        started = time.perf_counter()
        rows = Rows.padding(self.prefill_rows, self.slots)
        ids = np.zeros((self.prefill_rows, bucket), np.int32)
        owners = []
        for i, (slot, r) in enumerate(group):
            n = len(r.prompt)
            route = self.sides.route(r.side, pin=True) if self.fixed is None else (-1, 0)
            ids[i, :n] = r.prompt
            rows.slot[i], rows.length[i], rows.route[i] = slot, n, route
            rows.seed[i] = int(r.seed) % 2**32
            rows.temperature[i], rows.top_k[i], rows.top_p[i] = r.temperature, r.top_k, r.top_p
            run = _Running(r, slot, TextStream(self.tokenizer), route)
            self.running[slot] = run
            owners.append((i, run))
        prefix, first = core.prefill(self.backbone.params, self.model_params(), ids, rows)
        self.state = core.insert(self.state, prefix, first, rows)
        first.copy_to_host_async()
        self.compiled |= {("prefill", (self.prefill_rows, bucket)), ("insert", (self.prefill_rows, bucket))}
        self.prefills += 1
        self._pending.append(_Pending(first, owners, started))

    def _receive(self, keep: int) -> None:
        """Hands the tokens of every call but the newest `keep` to their requests, oldest first."""
        while len(self._pending) > keep:
            pending = self._pending.popleft()
            tokens = np.asarray(pending.tokens)
            if pending.started is not None:
                took = time.perf_counter() - pending.started
                self.prefill_seconds = took if self.prefill_seconds is None else 0.8 * self.prefill_seconds + 0.2 * took
            for i, run in pending.owners:
                if run.request.finish_reason is None:  # a finished request's extra token is dropped
                    self._append(run, int(tokens[i]))

    def _append(self, run: _Running, token: int) -> None:
        r, slot = run.request, run.slot
        if r.t_first is None:
            r.t_first = time.perf_counter()
        if token in (self.eos_ids if r.eos_ids is None else r.eos_ids):
            return self._finish(slot, "stop")
        r.tokens.append(token)
        added = run.stream.push(token)
        text = run.stream.text
        if added and r.stop:  # a stop string ends in the new text, if anywhere: search only the tail it can be in
            start = max(0, len(text) - len(added) - max(len(s) for s in r.stop) + 1)
            cut = min((text.index(s, start) for s in r.stop if s in text[start:]), default=None)
            if cut is not None:
                r.text = text[:cut]
                return self._finish(slot, "stop", cut=True)
        r.text = text
        if len(r.tokens) >= r.max_tokens or len(r.prompt) + len(r.tokens) >= self.max_len:
            return self._finish(slot, "length")
        hold = max((len(s) - 1 for s in r.stop), default=0)  # text that may begin a stop string waits
        ready = len(text) - hold
        if ready > r._sent and r.on_token is not None:
            delta, r._sent = text[r._sent : ready], ready
            r.on_token(r, delta)

    def _finish(self, slot: int, reason: str, cut: bool = False) -> None:
        run = self.running[slot]
        self.running[slot] = None
        if self.fixed is None:
            self.sides.unpin(run.route)
        if not cut:  # the text of tokens held back (a character split at the end) belongs to the completion
            run.stream.flush()
            run.request.text = run.stream.text
        self._done(run.request, reason)

    def _done(self, r: Request, reason: str) -> None:
        r.finish_reason = reason
        r.t_done = time.perf_counter()
        if r.on_token is not None and len(r.text) > r._sent:
            delta, r._sent = r.text[r._sent :], len(r.text)
            r.on_token(r, delta)
        if r.on_done is not None:
            r.on_done(r)
