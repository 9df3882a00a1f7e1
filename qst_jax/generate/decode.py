"""Text from a backbone and, optionally, tuned models: the `Generator` front end of the decoding engine.

    gen = Generator(backbone, tokenizer)                     # the base model
    gen = Generator(backbone, tokenizer, tuned=(model, params))  # any method (QST, QLoRA, ...)
    texts = gen.generate(["The capital of France is"], max_new_tokens=8)

    gen = Generator(backbone, tokenizer, sides={"a": (model_a, params_a), "b": (model_b, params_b)})
    texts = gen.generate([p1, p2, p3], side=["a", None, "b"])   # None: the base model

Every prompt becomes a `Request` of the one decoding engine (`engine.py`,
which `qst-serve` runs too): prefilled alone into a decode slot, then decoded
with the other slots, one backbone pass per token; QST side networks are
gathered per row from a stack (`SideStore`), so rows naming different side
networks decode together.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from qst_jax.errors import QSTError
from qst_jax.data.examples import CHAT_ROLES
from qst_jax.generate.engine import Engine, EngineError, Request
from qst_jax.generate.sampling import SamplingConfig
from qst_jax.generate.side_store import SideStore
from qst_jax.methods import FrozenModel
from qst_jax.methods.side_set import SideSet
from qst_jax.models.backbone import Backbone


TUNED = "tuned"  # the one side network of `Generator(..., tuned=(a QSTModel, params))`


class GenerationError(QSTError, ValueError):
    """Bad generation input (prompt too long, unknown chat role, ...)."""


def unicode_text(text: str, where: str) -> str:
    """`text` when it is valid Unicode; a lone surrogate (what JSON's `\\ud800` decodes to) is refused.

    Raises:
      GenerationError: naming `where` and the surrogate's position.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise GenerationError(f"{where}: not valid Unicode text (a lone surrogate {text[err.start]!r} at "
                              f"character {err.start})") from None
    return text


def _message_text(content: Any, where: str) -> str:
    """A message's content as text: a string, or OpenAI's list of text parts (`{"type": "text", "text": ...}`)."""
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            if kind != "text" or not isinstance(part.get("text"), str):
                raise GenerationError(f"{where}[{i}]: only text parts ({{'type': 'text', 'text': ...}}) are "
                                      f"served, not {kind!r}")
            texts.append(part["text"])
        content = "".join(texts)
    if not isinstance(content, str):
        raise GenerationError(f"{where}: must be a string or a list of text parts")
    return unicode_text(content, where)


def render_chat(tokenizer: Any, messages: Sequence[dict[str, Any]]) -> list[int]:
    """The prompt ids of a conversation through the tokenizer's chat template, ready for the assistant's turn.

    Each message is `{"role", "content"}`; content is a string or a list of text parts (joined).

    Raises:
      GenerationError: naming the message (`messages[i].content`) for an unknown role, a non-text part or text
        that is not valid Unicode.
    """
    plain = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES:
            role = m.get("role") if isinstance(m, dict) else m
            raise GenerationError(f"unknown chat role {role!r} (known: {CHAT_ROLES})")
        plain.append({**m, "content": _message_text(m.get("content"), f"messages[{i}].content")})
    text = tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False).input_ids)


class Generator:
    """Batched, cached generation for a backbone with an optional tuned model.

    Args:
      backbone: the frozen Backbone.
      tokenizer: its tokenizer (HF).
      tuned: (a method, its params), or None for the base model.
      sides: several QST side networks, `{name: (model, params)}`; rows pick one with `side=`.
      log: where notices go (e.g. `max_new_tokens` cut by the context); None: silent.
      slots, max_len: the engine's decode slots and tokens per slot (`engine.Engine`).
    """

    def __init__(self, backbone: Backbone, tokenizer: Any, tuned: tuple[Any, Any] | None = None,
                 log: Callable[[str], None] | None = None, *, sides: Mapping[str, tuple[Any, Any]] | None = None,
                 slots: int = 8, max_len: int | None = None):
        self.backbone, self.tokenizer, self.log = backbone, tokenizer, log
        self.slots, self.max_len, self._engine = slots, max_len, None
        self._sides = dict(sides or {})
        self.cfg, self.dtype = backbone.cfg, backbone.dtype
        self.model, self.params = tuned if tuned is not None else (FrozenModel(backbone.cfg, backbone.dtype), {})
        self.side_names: list[str] = []
        if sides:
            if tuned is not None:
                raise GenerationError("give either tuned= (one model) or sides= (several), not both")
            side_set = SideSet.of([model for model, _ in sides.values()], names=list(sides))  # QST, one backbone
            self.side_names = list(sides)
            self.model, self.params = None, None  # each request names its side network; the engine's store holds them
        if (side_set.task if sides else self.model.task) != "lm":
            raise GenerationError("a classification model cannot generate text")

    # -- prompts -----------------------------------------------------------------
    def check_sides(self, side: Sequence[str | None] | None, batch: int) -> None:
        """Raises GenerationError unless `side` names one known side network (or None: the base model) per row."""
        if not self.side_names:
            if side is not None and any(s is not None for s in side):
                raise GenerationError(f"side {next(s for s in side if s is not None)!r}: this generator has no "
                                      "named side networks (give sides=)")
            return
        if side is not None and len(side) != batch:
            raise GenerationError(f"{len(side)} side names for {batch} prompts")
        for s in side or ():
            if s is not None and s not in self.side_names:
                raise GenerationError(f"side {s!r} is not one of {self.side_names} (or None: the base model)")

    def render_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        return render_chat(self.tokenizer, messages)

    # -- generation --------------------------------------------------------------
    def engine(self) -> Engine:
        """The decoding engine behind `generate_ids` (built once): `slots` rows, continuous batching."""
        if self._engine is None:
            if self.side_names or self.model.name in ("qst", "frozen"):
                sides = self._sides if self.side_names else (
                    {TUNED: (self.model, self.params)} if self.model.name == "qst" else {})
                store = SideStore(self.cfg, sides, capacity=max(len(sides), 1), dtype=self.dtype)
                self._engine = Engine(self.backbone, self.tokenizer, slots=self.slots, max_len=self.max_len,
                                      sides=store)
            else:  # QLoRA and other methods: the same slots, one model for all
                self._engine = Engine(self.backbone, self.tokenizer, slots=self.slots, max_len=self.max_len,
                                      model=self.model, params=self.params)
        return self._engine

    def generate_ids(
        self,
        prompts: Sequence[str | Sequence[int]],
        *,
        max_new_tokens: int = 64,
        sampling: SamplingConfig = SamplingConfig(),
        seed: int = 0,
        stop_strings: Sequence[str] = (),
        eos_ids: Sequence[int] | None = None,
        on_token: Callable[[int, list[str]], None] | None = None,
        side: Sequence[str | None] | None = None,
    ) -> list[list[int]]:
        """New token ids per prompt (EOS and what follows a stop string removed); `side`: each row's side network.

        The prompts decode in the engine's slots together (more prompts than
        slots wait for a free one); `on_token(step, texts)` is called as the
        texts grow.
        """
        rows = [list(self.tokenizer(p).input_ids) if isinstance(p, str) else [int(t) for t in p] for p in prompts]
        if any(len(r) == 0 for r in rows):
            raise GenerationError("empty prompt")
        self.check_sides(side, len(rows))
        sides = [None] * len(rows) if side is None else list(side)
        if not self.side_names and self.model.name == "qst":
            sides = [TUNED] * len(rows)
        engine = self.engine()
        longest = max(len(r) for r in rows)
        context = engine.max_len
        where = "the model's context" if context == self.cfg.max_position_embeddings else "the engine's max_len"
        if longest >= context:
            raise GenerationError(f"prompt of {longest} tokens does not fit {where} of {context}")
        if max_new_tokens <= 0:
            raise GenerationError("max_new_tokens must be positive")
        max_new = min(max_new_tokens, context - longest)
        if max_new < max_new_tokens and self.log is not None:
            self.log(f"note: max_new_tokens {max_new_tokens} cut to {max_new}: the prompt has {longest} tokens and "
                     f"{where} is {context}")
        texts = [""] * len(rows)
        counter = [0]

        def grew(request: Request, _delta: str, row: int) -> None:
            texts[row] = request.text
            if on_token is not None:
                on_token(counter[0], list(texts))
                counter[0] += 1

        requests = [Request(r, side=s, max_tokens=max_new, temperature=sampling.temperature, top_k=sampling.top_k,
                            top_p=sampling.top_p, seed=seed, stop=tuple(stop_strings), eos_ids=eos_ids,
                            on_token=lambda req, d, row=i: grew(req, d, row))
                    for i, (r, s) in enumerate(zip(rows, sides))]
        try:
            engine.generate(requests)
        except EngineError as err:
            raise GenerationError(str(err)) from None
        outs = []
        for req in requests:
            ids = req.tokens
            if req.finish_reason == "stop" and stop_strings:  # drop the tokens from the stop string on
                while ids and any(s in self.tokenizer.decode(ids, skip_special_tokens=True) for s in stop_strings):
                    ids = ids[:-1]
            outs.append(ids)
        return outs

    def generate(self, prompts: Sequence[str | Sequence[int]], *, stop_strings: Sequence[str] = (), **kwargs) -> list[str]:
        """Generated text per prompt; a stop string and what follows it are cut."""
        texts = []
        for ids in self.generate_ids(prompts, stop_strings=stop_strings, **kwargs):
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            for s in stop_strings:
                if s in text:
                    text = text[: text.index(s)]
            texts.append(text)
        return texts
