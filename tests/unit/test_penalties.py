"""logit_bias, min_tokens, min_p, top_k and the penalties: the sampler against a per-row loop and
transformers, the engine in mixed batches, and the fields over HTTP."""

import dataclasses
import threading

import pytest
import torch
from fastapi.testclient import TestClient
from mole_serve.api.app import create_app
from mole_serve.config import Settings
from mole_serve.engine.detokenizer import Detokenizer
from mole_serve.engine.request import SamplingParams, Sequence
from mole_serve.engine.sampler import apply_bias, apply_penalties, make_generator, sample
from mole_serve.errors import InvalidRequest
from transformers import RepetitionPenaltyLogitsProcessor

from tests.unit.helpers import engine_for, served, tiny_hf_model

# The tiny model repeats a prompt's last token greedily (its embeddings are tied): LOOP gives 16, 16, ...
LOOP = [11, 12, 13, 14, 15, 16]
EOS = 2  # the tokenizer's


def seq(prompt: list[int], output: list[int], **sampling) -> Sequence:
    s = Sequence(prompt, SamplingParams(**sampling))
    s.token_ids += output
    return s


def history(g: torch.Generator, n: int, V: int) -> list[int]:
    return torch.randint(0, V, (n,), generator=g).tolist()


def test_frequency_and_presence_penalties_match_a_per_row_loop():
    g, V = torch.Generator().manual_seed(0), 40
    penalties = [(0.0, 0.0), (1.5, 0.0), (0.0, -0.7), (0.4, 2.0), (0.0, 0.0), (-2.0, 1.0)]
    seqs = [
        seq(history(g, 5 + i, V), history(g, 3 * i, V), frequency_penalty=f, presence_penalty=p)
        for i, (f, p) in enumerate(penalties)
    ]
    logits = torch.randn(len(seqs), V, generator=g)
    got = apply_penalties(logits, seqs)
    expected = logits.clone()
    for i, s in enumerate(seqs):  # OpenAI's definition over the output tokens only
        for token in set(s.output_ids):
            p = s.sampling
            expected[i, token] -= p.frequency_penalty * s.output_ids.count(token) + p.presence_penalty
    torch.testing.assert_close(got, expected)
    assert torch.equal(got[[0, 4]], logits[[0, 4]])  # rows without penalties are untouched
    assert apply_penalties(logits, [seq([1], [2])] * len(seqs)) is logits  # none asks: nothing runs


def test_repetition_penalty_matches_transformers():
    g, V = torch.Generator().manual_seed(1), 40
    seqs = [
        seq(history(g, 6, V), history(g, 4, V), repetition_penalty=1.3),
        seq(history(g, 9, V), [], repetition_penalty=0.7),  # < 1 favours repeats
        seq(history(g, 3, V), history(g, 8, V), frequency_penalty=1.0),  # beside it: no repetition penalty
        seq(history(g, 2, V), history(g, 12, V), repetition_penalty=2.0),
    ]
    logits = torch.randn(len(seqs), V, generator=g) * 3
    got = apply_penalties(logits, seqs)
    for i in (0, 1, 3):  # over the prompt and the output, as transformers' processor reads input_ids
        processor = RepetitionPenaltyLogitsProcessor(seqs[i].sampling.repetition_penalty)
        expected = processor(torch.tensor([seqs[i].token_ids]), logits[i : i + 1].clone())[0]
        torch.testing.assert_close(got[i], expected)


def test_logit_bias_and_the_min_tokens_mask():
    V = 30
    seqs = [
        seq([1, 2], [5], logit_bias=((3, 2.5), (7, -100.0))),
        seq([1], [4], min_tokens=3, stop_token_ids=(9,), logit_bias=((9, 50.0),)),  # masked whatever its bias
        seq([1], [4], min_tokens=3, stop_token_ids=(9,), ignore_eos=True),  # EOS not masked
        seq([1], [4, 4, 4], min_tokens=3, stop_token_ids=(9,)),  # reached min_tokens
        seq([1], []),
    ]
    logits = torch.randn(len(seqs), V)
    got = apply_bias(logits, seqs, {EOS})
    expected = logits.clone()
    expected[0, 3] += 2.5
    expected[0, 7] -= 100
    expected[1, [9, EOS]] = float("-inf")
    expected[2, 9] = float("-inf")
    assert torch.equal(got, expected)
    assert apply_bias(logits, [seqs[-1], seqs[3]], {EOS}) is logits


def test_min_p_keeps_the_tokens_near_the_best():
    logits = torch.zeros(2, 100)
    logits[:, 0], logits[:, 1] = 5.0, 4.6  # token 1: e^-0.4 = 0.67 of token 0's probability
    seqs = [seq([1], [], temperature=1.0, min_p=0.5), seq([1], [], temperature=1.0)]
    gens = [make_generator(i) for i in range(2)]
    draws = [sample(logits, seqs, gens, ()).tolist() for _ in range(60)]
    assert {d[0] for d in draws} == {0, 1}  # 98 tokens of e^-5 relative probability are gone
    assert {d[1] for d in draws} - {0, 1}  # without min_p they hold a quarter of the mass


def test_logits_that_overflow_sample_among_the_overflowed():
    logits = torch.randn(4, 50)
    logits[:, [4, 9]] = torch.tensor([10.0, 9.0])
    logits[:, 5] = float("-inf")  # (a grammar's mask) times a penalty read as 0 in float32 would be NaN
    seqs = [
        seq([4, 9, 5], [], temperature=1.0, repetition_penalty=5e-324),  # 10 / 5e-324 = inf, and 9 / 5e-324
        seq([1], [], temperature=1e-300),  # greedy, its limit
        seq([4, 9, 5], [], temperature=1.0, repetition_penalty=5e-324, min_p=0.5, top_p=0.5, top_k=10),
        seq([4, 9, 5], [], repetition_penalty=1e300),  # greedy
    ]
    gens = [make_generator(i) for i in range(len(seqs))]
    draws = [sample(logits, seqs, gens, ()).tolist() for _ in range(30)]
    assert {d[0] for d in draws} == {4, 9} and {d[1] for d in draws} == {4} and {d[2] for d in draws} <= {4, 9}
    assert all(d[3] not in (4, 5, 9) for d in draws)


def test_sampling_params_name_the_field_out_of_range():
    for field, value in [
        ("frequency_penalty", 2.5),
        ("presence_penalty", -3.0),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", float("nan")),
        ("top_k", -2),
        ("min_p", 1.5),
        ("min_tokens", -1),
        ("logit_bias", ((5, 101.0),)),
        ("logit_bias", ((5, 1.0), (5, 2.0))),
        ("stop_token_ids", (-1,)),
    ]:
        with pytest.raises(InvalidRequest) as e:
            SamplingParams(**{field: value})
        assert e.value.param == field
    assert SamplingParams(top_k=-1).top_k == -1  # vLLM's "no cut"


def test_min_tokens_hides_stop_strings_that_end_before_it(tokenizer):
    ids = tokenizer("x stop y stop z")["input_ids"]
    first = next(n for n in range(1, len(ids) + 1) if "stop" in tokenizer.decode(ids[:n]))

    def run(min_tokens: int) -> str:
        detok = Detokenizer(tokenizer, ["stop"], min_tokens)
        text = ""
        for n in range(1, len(ids) + 1):
            delta, stopped = detok.update(ids[:n])
            text += delta
            if stopped:
                return text
        return text + detok.flush()

    assert run(0) == run(first) == "x "  # the first stop string ends with token `first`: still checked
    assert run(first + 1) == "x stop y "  # the first one ended before: only the second counts


@pytest.fixture(scope="module")
def hf():
    return tiny_hf_model()


def outputs(engine, requests: list[tuple[list[int], SamplingParams]]) -> list[list[int]]:
    seqs = [engine.add_request(prompt, params) for prompt, params in requests]
    while engine.has_unfinished():
        engine.step()
    return [s.output_ids for s in seqs]


def test_each_request_in_a_mixed_batch_equals_it_alone(hf, tokenizer):
    common = dict(max_tokens=8, ignore_eos=True)
    requests = [
        (LOOP, SamplingParams(**common)),
        ([21, 22], SamplingParams(**common, frequency_penalty=1.5, presence_penalty=0.5)),
        (
            [31, 32, 33, 34, 35, 36, 37, 38, 39],
            SamplingParams(**common, repetition_penalty=1.3, logit_bias=((5, 3.0),)),
        ),
        (
            [1000, 2000, 3000],
            SamplingParams(**common, temperature=0.9, seed=3, top_k=40, min_p=0.05, presence_penalty=1),
        ),
        ([5, 6], SamplingParams(max_tokens=8, min_tokens=4, stop_token_ids=(7,), logit_bias=((EOS, 100.0),))),
        ([7, 8, 9], SamplingParams(**common, temperature=1.0, seed=5)),
        ([40, 41], SamplingParams(**common, logit_bias=((41, -100.0),))),
    ]
    engine = engine_for(hf, tokenizer)
    alone = [outputs(engine, [r])[0] for r in requests]
    assert outputs(engine_for(hf, tokenizer), requests) == alone


def test_penalties_bias_and_min_tokens_change_what_the_engine_writes(hf, tokenizer):
    engine = engine_for(hf, tokenizer)
    looped, penalized, banned, forced = outputs(
        engine,
        [
            (LOOP, SamplingParams(max_tokens=8, ignore_eos=True)),
            (LOOP, SamplingParams(max_tokens=8, ignore_eos=True, frequency_penalty=2.0)),
            (LOOP, SamplingParams(max_tokens=8, ignore_eos=True, logit_bias=((16, -100.0),))),
            (LOOP, SamplingParams(max_tokens=8, ignore_eos=True, logit_bias=((777, 100.0),))),
        ],
    )
    assert looped == [16] * 8
    assert all(a != b for a, b in zip(penalized, penalized[1:]))  # the loop is broken
    assert banned[0] != 16 and forced[0] == 777
    ends, held, stopped, held_stop = outputs(
        engine,
        [
            ([5, 6], SamplingParams(max_tokens=8, logit_bias=((EOS, 100.0),))),
            ([5, 6], SamplingParams(max_tokens=8, min_tokens=4, logit_bias=((EOS, 100.0),))),
            (LOOP, SamplingParams(max_tokens=8, stop_token_ids=(16,))),
            (LOOP, SamplingParams(max_tokens=8, stop_token_ids=(16,), min_tokens=3)),
        ],
    )
    assert ends == [EOS]
    assert len(held) == 5 and held[4] == EOS  # masked for the first four whatever its bias
    assert stopped == [16]
    assert len(held_stop) >= 3 and 16 not in held_stop[:3] and 16 not in held_stop[:-1]


def test_min_tokens_keeps_stop_strings_from_ending_early(hf, tokenizer):
    engine = engine_for(hf, tokenizer)
    free = SamplingParams(max_tokens=12, temperature=1.0, seed=7, ignore_eos=True)
    out = outputs(engine, [([1000, 2000, 3000, 4000], free)])[0]
    text = tokenizer.decode(out[:3], skip_special_tokens=True)
    stop = text[-2:]  # ends within the first three tokens' text
    assert stop.strip()
    cut = dataclasses.replace(free, stop=(stop,))
    kept = dataclasses.replace(free, stop=(stop,), min_tokens=12)
    assert len(outputs(engine, [([1000, 2000, 3000, 4000], cut)])[0]) <= 3
    assert outputs(engine, [([1000, 2000, 3000, 4000], kept)])[0] == out


@pytest.fixture(scope="module")
def client(hf, tokenizer):
    with TestClient(create_app(Settings(), lambda: served(engine_for(hf, tokenizer)))) as client:
        while client.get("/health").status_code != 200:
            threading.Event().wait(0.05)
        yield client


CHAT = {"model": "auto", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
TEXT = {"model": "auto", "prompt": [1000, 2000, 3000, 4000], "max_tokens": 4, "temperature": 0}  # 4000, 4000, ...


@pytest.mark.parametrize("base", [CHAT, TEXT], ids=["chat", "completions"])
@pytest.mark.parametrize(
    "fields, param",
    [
        ({"frequency_penalty": 2.5}, "frequency_penalty"),
        ({"presence_penalty": -2.1}, "presence_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 4, "max_tokens": 3}, "min_tokens"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"logit_bias": {"a5": 1}}, "logit_bias"),
        ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
        ({"logit_bias": {"49152": 1}}, "logit_bias"),  # the vocabulary is [0, 49152)
        ({"logit_bias": {"9" * 5000: 1}}, "logit_bias"),
        ({"stop_token_ids": [49152]}, "stop_token_ids"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"retrieval_top_k": 17}, "retrieval_top_k"),
    ],
)
def test_out_of_range_sampling_fields_are_400s_naming_the_field(client, base, fields, param):
    path = "/v1/chat/completions" if "messages" in base else "/v1/completions"
    r = client.post(path, json={**base, **fields})
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"].split(".")[0] == param and error["message"], r.text
    if fields == {"logit_bias": {"49152": 1}}:
        assert "'49152'" in error["message"]


def test_sampling_fields_act_over_http(client, tokenizer):
    def text(**fields) -> str:
        r = client.post("/v1/completions", json={**TEXT, **fields})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    looped = text()
    assert looped == tokenizer.decode([4000] * 4)
    assert text(logit_bias={"4000": -100}) != looped and text(frequency_penalty=2.0) != looped
    assert text(temperature=1.0, top_k=1, seed=3) == looped  # top_k is sampling's now: top-1 is greedy
    assert text(temperature=1.0, top_k=10**30, seed=3) == text(temperature=1.0, top_k=-1, seed=3)  # no cut
    assert text(temperature=1.0, min_p=1.0, seed=3) == looped
    r = client.post(
        "/v1/chat/completions",
        json={**CHAT, "max_tokens": 6, "logit_bias": {"1000": 100}, "stop_token_ids": [1000], "min_tokens": 2},
    )
    choice = r.json()["choices"][0]
    # the first two tokens cannot be 1000 (min_tokens masks a stop token id), the third is (its bias)
    assert choice["finish_reason"] == "stop" and r.json()["usage"]["completion_tokens"] == 3, r.text
