"""Sampling, stop conditions and the async engine on a tiny random model."""

import asyncio

import pytest
import torch
from mole_serve.engine.async_engine import AsyncEngine
from mole_serve.engine.request import SamplingParams, Sequence
from mole_serve.engine.sampler import make_generator, sample

from tests.unit.helpers import engine_for, tiny_hf_model

PROMPTS = [[11, 12, 13, 14, 15, 16], [21, 22], [31, 32, 33, 34, 35, 36, 37, 38, 39]]


@pytest.fixture(scope="module")
def hf():
    return tiny_hf_model()


def test_seeded_sampling_is_independent_of_the_batch(hf, tokenizer):
    params = SamplingParams(max_tokens=15, temperature=1.0, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    alone = engine_for(hf, tokenizer).generate([PROMPTS[0]], params)[0].output_ids
    noisy = SamplingParams(max_tokens=9, temperature=1.3, ignore_eos=True)
    engine = engine_for(hf, tokenizer)
    together = [
        engine.add_request(PROMPTS[1], noisy),
        engine.add_request(PROMPTS[0], params),
        engine.add_request(PROMPTS[2], noisy),
    ]
    while engine.has_unfinished():
        engine.step()
    assert together[1].output_ids == alone
    other_seed = (
        engine_for(hf, tokenizer)
        .generate([PROMPTS[0]], SamplingParams(max_tokens=15, temperature=1.0, seed=99, ignore_eos=True))[0]
        .output_ids
    )
    assert other_seed != alone


def test_top_k_one_is_greedy_and_top_p_keeps_the_nucleus():
    torch.manual_seed(0)
    logits = torch.randn(2, 100)
    gens = [make_generator(s) for s in (1, 2)]
    greedy = [Sequence([1], SamplingParams(temperature=0.7, top_k=1)) for _ in range(2)]
    assert sample(logits, greedy, gens, ()).tolist() == logits.argmax(-1).tolist()
    logits[:, 7] = 50.0  # one token holds nearly all the mass: top_p=0.5 keeps only it
    nucleus = [Sequence([1], SamplingParams(temperature=1.0, top_p=0.5)) for _ in range(2)]
    for _ in range(20):
        assert sample(logits, nucleus, gens, ()).tolist() == [7, 7]


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.8, top_k=20),
        SamplingParams(temperature=1.2, top_k=200, top_p=0.8),
        SamplingParams(temperature=1.0, top_p=0.7, min_p=0.01),
    ],
)
def test_a_row_draws_the_same_whatever_cut_its_batch_needs(params):
    """The sampler ranks only the largest top-k of the rows (topk), or the whole vocabulary when a
    row has top_p without top_k: a row's draws (same seed) do not depend on which."""
    torch.manual_seed(1)
    logits = torch.randn(1, 500) * 3
    others = [SamplingParams(temperature=1.0, top_k=7), SamplingParams(temperature=1.0, top_p=0.5)]
    for _ in range(3):
        alone = sample(logits, [Sequence([1], params)], [make_generator(5)], ()).tolist()
        for other in others:
            gens = [make_generator(5), make_generator(6)]
            mixed = sample(logits.repeat(2, 1), [Sequence([1], params), Sequence([1], other)], gens, ()).tolist()
            assert mixed[0] == alone[0]
        logits = logits.roll(37, dims=1)


def test_stop_strings_truncate_and_stop_token_ids_end(hf, tokenizer):
    # Seeded sampling over ordinary token ids gives varied text to cut.
    sampling = dict(max_tokens=20, temperature=1.0, seed=7, ignore_eos=True)
    prompt = [1000, 2000, 3000, 4000]
    free = engine_for(hf, tokenizer).generate([prompt], SamplingParams(**sampling))[0]
    text = tokenizer.decode(free.output_ids, skip_special_tokens=True)
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip() and len(set(free.output_ids)) > 5

    async def collect(params):
        aeng = AsyncEngine(engine_for(hf, tokenizer))
        aeng.start()
        try:
            return [o async for o in aeng.generate(prompt, params)]
        finally:
            aeng.shutdown()

    outs = asyncio.run(collect(SamplingParams(**sampling, stop=(stop,))))
    streamed = "".join(o.text for o in outs)
    assert streamed == text[: text.index(stop)]
    assert outs[-1].finish_reason.value == "stop"
    token = free.output_ids[4]
    outs = asyncio.run(collect(SamplingParams(**sampling, stop_token_ids=(token,))))
    assert [o.token_id for o in outs] == free.output_ids[: free.output_ids.index(token) + 1]
    assert outs[-1].finish_reason.value == "stop"


def test_async_engine_concurrent_requests_and_cancel(hf, tokenizer):
    engine = engine_for(hf, tokenizer, max_num_seqs=4)
    expected = engine.generate(PROMPTS, SamplingParams(max_tokens=10, ignore_eos=True))

    async def main():
        aeng = AsyncEngine(engine)
        aeng.start()
        try:

            async def run(prompt):
                return [o async for o in aeng.generate(prompt, SamplingParams(max_tokens=10, ignore_eos=True))]

            results = await asyncio.gather(*(run(p) for p in PROMPTS))
            # A consumer that leaves after 2 tokens: its KV blocks are freed within a step.
            stream = aeng.generate(PROMPTS[0], SamplingParams(max_tokens=100, ignore_eos=True))
            [await stream.__anext__() for _ in range(2)]
            assert len(engine.scheduler.running) == 1 and engine.scheduler.blocks.num_used > 0
            await stream.aclose()
            for _ in range(100):
                if engine.scheduler.blocks.num_used == 0:
                    break
                await asyncio.sleep(0.01)
            return results, engine.scheduler.blocks.num_used
        finally:
            aeng.shutdown()

    results, used = asyncio.run(main())
    assert used == 0
    for outs, seq in zip(results, expected):
        assert [o.token_id for o in outs] == seq.output_ids
        assert outs[-1].num_output_tokens == 10 and outs[-1].num_prompt_tokens == len(seq.prompt_ids)
