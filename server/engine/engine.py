"""The engine: requests in, tokens and text out. LLMEngine is the synchronous core (add, step,
abort); async_engine.AsyncEngine drives its step loop from a thread of its own."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from server.config import Settings
from server.engine.detokenizer import Detokenizer
from server.engine.kv_cache import KVCache
from server.engine.loader import resolve_base_model
from server.engine.model import DecoderModel
from server.engine.request import AdapterRef, FinishReason, SamplingParams, Sequence
from server.engine.runner import ModelRunner
from server.engine.scheduler import Scheduler
from server.lora.formats import LoRAWeights
from server.lora.pool import LoRAPool
from server.lora.store import read_card


@dataclass
class StepOutput:
    request_id: str
    token_id: int | None  # None when the output only reports an end (abort, error)
    text: str  # new text since the last output
    finished: bool
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_output_tokens: int
    error: str | None = None


class LLMEngine:
    def __init__(self, model: DecoderModel, tokenizer: PreTrainedTokenizerBase, settings: Settings) -> None:
        self.model, self.tokenizer, self.settings = model, tokenizer, settings
        self.max_model_len = min(settings.max_model_len, model.max_positions)
        self.kv = KVCache(model.num_layers, settings.max_num_seqs, model.num_kv_heads, self.max_model_len,
                          model.head_dim, model.dtype, model.device)
        self.pool = LoRAPool(model.lora_spec(), settings.max_loras, settings.max_cpu_loras,
                             settings.max_lora_rank, model.device, model.dtype)
        self.scheduler = Scheduler(settings.max_num_seqs, settings.max_num_batched_tokens,
                                   self._acquire_adapters, self._release_adapters)
        self.runner = ModelRunner(model, self.kv, self.pool)
        self.eos_token_ids = {tokenizer.eos_token_id} - {None}
        self.model_name = Path(model.config.name_or_path or "base").name
        self._seqs: dict[str, Sequence] = {}
        self.last_batch_size = 0
        self._detok: dict[str, Detokenizer] = {}
        self.retriever = None  # set by attach_retriever: enables model `auto`
        self.adapter_usage: Counter[str] = Counter()  # requests served per adapter

    @classmethod
    def from_settings(cls, settings: Settings) -> LLMEngine:
        path = resolve_base_model(settings)
        device = torch.device(settings.device)
        model = DecoderModel.from_pretrained(path, device, getattr(torch, settings.torch_dtype_name()))
        return cls(model, AutoTokenizer.from_pretrained(path), settings)

    # --- adapters ---
    def add_adapter(self, name: str, path: Path) -> LoRAWeights:
        """Validate and register an adapter folder; with a retriever, index its card's examples."""
        weights = self.pool.register(name, path)
        card = read_card(path)
        if self.retriever is not None and card.get("examples"):
            self.retriever.set_card(name, card["examples"])
        return weights

    def remove_adapter(self, name: str) -> None:
        """New requests stop selecting it at once; sequences running on it finish first."""
        if self.retriever is not None:
            self.retriever.remove(name)
        self.pool.unregister(name)

    def set_card(self, name: str, examples: list[str]) -> None:
        """Recompute the retrieval key of an adapter from new card examples."""
        if self.retriever is not None:
            self.retriever.set_card(name, examples)

    # --- requests ---
    def make_sequence(
        self, prompt_ids: list[int], sampling: SamplingParams, adapters: Seq[AdapterRef] = (),
        request_id: str | None = None,
    ) -> Sequence:
        """Validate a request without touching engine state (safe from any thread)."""
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens; the context window is {self.max_model_len}")
        limit = min(self.settings.max_adapters_per_request, self.settings.max_loras)
        if len(adapters) > limit:
            raise ValueError(f"{len(adapters)} adapters requested; at most {limit} per request")
        merged: dict[str, float] = {}
        for a in adapters:
            if a.name not in self.pool:
                raise KeyError(f"unknown adapter {a.name!r}")
            merged[a.name] = merged.get(a.name, 0.0) + a.weight
        refs = tuple(AdapterRef(n, w) for n, w in merged.items())
        kwargs = {"request_id": request_id} if request_id else {}
        return Sequence(list(prompt_ids), sampling, refs, **kwargs)

    def add_sequence(self, seq: Sequence) -> None:
        self._seqs[seq.request_id] = seq
        self._detok[seq.request_id] = Detokenizer(self.tokenizer, seq.sampling.stop)
        self.scheduler.add(seq)

    def add_request(self, prompt_ids: list[int], sampling: SamplingParams, adapters: Seq[AdapterRef] = (),
                    request_id: str | None = None) -> Sequence:
        seq = self.make_sequence(prompt_ids, sampling, adapters, request_id)
        self.add_sequence(seq)
        return seq

    def abort(self, request_id: str, error: str | None = None) -> StepOutput | None:
        seq = self._seqs.get(request_id)
        if seq is None:
            return None
        return self._finish(seq, FinishReason.ABORT, None, "", error)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[StepOutput]:
        batch = self.scheduler.schedule()
        self.last_batch_size = len(batch.scheduled)
        if not batch:
            return []
        tokens = iter(self.runner.run(batch))
        outputs = []
        for s in batch.scheduled:
            samples = s.samples
            s.seq.num_computed += s.num_tokens
            if samples:
                outputs.append(self._append(s.seq, next(tokens)))
        return outputs

    def fail_running(self, error: str) -> list[StepOutput]:
        return [self._finish(seq, FinishReason.ABORT, None, "", error) for seq in list(self.scheduler.running)]

    def generate(self, prompts: list[list[int]], sampling: SamplingParams,
                 adapters: list[Seq[AdapterRef]] | None = None) -> list[Sequence]:
        """Run prompts to completion in one continuous batch (tests, benchmarks, evaluation)."""
        seqs = [self.add_request(p, sampling, adapters[i] if adapters else ()) for i, p in enumerate(prompts)]
        while self.has_unfinished():
            self.step()
        return seqs

    # --- internals ---
    def _append(self, seq: Sequence, token: int) -> StepOutput:
        seq.token_ids.append(token)
        p = seq.sampling
        delta, stopped = self._detok[seq.request_id].update(seq.output_ids)
        if stopped or not p.ignore_eos and token in self.eos_token_ids or token in p.stop_token_ids:
            return self._finish(seq, FinishReason.STOP, token, delta)
        if len(seq.output_ids) >= p.max_tokens or len(seq.token_ids) >= self.max_model_len:
            return self._finish(seq, FinishReason.LENGTH, token, delta)
        return StepOutput(seq.request_id, token, delta, False, None, seq.num_prompt_tokens, len(seq.output_ids))

    def _finish(self, seq: Sequence, reason: FinishReason, token: int | None, delta: str,
                error: str | None = None) -> StepOutput:
        self.scheduler.finish(seq, reason)
        self.runner.release(seq)
        del self._seqs[seq.request_id]
        delta += self._detok.pop(seq.request_id).flush()
        return StepOutput(seq.request_id, token, delta, True, reason, seq.num_prompt_tokens,
                          len(seq.output_ids), error)

    def _acquire_adapters(self, seq: Sequence) -> bool:
        if not seq.adapters:
            return True
        slots = self.pool.acquire([a.name for a in seq.adapters])
        if slots is None:
            return False
        seq.lora_slots = tuple(slots)
        return True

    def _release_adapters(self, seq: Sequence) -> None:
        if seq.lora_slots:
            self.pool.release(seq.lora_slots)
            seq.lora_slots = ()
