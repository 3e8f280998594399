"""Incremental text of one sequence, with stop strings: text after a stop string is never sent,
and text that might be the start of one is held back until it is decided."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

from transformers import PreTrainedTokenizerBase


class Detokenizer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: Sequence[str], min_tokens: int = 0) -> None:
        """min_tokens: as vLLM, no stop string is looked for before that many tokens are out, and
        one that ended before the last of them does not count (`unchecked`: that text's length)."""
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.min_tokens, self.unchecked = min_tokens, 0
        self.text = ""
        self.emitted = 0

    def update(self, output_ids: list[int]) -> tuple[str, bool]:
        """Returns (new text to send, whether a stop string ended the output)."""
        # Re-decoding the whole output is simple and cheap at these lengths; it keeps multi-token
        # characters and tokenizer-specific spacing right.
        text = cast(str, self.tokenizer.decode(output_ids, skip_special_tokens=True))  # one id list: one string
        search_from = max(0, self.emitted - self.hold)
        if len(output_ids) < self.min_tokens:
            self.unchecked = len(text)
            hits = []
        else:
            starts = [max(search_from, self.unchecked - len(stop) + 1) for stop in self.stop]
            hits = [at for at in (text.find(stop, i) for stop, i in zip(self.stop, starts)) if at != -1]
        if hits:
            self.text = text[: min(hits)]
            return self.flush(), True
        self.text = text
        safe = len(text) - self.hold
        if text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for its other bytes
            safe = min(safe, len(text) - 1)
        if safe <= self.emitted:
            return "", False
        delta = text[self.emitted : safe]
        self.emitted = safe
        return delta, False

    def flush(self) -> str:
        delta = self.text[self.emitted :]
        self.emitted = len(self.text)
        return delta
