"""AsyncEngine: the step loop of an LLMEngine in its own thread, and one async iterator of outputs
per request; the EngineClient (client.py) of an engine in this process. All engine state is
touched by the step thread only; callers talk to it through a command queue and get outputs
through their own asyncio queue."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from mole_serve.engine.client import EngineStats
from mole_serve.engine.engine import LLMEngine
from mole_serve.engine.request import FinishReason, SamplingParams, StepOutput
from mole_serve.errors import Overloaded
from mole_serve.lora.kinds.base import AdapterWeights
from mole_serve.routing.types import Selection

log = logging.getLogger(__name__)
T = TypeVar("T")


class QueueFullError(Overloaded):
    code = "queue_full"


class AsyncEngine:
    def __init__(
        self,
        engine: LLMEngine,
        max_waiting: int | None = None,
        on_step: Callable[[int, list[float]], None] | None = None,
    ) -> None:
        self.engine = engine
        # called in the step thread after each step with (sequences in the step, retrieval seconds)
        self.on_step = on_step
        self.model_name, self.max_model_len = engine.model_name, engine.max_model_len
        self.tokenizer = engine.tokenizer
        # a byte-level or sentencepiece symbol decodes to at most as many characters as it has
        self.max_token_chars = max(map(len, engine.tokenizer.get_vocab()), default=1)
        self.max_waiting = max_waiting or engine.settings.max_waiting
        self._commands: queue.SimpleQueue[Callable[[], object]] = queue.SimpleQueue()
        self._outputs: dict[str, asyncio.Queue[StepOutput]] = {}
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.num_pending = 0  # accepted, not yet finished

    def start(self) -> None:
        """Step loop in a background thread, outputs to the running event loop (tests, embedding)."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="mole-engine", daemon=True)
        self._thread.start()

    def run_forever(self, loop: asyncio.AbstractEventLoop) -> None:
        """Step loop in the calling thread until shutdown(); outputs go to `loop` (in another thread).
        The server calls this on the main thread: libgomp's worker team behind any other thread sleeps
        between parallel regions, which slows every decode step (docs/decisions.md)."""
        self._loop = loop
        self._run()

    def shutdown(self) -> None:
        self._stopped.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout=30)

    def call(self, fn: Callable[[], object]) -> None:
        """Run fn in the step thread between two steps (its result is dropped)."""
        self._commands.put(fn)
        self._wake.set()

    async def run_in_engine(self, fn: Callable[[LLMEngine], T]) -> T:
        """Await fn(engine) run in the step thread between two steps (adapter uploads, deletes);
        its exception, if any, is raised here."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[T] = loop.create_future()

        def run() -> None:
            try:
                result = fn(self.engine)
            except BaseException as e:  # handed to the awaiting caller, the loop goes on
                loop.call_soon_threadsafe(_settle, done, None, e)
            else:
                loop.call_soon_threadsafe(_settle, done, result, None)

        self.call(run)
        return await done

    def generate(
        self,
        prompt_ids: list[int],
        sampling: SamplingParams,
        selection: Selection | None = None,
        request_id: str | None = None,
        follows: str | None = None,
    ) -> RequestStream:
        """Submit a request now (bad input and a full queue raise here) and return its outputs as
        they come; closing the stream before its end aborts the request. follows: the request id of
        an earlier choice of the same prompt (`n`), whose prompt KV this one reuses."""
        if self.num_pending >= self.max_waiting + self.engine.settings.max_num_seqs:
            raise QueueFullError(f"{self.num_pending} requests in flight; try again shortly")
        seq = self.engine.make_sequence(prompt_ids, sampling, (), request_id, selection)
        stream = RequestStream(self, seq.request_id)
        self._outputs[seq.request_id] = stream.queue
        self.num_pending += 1
        self.call(lambda: self.engine.add_sequence(seq, follows))
        return stream

    def _run(self) -> None:
        loop = self._loop
        assert loop is not None  # start() or run_forever() set it
        while not self._stopped.is_set():
            while not self._commands.empty():
                self._commands.get()()
            if not self.engine.has_unfinished():
                self._wake.wait()
                self._wake.clear()
                continue
            try:
                step = self.engine.step()
                outputs, batch_size = step.outputs, step.batch_size
            except Exception as e:  # a broken step fails its requests, never the server
                log.exception("engine step failed")
                outputs, batch_size = self.engine.fail_running(f"internal engine error: {e}"), 0
            if self.on_step:
                seconds, self.engine.selector.retrieval_seconds = self.engine.selector.retrieval_seconds, []
                self.on_step(batch_size, seconds)
            if outputs:  # one wake-up of the event loop per step, not one per sequence
                loop.call_soon_threadsafe(self._deliver, outputs)

    # --- the rest of EngineClient ---
    @property
    def has_gate(self) -> bool:
        return self.engine.pool.gate is not None

    def abort(self, request_id: str) -> None:
        self.call(lambda: self.engine.abort(request_id))

    def has_adapter(self, name: str) -> bool:
        return name in self.engine.adapters

    def adapter_usage(self, name: str) -> int:
        return self.engine.adapter_usage[name]

    async def add_adapter(self, name: str, weights: AdapterWeights) -> float:
        def add(engine: LLMEngine) -> float:
            start = time.perf_counter()
            engine.add_adapter(name, weights)
            return time.perf_counter() - start

        return await self.run_in_engine(add)

    async def remove_adapter(self, name: str) -> None:
        await self.run_in_engine(lambda engine: engine.remove_adapter(name))

    def stats(self) -> EngineStats:
        sched, pool, kv = self.engine.scheduler, self.engine.pool, self.engine.kv
        blocks = sched.blocks
        return EngineStats(
            len(sched.running),
            len(sched.waiting),
            blocks.num_used,
            blocks.num_blocks,
            kv.block_bytes,
            blocks.stats.queried_tokens,
            blocks.stats.hit_tokens,
            blocks.stats.preemptions,
            pool.num_resident,
            pool.max_loras,
            pool.loads,
            pool.evictions,
        )

    def _deliver(self, outputs: list[StepOutput]) -> None:
        for out in outputs:
            q = self._outputs.get(out.request_id)
            if q is not None:
                q.put_nowait(out)


def _settle(future: asyncio.Future, result: object, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class RequestStream:
    """The outputs of one request. close() (idempotent, also on garbage collection) releases its
    place in the engine even if the stream was never read, e.g. when a sibling request failed."""

    def __init__(self, aeng: AsyncEngine, request_id: str) -> None:
        self.aeng, self.request_id = aeng, request_id
        self.queue: asyncio.Queue[StepOutput] = asyncio.Queue()
        self.finished = self.closed = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> StepOutput:
        if self.finished:
            raise StopAsyncIteration
        out = await self.queue.get()
        if out.finished:
            self.finished = True
            self.close()
        return out

    async def next_outputs(self) -> list[StepOutput]:
        """The next output and every one already queued behind it: a reader that lags (a Ray
        replica sending to its ingress) moves them in one message instead of one per token."""
        outs = [await self.__anext__()]
        while not self.finished and not self.queue.empty():
            outs.append(await self.__anext__())
        return outs

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.aeng._outputs.pop(self.request_id, None)
        self.aeng.num_pending -= 1
        if not self.finished:  # the caller went away: free its KV slot and batch place
            self.aeng.abort(self.request_id)
            # and end the iteration of whoever still reads (a watcher closed it for them)
            self.queue.put_nowait(StepOutput(self.request_id, None, "", True, FinishReason.ABORT, 0, 0))

    async def aclose(self) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()
