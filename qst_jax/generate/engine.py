"""The one decoding engine (`qst-generate` and `qst-serve`): fixed decode slots, continuous batching.

    engine = Engine(backbone, tokenizer, slots=8, sides=SideStore(backbone.cfg, {"a": (model, params)}))
    engine.submit(Request(prompt_ids, side="a", max_tokens=32))
    while engine.step():          # admit waiting requests into free slots, then one decode step for all
        pass

The engine holds `slots` decode slots, each with its own length, side
network and sampling settings, and preallocated KV caches `[L, slots,
max_len, ...]` for the backbone and each side shape. New requests are
prefilled together (`prefill_rows` of one power-of-two length bucket at a
time, padded to that many rows), and each one's caches are written into a
free slot while the other slots keep decoding; each decode step runs
the backbone once for every slot, and each slot's side network is gathered
by index from its shape's stack (`methods.IndexedSides`, via `SideStore`),
so the compiled programs are the prefill buckets plus one decode step, and a
step costs the same whatever number of side networks is loaded.

A request's tokens depend only on itself (its prompt, side network, settings
and seed): its prefill has one shape (its bucket, `prefill_rows` rows), the
decode step has one shape, and its row reads only its own cache slot. So greedy output is the same alone or
among 16 others; tests check it.

Any other method (QLoRA) decodes through the same slots with `model=` and
its `params` (every slot the same model).
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qst_jax.generate.request import FINISH_REASONS, EngineError, Request
from qst_jax.generate.sampling import sample_rows
from qst_jax.generate.side_store import SideStore
from qst_jax.models.layers import Params
from qst_jax.models.backbone import Backbone

__all__ = ["FINISH_REASONS", "Engine", "EngineError", "Request"]  # Request and its error live in request.py


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
        self.lock = threading.RLock()  # one step, or one side load, at a time
        self.waiting: collections.deque[Request] = collections.deque()
        self.active: list[Request | None] = [None] * slots
        self.lengths = np.zeros(slots, np.int32)
        self.key_mask = np.zeros((slots, self.max_len), np.int32)
        self.last = np.zeros(slots, np.int32)
        self.route = np.full((slots, 2), (-1, 0), np.int32)  # (stack, index in it) of each slot
        # Each slot's sampling, typed: a seed is an integer of 32 bits (a float32 would round seeds above 2^24 together).
        self.temperature = np.zeros(slots, np.float32)
        self.top_k = np.zeros(slots, np.int32)
        self.top_p = np.ones(slots, np.float32)
        self.seed = np.zeros(slots, np.uint32)
        self._model_key: Any = None
        self.compiled: set[tuple[str, int]] = set()  # (program, shape) compiled so far
        self.prefills = 0  # prefill calls so far (each `prefill_rows` rows of one bucket)
        self.decode_steps = 0  # decode steps so far
        self.prefill_seconds: float | None = None  # a prefill call's time to its first tokens (moving average)

    # -- the model -------------------------------------------------------------------------
    def _model(self) -> tuple[Any, Callable[[np.ndarray], Params]]:
        """(method, params for routes `[R, 2]`); rebuilt (and recompiled) when a side shape appears."""
        if self.fixed is not None:
            model, params = self.fixed
            return model, lambda route: params
        model = self.sides.method()
        return model, lambda route: self.sides.params(route)

    def _programs(self, model: Any):
        if self._model_key is model:
            return self._prefill_fn, self._decode_fn, self._insert_fn
        self._model_key = model
        fresh = model.init_caches(self.slots, self.max_len)
        old = getattr(self, "caches", None)
        if old is not None and self.fixed is None:  # a new side shape: running slots keep their caches
            fresh = {"backbone": old["backbone"], "side": tuple(old["side"]) + tuple(fresh["side"][len(old["side"]):])}
        self.caches = fresh
        self.compiled = set()

        def prefill(backbone_params, params, ids, mask, last):
            caches = model.init_caches(ids.shape[0], ids.shape[1])
            positions = jnp.maximum(jnp.cumsum(mask, -1) - 1, 0)
            o, caches = model.hidden(params, backbone_params, ids, mask, positions=positions, key_mask=mask,
                                     caches=caches, cache_index=jnp.int32(0))
            h = jnp.take_along_axis(o, last[:, None, None], axis=1)
            return model.head(params, backbone_params, h, mask[:, :1])[:, 0], caches

        def decode(backbone_params, params, tokens, positions, key_mask, caches, write):
            ones = jnp.ones_like(tokens)[:, None]
            o, caches = model.hidden(params, backbone_params, tokens[:, None], ones, positions=positions[:, None],
                                     key_mask=key_mask, caches=caches, cache_index=write)
            return model.head(params, backbone_params, o, ones)[:, 0], caches

        def insert(caches, rows, i, slot):  # row i of a prefill's caches `[L, R, T, ...]` into slot `slot`
            def one(c, r):
                row = jax.lax.dynamic_slice_in_dim(r, i, 1, axis=1).astype(c.dtype)
                return jax.lax.dynamic_update_slice(c, row, (0, slot) + (0,) * (c.ndim - 2))

            return jax.tree.map(one, caches, rows)

        self._prefill_fn = jax.jit(prefill)
        self._decode_fn = jax.jit(decode, donate_argnums=(5,))
        self._insert_fn = jax.jit(insert, donate_argnums=(0,))
        return self._prefill_fn, self._decode_fn, self._insert_fn

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

        That is every prefill bucket with its cache insert, the decode step,
        the sampler of both, and each side stack's update; the arrays go in
        as the requests' do (numpy), so nothing else compiles later.
        """
        with self.lock:
            model, params_of = self._model()
            prefill, decode, insert = self._programs(model)
            rows = self.prefill_rows
            routes = np.tile(np.asarray([-1, 0], np.int32), (rows, 1))
            for bucket in self.buckets():
                ids = np.zeros((rows, bucket), np.int32)
                logits, row_caches = prefill(self.backbone.params, params_of(routes), ids, np.ones_like(ids),
                                             np.zeros(rows, np.int32))
                if self.active[0] is None:  # slot 0's cache is free: its contents are never read unmasked
                    self.caches = insert(self.caches, row_caches, np.int32(0), np.int32(0))
                self.compiled.add(("prefill", (rows, bucket)))
            self._sample(logits, np.full(rows, -1))  # the sampler of a prefill's rows
            zeros = np.zeros(self.slots, np.int32)
            mask = np.zeros((self.slots, self.max_len), np.int32)
            mask[:, 0] = 1
            logits, self.caches = decode(self.backbone.params, params_of(self.route), zeros, zeros, mask,
                                         self.caches, zeros)
            self._sample(logits, np.full(self.slots, -1))  # and of the decode step's
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
        return sum(r is not None for r in self.active)

    def pending(self) -> bool:
        return bool(self.waiting) or self.busy > 0

    def generate(self, requests: Sequence[Request]) -> list[Request]:
        """Runs `requests` to completion here (qst-generate); they share the slots as a server's would."""
        for r in requests:
            self.submit(r)
        while any(r.finish_reason is None for r in requests):
            self.step()
        return list(requests)

    # -- one step ----------------------------------------------------------------------------
    def step(self, admit: bool = True) -> bool:
        """Admits waiting requests into free slots (prefilled `prefill_rows` at a time), then one decode step.

        Args:
          admit: False: only the decode step (the server waits for the rest of a burst).

        Returns whether work remains.
        """
        with self.lock:
            for slot, r in enumerate(self.active):
                if r is not None and r.cancelled:
                    self._finish(slot, "cancelled")
            admitted: dict[int, list[tuple[int, Request]]] = {}
            free = [slot for slot, r in enumerate(self.active) if r is None]
            while admit and self.waiting and free:
                r = self.waiting.popleft()
                if r.cancelled:
                    self._done(r, "cancelled")
                    continue
                slot = free.pop(0)
                self.active[slot] = r  # reserved; filled by _admit
                admitted.setdefault(self.bucket_of(len(r.prompt)), []).append((slot, r))
            for bucket, group in admitted.items():
                for start in range(0, len(group), self.prefill_rows):
                    self._admit(bucket, group[start : start + self.prefill_rows])
            if self.busy:
                self._decode()
            return self.pending()

    def _admit(self, bucket: int, group: list[tuple[int, Request]]) -> None:
        """Prefills up to `prefill_rows` requests of one length bucket together, then writes each into its slot.

        The prefill always has `prefill_rows` rows (unused ones are padding),
        so a request's prefill is the same program whatever arrived with it.
        """
        start = time.perf_counter()
        model, params_of = self._model()
        prefill, _, insert = self._programs(model)
        rows = self.prefill_rows
        ids = np.zeros((rows, bucket), np.int32)
        mask = np.zeros((rows, bucket), np.int32)
        mask[:, 0] = 1  # a padding row attends to something finite; its output is never read
        last = np.zeros(rows, np.int32)
        routes = np.tile(np.asarray([-1, 0], np.int32), (rows, 1))
        for i, (slot, r) in enumerate(group):
            n = len(r.prompt)
            ids[i, :n], mask[i, :n], last[i] = r.prompt, 1, n - 1
            routes[i] = self.sides.route(r.side, pin=True) if self.fixed is None else (-1, 0)
        logits, row_caches = prefill(self.backbone.params, params_of(routes), ids, mask, last)
        self.compiled.add(("prefill", (rows, bucket)))
        self.prefills += 1
        slots = np.asarray([slot for slot, _ in group])
        for i, (slot, r) in enumerate(group):
            self.caches = insert(self.caches, row_caches, np.int32(i), np.int32(slot))
            self.route[slot] = routes[i]
            self.temperature[slot], self.top_k[slot], self.top_p[slot] = r.temperature, r.top_k, r.top_p
            self.seed[slot] = int(r.seed) % 2**32
            self.lengths[slot] = len(r.prompt)
            self.key_mask[slot] = 0
            self.key_mask[slot, : len(r.prompt)] = 1
        row_slots = np.full(rows, -1)
        row_slots[: len(group)] = slots
        tokens = self._sample(logits, row_slots)
        took = time.perf_counter() - start
        self.prefill_seconds = took if self.prefill_seconds is None else 0.8 * self.prefill_seconds + 0.2 * took
        for slot, token in zip(slots, tokens):
            self._append(int(slot), int(token))

    def _sample(self, logits: jax.Array, row_slots: np.ndarray) -> np.ndarray:
        """Next token of every row of `logits` `[R, V]`; row i belongs to slot `row_slots[i]` (-1: unused).

        Every row is sampled (unused ones greedily), so the sampler compiles
        once per program shape, never once per number of requests; a row's
        draw depends only on its own slot's settings and seed.
        """
        used, n = row_slots >= 0, len(row_slots)
        of_rows = lambda values, unused: np.where(used, values[np.maximum(row_slots, 0)], unused)  # noqa: E731
        steps = np.zeros(n, np.int32)
        steps[used] = [len(self.active[i].tokens) for i in row_slots[used]]
        return np.asarray(_sample_jit(logits, of_rows(self.seed, np.uint32(0)).astype(np.uint32), steps,
                                      of_rows(self.temperature, np.float32(0)).astype(np.float32),
                                      of_rows(self.top_k, np.int32(0)).astype(np.int32),
                                      of_rows(self.top_p, np.float32(1)).astype(np.float32)))

    def _decode(self) -> None:
        model, params_of = self._model()
        _, decode, _ = self._programs(model)
        live = np.asarray([r is not None for r in self.active])
        write = np.where(live, self.lengths, 0).astype(np.int32)
        for slot in np.flatnonzero(live):
            self.key_mask[slot, self.lengths[slot]] = 1
        key_mask = self.key_mask.copy()
        key_mask[~live, 0] = 1  # a free row attends to something finite; its output is never read
        logits, self.caches = decode(self.backbone.params, params_of(self.route), self.last.copy(), write, key_mask,
                                     self.caches, write)
        self.compiled.add(("decode", self.slots))
        self.decode_steps += 1
        tokens = self._sample(logits, np.where(live, np.arange(self.slots), -1))
        for slot in np.flatnonzero(live):
            token = tokens[slot]
            self.lengths[slot] += 1
            self._append(int(slot), int(token))

    def _append(self, slot: int, token: int) -> None:
        r = self.active[slot]
        if r.t_first is None:
            r.t_first = time.perf_counter()
        if token in (self.eos_ids if r.eos_ids is None else r.eos_ids):
            return self._finish(slot, "stop")
        r.tokens.append(token)
        self.last[slot] = token
        decode = getattr(self.tokenizer, "decode", None)  # a tokenizer of ids only: no text, no stop strings
        text = decode(r.tokens, skip_special_tokens=True) if decode is not None else ""
        cut = min((text.index(s) for s in r.stop if s in text), default=None)
        if cut is not None:
            r.text = text[:cut]
            return self._finish(slot, "stop")
        r.text = text
        if len(r.tokens) >= r.max_tokens or self.lengths[slot] + 1 >= self.max_len:
            return self._finish(slot, "length")
        hold = max((len(s) - 1 for s in r.stop), default=0)  # text that may begin a stop string waits
        ready = len(text) - hold
        while ready > r._sent and text[ready - 1 : ready] == "\ufffd":  # a character split across tokens
            ready -= 1
        if ready > r._sent and r.on_token is not None:
            delta, r._sent = text[r._sent : ready], ready
            r.on_token(r, delta)

    def _finish(self, slot: int, reason: str) -> None:
        r = self.active[slot]
        self.active[slot] = None
        if self.fixed is None:
            self.sides.unpin(tuple(self.route[slot]))
        self.route[slot] = (-1, 0)
        self._done(r, reason)

    def _done(self, r: Request, reason: str) -> None:
        r.finish_reason = reason
        r.t_done = time.perf_counter()
        if r.on_token is not None and len(r.text) > r._sent:
            delta, r._sent = r.text[r._sent :], len(r.text)
            r.on_token(r, delta)
        if r.on_done is not None:
            r.on_done(r)


_sample_jit = jax.jit(sample_rows)
