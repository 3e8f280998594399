"""The engine: requests in, tokens and text out. LLMEngine is the synchronous core (add, step,
abort); async_engine.AsyncEngine drives its step loop from a thread of its own."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from server.config import Settings
from server.engine.detokenizer import Detokenizer
from server.engine.kv_cache import KVCache
from server.engine.loader import resolve_base_model
from server.engine.model import DecoderModel
from server.engine.request import AdapterRef, FinishReason, SamplingParams, Selection, Sequence
from server.engine.runner import ModelRunner
from server.engine.scheduler import Scheduler
from server.engine.selection import AdapterSelector, SelectionError
from server.lora.formats import LoRAWeights
from server.lora.gate import GATE_DIR, GateConfig, MoLEGate
from server.lora.pool import LoRAPool
from server.lora.store import adapter_dirs, read_card


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
    error_status: int = 500  # the HTTP status the error maps to
    adapters: list[dict] | None = None  # the adapter report, on a request's first and last output
    gate_entropy: float | None = None  # on the last output of a gated request


class LLMEngine:
    def __init__(self, model: DecoderModel, tokenizer: PreTrainedTokenizerBase, settings: Settings) -> None:
        self.model, self.tokenizer, self.settings = model, tokenizer, settings
        self.max_model_len = min(settings.max_model_len, model.max_positions)
        self.kv = KVCache(model.num_layers, settings.max_num_seqs, model.num_kv_heads, self.max_model_len,
                          model.head_dim, model.dtype, model.device)
        self.pool = LoRAPool(model.lora_spec(), settings.max_loras, settings.max_cpu_loras, settings.max_lora_rank,
                             model.device, model.dtype, gather_cache_bytes=settings.lora_gather_cache_mb << 20)
        self.scheduler = Scheduler(settings.max_num_seqs, settings.max_num_batched_tokens,
                                   self._acquire_adapters, self._release_adapters)
        self.runner = ModelRunner(model, self.kv, self.pool)
        self.eos_token_ids = {tokenizer.eos_token_id} - {None}
        self.model_name = Path(model.config.name_or_path or "base").name
        self._seqs: dict[str, Sequence] = {}
        self.last_batch_size = 0
        self._detok: dict[str, Detokenizer] = {}
        self.adapter_usage: Counter[str] = Counter()  # requests served per adapter
        self.selector = AdapterSelector(self.pool, settings)
        self._unresolved: list[Sequence] = []  # added since the last step, adapters still to choose

    @classmethod
    def from_settings(cls, settings: Settings) -> LLMEngine:
        path = resolve_base_model(settings)
        device = torch.device(settings.device)
        model = DecoderModel.from_pretrained(path, device, getattr(torch, settings.torch_dtype_name()))
        return cls(model, AutoTokenizer.from_pretrained(path), settings)

    @classmethod
    def from_store(cls, settings: Settings, with_gate: bool = True) -> LLMEngine:
        """The base model, every adapter of settings.adapters_dir indexed for retrieval, and the
        trained gate in its gate/ folder if there is one."""
        from server.lora.retriever import Embedder, Retriever

        engine = cls.from_settings(settings)
        if settings.served_model_name:
            engine.model_name = settings.served_model_name
        engine.retriever = Retriever(Embedder.from_settings(settings), exact_max=settings.retrieval_exact_max)
        cards = {}
        for name, path in adapter_dirs(settings.adapters_dir).items():
            engine.pool.register(name, path)
            cards[name] = read_card(path).get("examples")
        engine.retriever.set_cards({name: ex for name, ex in cards.items() if ex})  # one embedding batch
        gate_dir = Path(settings.adapters_dir) / GATE_DIR
        if with_gate and gate_dir.is_dir():
            engine.load_gate(gate_dir)
        return engine

    def load_gate(self, folder: Path) -> None:
        """Attach a trained router (refused if it was trained for another base model)."""
        base = Path(self.model.config.name_or_path or "base").name
        self.pool.attach_gate(MoLEGate.load(folder, GateConfig.for_base(base, self.model.lora_spec())))

    # --- adapters ---
    @property
    def retriever(self):  # server.lora.retriever.Retriever | None: enables model `auto`
        return self.selector.retriever

    @retriever.setter
    def retriever(self, retriever) -> None:
        self.selector.retriever = retriever

    def add_adapter(self, name: str, path: Path, weights: LoRAWeights | None = None,
                    key: np.ndarray | None = None) -> LoRAWeights:
        """Validate and register an adapter folder; with a retriever, index its card's examples.
        An upload passes the weights it parsed from that folder's files and its card's key [dim],
        both computed off the step thread, so the step loop only updates tables."""
        weights = self.pool.register(name, path, weights)
        if self.retriever is None:
            return weights
        if key is not None:
            self.retriever.set_key(name, key)
        elif examples := read_card(path).get("examples"):
            self.retriever.set_card(name, examples)
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
        request_id: str | None = None, selection: Selection | None = None,
    ) -> Sequence:
        """Validate a request without touching engine state (safe from any thread). Either a final
        adapter set (`adapters`, weights as given) or a `selection` the engine resolves."""
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens; the context window is {self.max_model_len}")
        refs = self._merge_duplicates(selection.explicit if selection else adapters)
        if selection is not None:
            if selection.composition == "gate" and self.pool.gate is None:
                raise ValueError("composition `gate` needs a trained gate (adapters_store/gate); none is loaded")
            if selection.top_k > self.adapter_limit:
                raise ValueError(f"top_k {selection.top_k} is over the limit of {self.adapter_limit} per request")
            selection = Selection(selection.composition, refs, selection.query, selection.top_k, selection.merge)
            refs = ()
        kwargs = {"request_id": request_id} if request_id else {}
        return Sequence(list(prompt_ids), sampling, refs, selection=selection, **kwargs)

    @property
    def adapter_limit(self) -> int:
        return min(self.settings.max_adapters_per_request, self.settings.max_loras)

    def _merge_duplicates(self, adapters: Seq[AdapterRef]) -> tuple[AdapterRef, ...]:
        if len(adapters) > self.adapter_limit:
            raise ValueError(f"{len(adapters)} adapters requested; at most {self.adapter_limit} per request")
        merged: dict[str, float] = {}
        for a in adapters:
            if a.name not in self.pool:
                raise KeyError(f"unknown adapter {a.name!r}")
            merged[a.name] = merged.get(a.name, 0.0) + a.weight
        return tuple(AdapterRef(n, w) for n, w in merged.items())

    def add_sequence(self, seq: Sequence) -> None:
        self._seqs[seq.request_id] = seq
        self._detok[seq.request_id] = Detokenizer(self.tokenizer, seq.sampling.stop)
        if seq.selection is not None:
            self._unresolved.append(seq)
        self.scheduler.add(seq)

    def add_request(self, prompt_ids: list[int], sampling: SamplingParams, adapters: Seq[AdapterRef] = (),
                    request_id: str | None = None, selection: Selection | None = None) -> Sequence:
        seq = self.make_sequence(prompt_ids, sampling, adapters, request_id, selection)
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
        outputs = self._resolve_selections()
        batch = self.scheduler.schedule()
        self.last_batch_size = len(batch.scheduled)
        if not batch:
            return outputs
        tokens = iter(self.runner.run(batch))
        for s in batch.scheduled:
            samples = s.samples
            s.seq.num_computed += s.num_tokens
            if samples:
                outputs.append(self._append(s.seq, next(tokens)))
        return outputs

    def fail_running(self, error: str) -> list[StepOutput]:
        return [self._finish(seq, FinishReason.ABORT, None, "", error) for seq in list(self.scheduler.running)]

    def generate(self, prompts: list[list[int]], sampling: SamplingParams,
                 adapters: list[Seq[AdapterRef]] | None = None,
                 selections: list[Selection | None] | None = None) -> list[Sequence]:
        """Run prompts to completion in one continuous batch (tests, benchmarks, evaluation)."""
        seqs = [self.add_request(p, sampling, adapters[i] if adapters else (), None,
                                 selections[i] if selections else None) for i, p in enumerate(prompts)]
        while self.has_unfinished():
            self.step()
        return seqs

    # --- internals ---
    def _resolve_selections(self) -> list[StepOutput]:
        """Choose the adapters of the requests added since the last step (one retrieval batch), and
        end the waiting requests whose adapter was deleted while they waited."""
        outputs = []
        for seq in list(self.scheduler.waiting):
            gone = [a.name for a in seq.adapters if a.name not in self.pool]
            if gone:
                outputs.append(self._finish(seq, FinishReason.ABORT, None, "",
                                            f"The adapter `{gone[0]}` was deleted.", 404))
        seqs, self._unresolved = [s for s in self._unresolved if not s.is_finished], []
        if not seqs:
            return outputs
        try:
            hits = self.selector.retrieve(seqs)
        except Exception as e:  # the embedder failed: these requests fail, the engine goes on
            return outputs + [self._finish(s, FinishReason.ABORT, None, "", f"adapter retrieval failed: {e}")
                              for s in seqs]
        for seq in seqs:
            try:
                self.selector.apply(seq, hits.get(seq.request_id, []))
            except SelectionError as e:
                outputs.append(self._finish(seq, FinishReason.ABORT, None, "", str(e), e.status))
                continue
            self.adapter_usage.update(seq.sources or [a.name for a in seq.adapters])
        return outputs

    def _append(self, seq: Sequence, token: int) -> StepOutput:
        seq.token_ids.append(token)
        p = seq.sampling
        delta, stopped = self._detok[seq.request_id].update(seq.output_ids)
        if stopped or not p.ignore_eos and token in self.eos_token_ids or token in p.stop_token_ids:
            return self._finish(seq, FinishReason.STOP, token, delta)
        if len(seq.output_ids) >= p.max_tokens or len(seq.token_ids) >= self.max_model_len:
            return self._finish(seq, FinishReason.LENGTH, token, delta)
        report = self.selector.report(seq) if len(seq.output_ids) == 1 else None
        return StepOutput(seq.request_id, token, delta, False, None, seq.num_prompt_tokens, len(seq.output_ids),
                          adapters=report)

    def _finish(self, seq: Sequence, reason: FinishReason, token: int | None, delta: str,
                error: str | None = None, error_status: int = 500) -> StepOutput:
        self.scheduler.finish(seq, reason)
        self.runner.release(seq)
        del self._seqs[seq.request_id]
        delta += self._detok.pop(seq.request_id).flush()
        return StepOutput(seq.request_id, token, delta, True, reason, seq.num_prompt_tokens,
                          len(seq.output_ids), error, error_status, self.selector.report(seq),
                          self.selector.gate_entropy(seq))

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
