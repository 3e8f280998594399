"""The engine: requests in, tokens and text out. LLMEngine is the synchronous core (add, step,
abort); async_engine.AsyncEngine drives its step loop from a thread of its own."""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from transformers import PreTrainedTokenizerBase

from mole_serve.config import Settings
from mole_serve.engine.block_manager import BlockManager
from mole_serve.engine.detokenizer import Detokenizer
from mole_serve.engine.kv_cache import KVCache
from mole_serve.engine.model import DecoderModel
from mole_serve.engine.request import FinishReason, Logprob, SamplingParams, Sequence, StepOutput
from mole_serve.engine.runner import ModelRunner
from mole_serve.engine.scheduler import Scheduler
from mole_serve.engine.structured import GrammarMatchers
from mole_serve.errors import AdapterNotFound, EngineFailure, InvalidRequest, MoleError
from mole_serve.input_forms import set_input_form
from mole_serve.lora.backends import create_backend
from mole_serve.lora.gate import MoLEGate
from mole_serve.lora.kinds.base import AdapterWeights
from mole_serve.lora.pool import LoRAPool
from mole_serve.routing.selection import AdapterSelector
from mole_serve.routing.types import AdapterRef, Chosen, Selection

if TYPE_CHECKING:
    from mole_serve.routing.retriever import Retriever


logger = logging.getLogger(__name__)


class AdapterSource(Protocol):
    """What the engine needs of the adapter library (library/catalog.py is one): which adapters
    exist now, their weights, and the input form each reads. Safe to call from the step thread."""

    def __contains__(self, name: object) -> bool: ...

    def load(self, name: str) -> AdapterWeights: ...  # raises if it does not exist

    def input_form(self, name: str) -> str: ...


@dataclass
class StepResult:
    outputs: list[StepOutput]
    batch_size: int  # sequences in the step's forward (0: nothing ran)


def kv_pool_blocks(settings: Settings, model: DecoderModel, max_model_len: int) -> int:
    """How many KV blocks the pool holds (Settings.kv_cache_mb / num_kv_blocks)."""
    per_block = KVCache.bytes_per_block(
        model.num_layers, settings.kv_block_size, model.num_kv_heads, model.head_dim, model.dtype
    )
    if settings.num_kv_blocks:
        num_blocks = settings.num_kv_blocks
    elif settings.kv_cache_mb:
        num_blocks = (settings.kv_cache_mb << 20) // per_block
    elif model.device.type == "cuda":
        num_blocks = int(settings.kv_cache_fraction * torch.cuda.mem_get_info(model.device)[0]) // per_block
    else:
        num_blocks = (2048 << 20) // per_block
    needed = -(-max_model_len // settings.kv_block_size)
    if num_blocks < needed:
        raise ValueError(
            f"the KV pool holds {num_blocks} blocks of {settings.kv_block_size} tokens; one sequence "
            f"of max_model_len {max_model_len} needs {needed}: raise kv_cache_mb"
        )
    return num_blocks


class LLMEngine:
    def __init__(
        self,
        model: DecoderModel,
        tokenizer: PreTrainedTokenizerBase,
        settings: Settings,
        adapters: AdapterSource,
        retriever: Retriever | None = None,
    ) -> None:
        """adapters: the library the engine serves from (it reads, never changes it); retriever:
        enables model `auto` (None: `auto` is the base model)."""
        self.model, self.tokenizer, self.settings, self.adapters = model, tokenizer, settings, adapters
        self.max_model_len = min(settings.max_model_len, model.max_positions)
        self.model_name = settings.served_model_name or Path(model.config.name_or_path or "base").name
        num_blocks = kv_pool_blocks(settings, model, self.max_model_len)
        self.kv = KVCache(
            model.num_layers,
            num_blocks + 1,  # the last: the scratch block a static decode step's padding rows write
            settings.kv_block_size,
            model.num_kv_heads,
            model.head_dim,
            model.dtype,
            model.device,
        )
        self.pool = LoRAPool(
            model.lora_spec(),
            settings.max_loras,
            settings.max_cpu_loras,
            model.device,
            model.dtype,
            adapters.load,
            settings.eviction_policy,
        )
        backend = create_backend(settings.lora_backend, cache_bytes=settings.lora_gather_cache_mb << 20)
        self.eos_token_ids = {tokenizer.eos_token_id} - {None}
        self.runner = ModelRunner(model, self.kv, self.pool, backend, settings.lora_native_blocks, self.eos_token_ids)
        if model.device.type == "cuda" and settings.cuda_graphs:
            self.use_static_decode(cuda_graphs=True)
        blocks = BlockManager(num_blocks, settings.kv_block_size, settings.enable_prefix_caching)
        self.scheduler = Scheduler(
            blocks,
            settings.max_num_seqs,
            settings.max_prefill_tokens,
            self._acquire_adapters,
            self._release_adapters,
            self.runner.row_group,
        )
        # bumped when an adapter's weights (or the gate) change: cached KV of the old ones must not serve
        self._versions: Counter[str] = Counter()
        self._gate_version = 0
        self.grammars = GrammarMatchers(tokenizer, model.config.vocab_size, self.eos_token_ids)
        self._seqs: dict[str, Sequence] = {}
        self._detok: dict[str, Detokenizer] = {}
        self.adapter_usage: Counter[str] = Counter()  # requests served per adapter
        self.selector = AdapterSelector(settings, self.is_known, self.pool)
        self.selector.retriever = retriever
        if retriever is not None and settings.retrieval_top_k > self.adapter_limit:
            logger.warning(
                "MOLE_RETRIEVAL_TOP_K (%d) is over the adapters one request may run (%d, the smaller of "
                "MOLE_MAX_ADAPTERS_PER_REQUEST and MOLE_MAX_LORAS): `auto` requests that retrieve are refused "
                "unless they send a smaller retrieval_top_k",
                settings.retrieval_top_k,
                self.adapter_limit,
            )
        # added since the last step, adapters still to choose: (sequence, its selection)
        self._unresolved: list[tuple[Sequence, Selection]] = []

    def attach_gate(self, gate: MoLEGate) -> None:
        """Serve with a trained router from now on (library/artifacts.load_gate checks its base)."""
        self.pool.attach_gate(gate)
        self._gate_version += 1

    # --- adapters (run in the step thread) ---
    def use_static_decode(self, cuda_graphs: bool) -> None:
        """Decode-only steps on persistent inputs (engine/decode_step.py), as CUDA graphs when
        cuda_graphs and the model is on CUDA; on CPU the same step runs eagerly (tests)."""
        settings = self.settings
        self.runner.use_static_decode(
            settings.max_num_seqs,
            self.adapter_limit,
            -(-self.max_model_len // settings.kv_block_size),
            self.kv.num_blocks - 1,
            cuda_graphs,
        )

    def is_known(self, name: str) -> bool:
        """An adapter of the library, or a merge built in memory."""
        return name in self.adapters or self.pool.has_virtual(name)

    def add_adapter(self, name: str, weights: AdapterWeights) -> None:
        """Serve this version of an adapter the library registered (new or replaced) from now on."""
        self.pool.put(weights)
        self._versions[name] += 1

    def remove_adapter(self, name: str) -> None:
        """After the library dropped it: sequences running on it finish first, then its slot goes."""
        self.pool.forget(name)
        self._versions[name] += 1

    # --- requests ---
    def make_sequence(
        self,
        prompt_ids: list[int],
        sampling: SamplingParams,
        adapters: Seq[AdapterRef] = (),
        request_id: str | None = None,
        selection: Selection | None = None,
    ) -> Sequence:
        """Validate a request without touching engine state (safe from any thread). Either a final
        adapter set (`adapters`, weights as given) or a `selection` the engine resolves."""
        if len(prompt_ids) >= self.max_model_len:
            raise InvalidRequest(
                f"the prompt has {len(prompt_ids)} tokens; the context window is {self.max_model_len}",
                "messages",
                "context_length_exceeded",
            )
        refs = self._merge_duplicates(selection.explicit if selection else adapters)
        if selection is not None:
            if selection.composition == "gate" and self.pool.gate is None:
                raise InvalidRequest(
                    "composition `gate` needs a trained gate (adapters_store/gate); none is loaded", "composition"
                )
            if selection.query is not None and not selection.explicit and selection.top_k > self.adapter_limit:
                raise InvalidRequest(
                    f"retrieval_top_k {selection.top_k} is over the limit of {self.adapter_limit} per request",
                    "retrieval_top_k",
                )
            selection = dataclasses.replace(selection, explicit=refs)
            refs = ()
        elif refs:  # in-process callers name adapters directly: a mixture of experts still runs alone
            self.selector.runs_alone([r.name for r in refs], Selection("mixture", refs))
        kwargs: dict[str, Any] = {"request_id": request_id} if request_id else {}
        matcher = self.grammars.matcher(sampling.grammar) if sampling.grammar else None
        return Sequence(list(prompt_ids), sampling, Chosen(refs), selection=selection, matcher=matcher, **kwargs)

    @property
    def adapter_limit(self) -> int:
        return min(self.settings.max_adapters_per_request, self.settings.max_loras)

    def _merge_duplicates(self, adapters: Seq[AdapterRef]) -> tuple[AdapterRef, ...]:
        if len(adapters) > self.adapter_limit:
            raise InvalidRequest(
                f"{len(adapters)} adapters requested; at most {self.adapter_limit} per request", "adapters"
            )
        merged: dict[str, float] = {}
        for a in adapters:
            if not self.is_known(a.name):
                raise AdapterNotFound(f"unknown adapter {a.name!r}", "adapters")
            merged[a.name] = merged.get(a.name, 0.0) + a.weight
        return tuple(AdapterRef(n, w) for n, w in merged.items())

    def add_sequence(self, seq: Sequence, follows: str | None = None) -> None:
        """follows: the request id of an earlier choice of the same prompt (`n`), if it is still
        here: this one is admitted once that one's prompt is computed."""
        seq.leader = self._seqs.get(follows) if follows else None
        self._seqs[seq.request_id] = seq
        self._detok[seq.request_id] = Detokenizer(self.tokenizer, seq.sampling.stop, seq.sampling.min_tokens)
        if seq.selection is not None:
            self._unresolved.append((seq, seq.selection))
        self.scheduler.add(seq)

    def add_request(
        self,
        prompt_ids: list[int],
        sampling: SamplingParams,
        adapters: Seq[AdapterRef] = (),
        request_id: str | None = None,
        selection: Selection | None = None,
    ) -> Sequence:
        seq = self.make_sequence(prompt_ids, sampling, adapters, request_id, selection)
        self.add_sequence(seq)
        return seq

    def abort(self, request_id: str) -> StepOutput | None:
        seq = self._seqs.get(request_id)
        if seq is None:
            return None
        return self._finish(seq, FinishReason.ABORT, None, "")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> StepResult:
        outputs = self._resolve_selections()
        batch = self.scheduler.schedule()
        if not batch:
            return StepResult(outputs, 0)
        tokens = iter(self.runner.run(batch))
        sampling = [s.seq for s in batch.scheduled if s.samples]
        self.scheduler.advance(batch)
        outputs += [self._append(seq, *next(tokens)) for seq in sampling]
        return StepResult(outputs, len(batch.scheduled))

    def fail_running(self, error: str) -> list[StepOutput]:
        return [
            self._finish(seq, FinishReason.ABORT, None, "", EngineFailure(error))
            for seq in list(self.scheduler.running)
        ]

    def generate(
        self,
        prompts: list[list[int]],
        sampling: SamplingParams,
        adapters: list[Seq[AdapterRef]] | None = None,
        selections: list[Selection | None] | None = None,
    ) -> list[Sequence]:
        """Run prompts to completion in one continuous batch (tests, benchmarks, evaluation)."""
        seqs = [
            self.add_request(p, sampling, adapters[i] if adapters else (), None, selections[i] if selections else None)
            for i, p in enumerate(prompts)
        ]
        while self.has_unfinished():
            self.step()
        return seqs

    # --- internals ---
    def _resolve_selections(self) -> list[StepOutput]:
        """Choose the adapters of the requests added since the last step (one retrieval batch), and
        end the waiting requests whose adapter was deleted while they waited."""
        outputs = []
        for seq in list(self.scheduler.waiting):
            gone = [a.name for a in seq.adapters if not self.is_known(a.name)]
            if gone:
                outputs.append(
                    self._finish(
                        seq,
                        FinishReason.ABORT,
                        None,
                        "",
                        AdapterNotFound(f"The adapter `{gone[0]}` was deleted.", "adapters"),
                    )
                )
        pending, self._unresolved = [(s, sel) for s, sel in self._unresolved if not s.is_finished], []
        if not pending:
            return outputs
        try:
            hits = self.selector.retrieve([sel for _, sel in pending])
        except Exception as e:  # the embedder failed: these requests fail, the engine goes on
            return outputs + [
                self._finish(s, FinishReason.ABORT, None, "", EngineFailure(f"adapter retrieval failed: {e}"))
                for s, _ in pending
            ]
        for (seq, sel), found in zip(pending, hits):
            try:
                seq.chosen = self.selector.choose(sel, found)
            except MoleError as e:
                outputs.append(self._finish(seq, FinishReason.ABORT, None, "", e))
                continue
            self._use_input_form(seq, sel)
            self.adapter_usage.update(seq.chosen.sources or [a.name for a in seq.adapters])
        return outputs

    def _use_input_form(self, seq: Sequence, selection: Selection) -> None:
        """Send the prompt in the input form the chosen adapters read (input_forms.py), when the
        request carries one. A request still waits (nothing computed), so its prompt can change;
        one that asked for no more than the window allows keeps within it (max_tokens shrinks)."""
        names, weights = [a.name for a in seq.adapters], [a.weight for a in seq.adapters]
        prompt = selection.prompts_by_form.get(set_input_form(names, weights, self.adapters.input_form))
        if not prompt or (room := self.max_model_len - len(prompt)) < 1:
            return
        seq.prompt_ids, seq.token_ids = list(prompt), list(prompt)
        seq.sampling = dataclasses.replace(seq.sampling, max_tokens=min(seq.sampling.max_tokens, room))

    def _append(self, seq: Sequence, token: int, logprob: Logprob | None = None) -> StepOutput:
        seq.token_ids.append(token)
        p = seq.sampling
        delta, stopped = self._detok[seq.request_id].update(seq.output_ids)
        if seq.matcher is not None:  # the mask allowed only tokens the grammar takes
            if not seq.matcher.consume_token(token):
                return self._finish(
                    seq,
                    FinishReason.ABORT,
                    token,
                    delta,
                    EngineFailure(f"constrained decoding failed: {seq.matcher.get_error()}"),
                )
            stopped = stopped or seq.matcher.is_stopped()  # complete: nothing but EOS could follow
        if stopped or not p.ignore_eos and token in self.eos_token_ids or token in p.stop_token_ids:
            out = self._finish(seq, FinishReason.STOP, token, delta)
        elif len(seq.output_ids) >= p.max_tokens or len(seq.token_ids) >= self.max_model_len:
            out = self._finish(seq, FinishReason.LENGTH, token, delta)
        else:
            report = seq.report() if len(seq.output_ids) == 1 else None
            out = StepOutput(
                seq.request_id, token, delta, False, None, seq.num_prompt_tokens, len(seq.output_ids), adapters=report
            )
        out.logprob = logprob
        if len(seq.output_ids) == 1 and p.prompt_logprobs is not None:
            out.prompt_logprobs = seq.prompt_logprobs
        return out

    def _finish(
        self, seq: Sequence, reason: FinishReason, token: int | None, delta: str, error: MoleError | None = None
    ) -> StepOutput:
        self.scheduler.finish(seq, reason)
        self.runner.release(seq)
        del self._seqs[seq.request_id]
        delta += self._detok.pop(seq.request_id).flush()
        return StepOutput(
            seq.request_id,
            token,
            delta,
            True,
            reason,
            seq.num_prompt_tokens,
            len(seq.output_ids),
            error,
            seq.report(),
            seq.gate_entropy(),
        )

    def _acquire_adapters(self, seq: Sequence) -> bool:
        # what the sequence's KV depends on besides its tokens: its adapters' versions and weights
        seq.prefix_key = (
            tuple((a.name, self._versions[a.name], a.weight) for a in seq.adapters),
            self._gate_version if seq.gated else None,
        )
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
