"""KV-cached decoding through the backbone and, optionally, a tuned model.

A prompt batch is left-padded to one length P. Prefill runs the whole prompt
once and fills preallocated caches of length P + max_new_tokens (the
backbone's, and the side network's next to it: they share positions and the
mask); each decode step then runs one token through every layer. Both passes
are jitted; the decode step has one static shape for the whole generation.

    gen = Generator(backbone, tokenizer)                     # the base model
    gen = Generator(backbone, tokenizer, tuned=(model, params))  # any method (QST, QLoRA, ...)
    texts = gen.generate(["The capital of France is"], max_new_tokens=8)

    gen = Generator(backbone, tokenizer, sides={"a": (model_a, params_a), "b": (model_b, params_b)})
    texts = gen.generate([p1, p2, p3], side=["a", None, "b"])   # None: the base model

With `sides` (QST side networks), every row names its side network and all
rows decode together, one backbone pass per token (`methods.RoutedSides`).

The model is used only through the method interface (`qst_jax.methods.Method`):
`init_caches`, `hidden` with caches, and `head`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qst_jax.data.examples import CHAT_ROLES, pad_id
from qst_jax.generate.sampling import SamplingConfig, sample
from qst_jax.methods import FrozenModel
from qst_jax.methods.side_set import RoutedSides, SideSet
from qst_jax.models.layers import Params, positions_from_mask
from qst_jax.models.loader import Backbone


class GenerationError(ValueError):
    """Bad generation input (prompt too long, unknown chat role, ...)."""


class Generator:
    """Batched, cached generation for a backbone with an optional tuned model.

    Args:
      backbone: the frozen Backbone.
      tokenizer: its tokenizer (HF).
      tuned: (a method, its params), or None for the base model.
      sides: several QST side networks, `{name: (model, params)}`; rows pick one with `side=`.
      log: where notices go (e.g. `max_new_tokens` cut by the context); None: silent.
    """

    def __init__(self, backbone: Backbone, tokenizer: Any, tuned: tuple[Any, Any] | None = None,
                 log: Callable[[str], None] | None = None, *, sides: Mapping[str, tuple[Any, Any]] | None = None):
        self.backbone, self.tokenizer, self.log = backbone, tokenizer, log
        self.cfg, self.dtype = backbone.cfg, backbone.dtype
        self.model, self.params = tuned if tuned is not None else (FrozenModel(backbone.cfg, backbone.dtype), {})
        self.side_names: list[str] = []
        if sides:
            if tuned is not None:
                raise GenerationError("give either tuned= (one model) or sides= (several), not both")
            side_set = SideSet.of([model for model, _ in sides.values()])
            self.side_names = list(sides)
            self.model = RoutedSides(side_set)
            self.params = {"sides": side_set.stack([params for _, params in sides.values()])}
        if self.model.task != "lm":
            raise GenerationError("a classification model cannot generate text")
        self._step = jax.jit(self._pass, static_argnames=("last_only",))

    # -- the model pass ----------------------------------------------------------
    def _pass(self, backbone_params, params, ids, token_mask, positions, key_mask, caches, cache_index, last_only=True):
        hidden, caches = self.model.hidden(
            params, backbone_params, ids, token_mask, positions=positions, key_mask=key_mask, caches=caches,
            cache_index=cache_index,
        )
        if last_only:
            hidden = hidden[:, -1:]
        return self.model.head(params, backbone_params, hidden, token_mask), caches

    def full_logits(self, ids: np.ndarray, mask: np.ndarray, side: Sequence[str | None] | None = None) -> jax.Array:
        """Uncached float32 logits `[B, T, V]` of the same model (the test oracle)."""
        ids, mask = jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)
        logits, _ = jax.jit(self._pass, static_argnames=("last_only",))(
            self.backbone.params, self._routed(side, len(ids)), ids, mask, positions_from_mask(mask), mask, None,
            None, last_only=False,
        )
        return logits

    def _routed(self, side: Sequence[str | None] | None, batch: int) -> Any:
        """The params for a batch whose row i goes through side network `side[i]` (None: the base model)."""
        if not self.side_names:
            if side is not None and any(s is not None for s in side):
                raise GenerationError(f"side {next(s for s in side if s is not None)!r}: this generator has no "
                                      "named side networks (give sides=)")
            return self.params
        side = [None] * batch if side is None else list(side)
        if len(side) != batch:
            raise GenerationError(f"{len(side)} side names for {batch} prompts")
        for s in side:
            if s is not None and s not in self.side_names:
                raise GenerationError(f"side {s!r} is not one of {self.side_names} (or None: the base model)")
        route = [-1 if s is None else self.side_names.index(s) for s in side]
        return {**self.params, "route": jnp.asarray(route, jnp.int32)}

    # -- prompts -----------------------------------------------------------------
    def encode(self, prompts: Sequence[str | Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Left-padded ids and mask `[B, P]`."""
        rows = [
            list(self.tokenizer(p).input_ids) if isinstance(p, str) else [int(t) for t in p] for p in prompts
        ]
        if any(len(r) == 0 for r in rows):
            raise GenerationError("empty prompt")
        length = max(len(r) for r in rows)
        ids = np.full((len(rows), length), pad_id(self.tokenizer), np.int32)
        mask = np.zeros((len(rows), length), np.int32)
        for i, r in enumerate(rows):
            ids[i, length - len(r) :] = r
            mask[i, length - len(r) :] = 1
        return ids, mask

    def render_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        for m in messages:
            if m.get("role") not in CHAT_ROLES:
                raise GenerationError(f"unknown chat role {m.get('role')!r} (known: {CHAT_ROLES})")
        text = self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    # -- generation --------------------------------------------------------------
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
        """New token ids per prompt (EOS and what follows a stop string removed); `side`: each row's side network."""
        ids, mask = self.encode(prompts)
        params = self._routed(side, len(ids))
        batch, p = ids.shape
        context = self.cfg.max_position_embeddings
        if p >= context:
            raise GenerationError(f"prompt of {p} tokens does not fit the model's context of {context}")
        if max_new_tokens <= 0:
            raise GenerationError("max_new_tokens must be positive")
        max_new = min(max_new_tokens, context - p)
        if max_new < max_new_tokens and self.log is not None:
            self.log(f"note: max_new_tokens {max_new_tokens} cut to {max_new}: the prompt has {p} tokens and the "
                     f"model's context is {context}")
        length = p + max_new
        if eos_ids is None:
            eos = self.cfg.eos_token_id if self.cfg.eos_token_id is not None else self.tokenizer.eos_token_id
            eos_ids = list(eos) if isinstance(eos, tuple | list) else ([eos] if eos is not None else [])
        key_mask = np.zeros((batch, length), np.int32)
        key_mask[:, :p] = mask
        caches = self.model.init_caches(batch, length)
        positions = np.maximum(np.cumsum(mask, -1) - 1, 0).astype(np.int32)
        logits, caches = self._step(
            self.backbone.params, params, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(positions),
            jnp.asarray(key_mask), caches, jnp.int32(0),
        )
        key = jax.random.PRNGKey(seed)
        lengths = mask.sum(-1)
        out = [[] for _ in range(batch)]
        done = np.zeros(batch, bool)
        for i in range(max_new):
            key, sub = jax.random.split(key)
            token = np.asarray(sample(logits[:, -1], sub, sampling))
            for b in range(batch):
                if not done[b]:
                    if token[b] in eos_ids:
                        done[b] = True
                    else:
                        out[b].append(int(token[b]))
            if stop_strings:
                for b in range(batch):
                    if not done[b] and any(s in self.tokenizer.decode(out[b]) for s in stop_strings):
                        done[b] = True
            if on_token is not None:
                on_token(i, [self.tokenizer.decode(o) for o in out])
            if done.all() or i == max_new - 1:
                break
            key_mask[:, p + i] = 1
            logits, caches = self._step(
                self.backbone.params, params, jnp.asarray(token[:, None]), jnp.ones((batch, 1), jnp.int32),
                jnp.asarray((lengths + i)[:, None].astype(np.int32)), jnp.asarray(key_mask), caches,
                jnp.int32(p + i),
            )
        return out

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
