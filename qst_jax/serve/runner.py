"""The engine on its own thread, and the bridge from its callbacks to asyncio request handlers.

    runner = EngineRunner(engine, max_queue=256)
    runner.start()
    stream = runner.submit(request, loop)     # an asyncio.Queue of ("token", text) ... ("done", request)
    runner.drain(timeout=30)                  # SIGTERM: finish what runs, refuse new, then stop

The thread steps the engine while it has work and sleeps on an event when
it has none; a new request, a cancel or a side load wakes it. It lets a
burst finish arriving before admitting it (until no request has come for
`admit_wait` seconds, at most `5 * admit_wait`): with every slot free it
waits, otherwise it runs the decode step meanwhile. So a burst is
prefilled together, not its first request alone and the rest after it
(docs/performance.md has how bursts arrive). By default `admit_wait` is 5%
of a prefill call's time, within 2 to 50 ms, so a lone request pays at most
5% more for its first token. Callbacks run
on the engine thread and reach the handler through
`loop.call_soon_threadsafe`, so no handler ever blocks on a decode step.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from qst_jax.errors import QSTError
from qst_jax.generate.engine import Engine, Request


class QueueFull(QSTError, RuntimeError):
    """More requests wait than the queue holds (the server answers 429)."""


class Draining(QSTError, RuntimeError):
    """The server is shutting down and takes no new requests (503)."""


def auto_admit_wait(engine: Engine) -> float:
    """5% of the engine's prefill call (its moving average), within 2-50 ms; 10 ms before the first one."""
    if engine.prefill_seconds is None:
        return 0.01
    return min(0.05, max(0.002, 0.05 * engine.prefill_seconds))


class EngineRunner:
    """Runs `engine.step()` on a daemon thread (see the module docstring).

    Args:
      engine: the decoding engine.
      max_queue: most requests waiting for a slot; one more is refused.
      admit_wait: seconds of no new arrival that end a burst (0: admit at once; None: `auto_admit_wait`).
      on_step: called after every step (metrics), on the engine thread.
      on_finish: called with each request as it finishes, whatever the reason (metrics).
    """

    def __init__(self, engine: Engine, *, max_queue: int = 256, admit_wait: float | None = None, on_step: Any = None,
                 on_finish: Any = None):
        self.engine, self.max_queue, self.on_step, self.on_finish = engine, max_queue, on_step, on_finish
        self.admit_wait = admit_wait
        self.wake = threading.Event()
        self.accepting = True
        self.error: BaseException | None = None
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="qst-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop:
            if not self.engine.pending():
                self.wake.wait(0.05)
                self.wake.clear()
                continue
            hold = self._arriving()
            if hold > 0 and not self.engine.busy:
                time.sleep(hold)  # nothing to decode: let the rest of the burst arrive
                continue
            try:
                self.engine.step(admit=hold <= 0)  # slots busy: decode now, the burst is admitted next step
            except Exception as err:  # noqa: BLE001 - fail the running requests, keep serving
                self.error = err
                self.engine.cancel_all()
            if self.on_step is not None:
                self.on_step(self.engine)

    def _arriving(self) -> float:
        """Seconds until the burst now arriving is complete (0: admit what waits now).

        A burst is complete once no request has come for `admit_wait`
        seconds (the newest waiting request is the last to have come), its
        first has waited `5 * admit_wait`, or it fills the free slots.
        """
        wait = auto_admit_wait(self.engine) if self.admit_wait is None else self.admit_wait
        arrivals = self.engine.arrivals()
        if wait <= 0 or arrivals is None or self.engine.queued >= self.engine.slots - self.engine.busy:
            return 0.0
        oldest, newest = arrivals
        until = min(newest + wait, oldest + 5 * wait)
        return max(0.0, until - time.perf_counter())

    def submit(self, request: Request, loop: asyncio.AbstractEventLoop) -> asyncio.Queue:
        """Queues `request`; its events arrive on the returned queue.

        Raises:
          Draining: the server is shutting down.
          QueueFull: `max_queue` requests already wait.
          EngineError: a request the engine cannot take (the message names the field).
        """
        if not self.accepting:
            raise Draining("the server is shutting down")
        if self.engine.queued >= self.max_queue:
            raise QueueFull(f"{self.engine.queued} requests are waiting for a slot; retry shortly")
        events: asyncio.Queue = asyncio.Queue()
        request.on_token = lambda r, delta: loop.call_soon_threadsafe(events.put_nowait, ("token", delta))
        def done(r: Request) -> None:
            if self.on_finish is not None:
                self.on_finish(r)
            loop.call_soon_threadsafe(events.put_nowait, ("done", r))

        request.on_done = done
        self.engine.submit(request)
        self.wake.set()
        return events

    def cancel(self, request: Request) -> None:
        """Frees the request's slot at the next step (its client went away)."""
        if request.finish_reason is None:
            request.cancel()
            self.wake.set()

    def drain(self, timeout: float) -> bool:
        """Refuses new requests, lets running ones finish for up to `timeout` seconds, then stops; all finished?"""
        self.accepting = False
        if not self._thread.is_alive():  # stopped before the warm-up ended: nothing ran
            self.engine.cancel_all()
            return not self.engine.pending()
        deadline = time.monotonic() + timeout
        while self.engine.pending() and time.monotonic() < deadline:
            time.sleep(0.02)
        finished = not self.engine.pending()
        if not finished:
            self.engine.cancel_all()  # waits for the step in progress, then ends everything
        self._stop = True
        self.wake.set()
        self._thread.join(timeout=5)
        return finished
