"""What a caller asks the decoding engine for, and what comes back: `Request`, `EngineError`.

    r = Request(prompt_ids, side="poet", max_tokens=32, temperature=0.7, seed=1, stop=("\n\n",))
    engine.submit(r)      # later: r.tokens, r.text, r.finish_reason in FINISH_REASONS

The engine fills `tokens`, `text`, `finish_reason` and the times; the
callbacks run on the engine's thread (the server forwards them to asyncio).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from qst_jax.errors import QSTError

FINISH_REASONS = ("stop", "length", "cancelled")


class EngineError(QSTError, ValueError):
    """A request the engine cannot take (prompt too long, unknown side network, bad settings)."""


@dataclasses.dataclass(eq=False)
class Request:
    """One generation: what to decode and, once done, what came out.

    Attributes:
      prompt: token ids.
      side: the side network's name (None: the base model).
      max_tokens: most new tokens.
      temperature, top_k, top_p: sampling (temperature 0: greedy).
      seed: the sampling seed (row draws depend only on it and the position).
      stop: strings that end the completion (cut from the text).
      eos_ids: tokens that end it (None: the engine's, the model's EOS).
      on_token: called from the engine's thread after each new token with
        (request, text added since the last call); text that might start a
        stop string is held back until it cannot.
      on_done: called once when it finishes (`finish_reason` set).
      tokens, text, finish_reason: the result; times: submit, first token, done (perf_counter).
    """

    prompt: Sequence[int]
    side: str | None = None
    max_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop: Sequence[str] = ()
    eos_ids: Sequence[int] | None = None
    on_token: Callable[[Request, str], None] | None = None
    on_done: Callable[[Request], None] | None = None
    tokens: list[int] = dataclasses.field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    cancelled: bool = False
    t_submit: float = 0.0
    t_first: float | None = None
    t_done: float | None = None
    _sent: int = 0  # characters of `text` already handed to on_token

    def cancel(self) -> None:
        """Stop at the next step boundary (a client went away); `finish_reason` becomes "cancelled"."""
        self.cancelled = True
