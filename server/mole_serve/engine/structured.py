"""Structured output in the engine: a request's grammar (api/structured.py writes it from a JSON
schema) masks its logits so that every sampled token keeps the text inside the grammar.

llguidance does the grammar work, chosen over xgrammar and outlines-core for how it fits an online
server whose requests bring new schemas (every tool list is one): it compiles nothing ahead, so a
new schema's first mask is ready sooner (outlines-core builds a whole token index per schema
first); xgrammar's later masks are faster, but per token the difference is small next to a decode
step (bench/structured.py; the figures and the choice in docs/benchmarks.md and
docs/decisions.md). It has no dependencies (xgrammar pulls triton and tvm-ffi). Each constrained
sequence holds its own matcher; a step fills one bitmask for the constrained rows and leaves the
free rows alone, so constrained and free requests, with any adapters, share a batch.
"""

from __future__ import annotations

import llguidance
import llguidance.hf
import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from mole_serve.engine.sampler import to_device
from mole_serve.errors import InvalidRequest


class GrammarMatchers:
    """Builds one llguidance matcher per constrained request, over the engine's tokenizer (wrapped
    once, on the first constrained request, since it takes a while and only grammars need it)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, eos_token_ids: set[int]) -> None:
        self.hf_tokenizer, self.vocab_size, self.eos_token_ids = tokenizer, vocab_size, sorted(eos_token_ids)
        self._tokenizer: llguidance.LLTokenizer | None = None

    def matcher(self, grammar: str) -> llguidance.LLMatcher:
        if self._tokenizer is None:
            self._tokenizer = llguidance.hf.from_tokenizer(
                self.hf_tokenizer,  # type: ignore[arg-type]  # typed as fast only; it checks and raises itself
                n_vocab=self.vocab_size,
                eos_token=self.eos_token_ids or None,
            )
        matcher = llguidance.LLMatcher(self._tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise InvalidRequest(f"the output grammar cannot be used: {matcher.get_error()}")
        return matcher


def mask_logits(logits: torch.Tensor, matchers: list[llguidance.LLMatcher | None]) -> torch.Tensor:
    """logits: [N, V] -> the same with every token its row's grammar forbids at -inf (a new tensor
    when any row is constrained: the raw logits stay for logprobs)."""
    constrained = [m for m in matchers if m is not None]
    rows = [i for i, m in enumerate(matchers) if m is not None]
    if not rows:
        return logits
    V = logits.shape[-1]
    bitmask = torch.empty(len(rows), (V + 31) // 32, dtype=torch.int32)  # bit b of word w: token 32 w + b
    for j, matcher in enumerate(constrained):
        matcher.unsafe_compute_mask_ptr(bitmask[j].data_ptr(), bitmask.shape[1] * 4)
    # little-endian bytes unpack in token order; 0/1 bytes read as bools without a copy
    bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")[:, :V]
    allowed = to_device(torch.from_numpy(bits).view(torch.bool), logits.device)  # [R, V]
    if len(rows) == len(matchers):
        return torch.where(allowed, logits, float("-inf"))
    masked = logits.clone()
    index = to_device(rows, logits.device, torch.long)
    masked[index] = torch.where(allowed, logits[index], float("-inf"))
    return masked
