"""A completion's text, decoded incrementally: each new token decodes a short tail window, not the whole list.

    stream = TextStream(tokenizer)
    for token in tokens:
        added = stream.push(token)      # text the token completed ("" while a character is split across tokens)
    rest = stream.flush()               # at the end: whatever is still held, replacement characters included

The window starts one emitted step back (vLLM's prefix/read offsets): a
tokenizer that drops the leading space of the first token it decodes, or
joins two tokens' text, sees the same neighbour it would in the whole list,
so `stream.text` is the whole list's decoding while each token costs the
decoding of a few tokens.
"""

from __future__ import annotations

from typing import Any


class TextStream:
    """The text of a growing token list (see the module docstring).

    Attributes:
      tokens: every token pushed.
      text: the text emitted so far (the decoding of `tokens[:read]`).
    """

    def __init__(self, tokenizer: Any):
        self._decode = getattr(tokenizer, "decode", None)  # a tokenizer of ids only: no text
        self.tokens: list[int] = []
        self.text = ""
        self._prefix = 0  # the window's start: the token before the last emitted step
        self._read = 0  # tokens whose text is in `text`

    def _window(self, end: int | None) -> str:
        return self._decode(self.tokens[self._prefix : end], skip_special_tokens=True)

    def push(self, token: int) -> str:
        """Adds `token`; returns the text it completes (held back while it ends in a split character)."""
        self.tokens.append(int(token))
        if self._decode is None:
            return ""
        before = self._window(self._read)
        after = self._window(None)
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        added = after[len(before) :]
        self._prefix, self._read = self._read, len(self.tokens)
        self.text += added
        return added

    def flush(self) -> str:
        """The text of the tokens still held (a split character's replacement included); call once, at the end."""
        if self._decode is None or self._read == len(self.tokens):
            return ""
        added = self._window(None)[len(self._window(self._read)) :]
        self._prefix = self._read = len(self.tokens)
        self.text += added
        return added
