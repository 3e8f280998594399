"""Several choices per prompt (`n`, completions' `best_of`) and prompt scoring (`echo` with
`max_tokens` 0), on a tiny random model: each against the same request made one choice at a time."""

import json
import threading
from contextlib import contextmanager

import pytest
from fastapi.testclient import TestClient
from mole_serve.api.app import create_app
from mole_serve.config import Settings
from mole_serve.engine.request import SamplingParams

from tests.unit.helpers import engine_for, served, tiny_hf_model

PROMPT = "the quick brown fox jumps over the lazy dog and then it runs far away into the woods"


@pytest.fixture
def engine(tokenizer):
    return engine_for(tiny_hf_model(), tokenizer)


@contextmanager
def client_of(engine):
    with TestClient(create_app(Settings(), lambda: served(engine))) as client:
        while client.get("/health").status_code != 200:
            threading.Event().wait(0.05)
        yield client


def complete(client, **fields) -> dict:
    r = client.post("/v1/completions", json={"model": "auto", "prompt": PROMPT, "max_tokens": 6, **fields})
    assert r.status_code == 200, r.text
    return r.json()


def test_n_choices_are_the_seeded_requests_one_by_one(engine):
    """Choice j of a seeded request is the request with seed + j alone (vLLM's rule), so seeded
    choices differ from each other and repeat exactly."""
    with client_of(engine) as client:
        body = {"temperature": 1.0, "seed": 7, "max_tokens": 8}
        three = complete(client, n=3, **body)
        alone = [complete(client, **{**body, "seed": 7 + j}) for j in range(3)]
        texts = [c["text"] for c in three["choices"]]
        assert [c["index"] for c in three["choices"]] == [0, 1, 2]
        assert texts == [a["choices"][0]["text"] for a in alone]
        assert len(set(texts)) == 3
        usage = three["usage"]  # the prompt counted once, every generated token counted
        assert usage["prompt_tokens"] == alone[0]["usage"]["prompt_tokens"]
        assert usage["completion_tokens"] == sum(a["usage"]["completion_tokens"] for a in alone)


def test_n_on_several_prompts_orders_choices_prompt_major(engine):
    with client_of(engine) as client:
        out = complete(client, prompt=["one two three", "four five six"], n=2, max_tokens=4, temperature=0)
        greedy = [
            complete(client, prompt=p, max_tokens=4, temperature=0)["choices"][0]["text"]
            for p in ("one two three", "four five six")
        ]
        assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
        assert [c["text"] for c in out["choices"]] == [greedy[0], greedy[0], greedy[1], greedy[1]]


def test_chat_n_streamed_gives_every_choice_its_role_and_text(engine):
    with client_of(engine) as client:
        body = {
            "model": "auto",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 5,
            "n": 2,
            "temperature": 1.0,
            "seed": 3,
        }
        whole = client.post("/v1/chat/completions", json=body).json()
        chunks = []
        with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunks.append(json.loads(line[6:]))
        roles = [c["index"] for c in chunks[0]["choices"] if c["delta"].get("role") == "assistant"]
        assert roles == [0, 1]
        streamed = ["", ""]
        for chunk in chunks[1:]:
            for c in chunk["choices"]:
                streamed[c["index"]] += c["delta"].get("content", "")
        assert streamed == [c["message"]["content"] for c in whole["choices"]]


def test_followers_reuse_the_first_choices_prompt_blocks(engine):
    """The engine admits choice 2.. once choice 1 computed the prompt: they find its full blocks in
    the prefix cache, and their outputs equal the request run alone."""
    prompt = engine.tokenizer(PROMPT * 2)["input_ids"]
    sampling = SamplingParams(max_tokens=5)
    alone = engine.generate([prompt], sampling)[0].output_ids
    engine.scheduler.blocks.stats.hit_tokens = 0
    engine.scheduler.blocks.__init__(engine.scheduler.blocks.num_blocks, engine.scheduler.blocks.block_size)
    first = engine.make_sequence(prompt, sampling, request_id="first")
    engine.add_sequence(first)
    followers = [engine.make_sequence(prompt, sampling, request_id=f"f{j}") for j in range(2)]
    for seq in followers:
        engine.add_sequence(seq, follows="first")
    while engine.has_unfinished():
        engine.step()
    full_blocks = (len(prompt) - 1) // engine.settings.kv_block_size
    assert engine.scheduler.blocks.stats.hit_tokens == 2 * full_blocks * engine.settings.kv_block_size
    assert [s.output_ids for s in (first, *followers)] == [alone] * 3


def test_best_of_returns_the_candidate_of_highest_logprob(engine):
    with client_of(engine) as client:
        body = {"temperature": 1.0, "seed": 11, "max_tokens": 6, "logprobs": 0}
        candidates = complete(client, n=4, **body)["choices"]
        total = [sum(c["logprobs"]["token_logprobs"]) for c in candidates]
        best = complete(client, best_of=4, **body)
        assert [c["text"] for c in best["choices"]] == [candidates[total.index(max(total))]["text"]]
        two = complete(client, best_of=4, n=2, **{k: v for k, v in body.items() if k != "logprobs"})
        ranked = sorted(range(4), key=lambda j: total[j], reverse=True)[:2]
        assert [c["text"] for c in two["choices"]] == [candidates[j]["text"] for j in ranked]
        assert all(c["logprobs"] is None for c in two["choices"])  # ranked by logprobs it did not ask for
        assert two["usage"]["completion_tokens"] == best["usage"]["completion_tokens"]  # all four were generated


def test_echo_with_no_completion_scores_the_prompt(engine):
    with client_of(engine) as client:
        scored = complete(client, echo=True, max_tokens=0, logprobs=1)
        one = complete(client, echo=True, max_tokens=1, logprobs=1)
        choice = scored["choices"][0]
        assert choice["text"] == PROMPT and choice["finish_reason"] == "length"
        assert scored["usage"]["completion_tokens"] == 0
        n_prompt = scored["usage"]["prompt_tokens"]
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == n_prompt and lp["token_logprobs"][0] is None
        assert lp["token_logprobs"] == one["choices"][0]["logprobs"]["token_logprobs"][:n_prompt]
        streamed = ""
        with client.stream(
            "POST",
            "/v1/completions",
            json={"prompt": PROMPT, "echo": True, "max_tokens": 0, "stream": True, "logprobs": 1},
        ) as r:
            pieces = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        streamed = "".join(p["choices"][0]["text"] for p in pieces)
        assert streamed == PROMPT
        assert sum(len(p["choices"][0]["logprobs"]["tokens"]) for p in pieces) == n_prompt


def test_echo_streamed_sends_the_prompt_first(engine):
    with client_of(engine) as client:
        whole = complete(client, echo=True, temperature=0)["choices"][0]["text"]
        body = {"prompt": PROMPT, "echo": True, "max_tokens": 6, "stream": True, "temperature": 0}
        with client.stream("POST", "/v1/completions", json=body) as r:
            pieces = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        assert pieces[0]["choices"][0]["text"].startswith(PROMPT)
        assert "".join(p["choices"][0]["text"] for p in pieces) == whole


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"max_tokens": 0}, "echo"),
        ({"n": 17}, "n"),
        ({"best_of": 2, "n": 3}, "best_of"),
        ({"best_of": 3, "stream": True}, "best_of"),
    ],
)
def test_choice_fields_out_of_range_are_400s(engine, fields, param):
    with client_of(engine) as client:
        r = client.post("/v1/completions", json={"prompt": PROMPT, **fields})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_retrieval_top_k_limits_only_requests_that_retrieve(tokenizer, tmp_path):
    """Over the per-request adapter limit, retrieval_top_k refuses `auto` requests that retrieve,
    not those that name their adapters."""
    from mole_serve.errors import InvalidRequest
    from mole_serve.routing.types import AdapterRef, Selection

    from tests.unit.helpers import add_adapter, make_adapter

    hf = tiny_hf_model()
    engine = engine_for(hf, tokenizer, max_loras=2)  # the limit: min(max_adapters_per_request, 2)
    add_adapter(engine, "a", make_adapter(hf, tmp_path / "a", seed=1))
    named = Selection("mixture", (AdapterRef("a"),), "a query", 3)
    assert engine.make_sequence([1, 2, 3], SamplingParams(), selection=named).selection is not None
    with pytest.raises(InvalidRequest) as refused:
        engine.make_sequence([1, 2, 3], SamplingParams(), selection=Selection("mixture", (), "a query", 3))
    assert refused.value.param == "retrieval_top_k"
