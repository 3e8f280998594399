"""Logprobs: each generated token's and each prompt token's, with alternatives, equal to
transformers' log_softmax over the same sequence (with an adapter too), through chunked prefill."""

from __future__ import annotations

import pytest
import torch
from mole_serve.engine.request import SamplingParams
from mole_serve.errors import InvalidRequest
from mole_serve.routing.types import AdapterRef

from tests.unit.helpers import add_adapter, engine_for, make_adapter, served, tiny_hf_model

PROMPT = list(range(5, 45))


@pytest.mark.parametrize("adapter", [False, True])
def test_generated_and_prompt_logprobs_equal_transformers(tokenizer, tmp_path, adapter):
    hf = tiny_hf_model()
    engine = engine_for(hf, tokenizer, max_prefill_tokens=16)  # the 40-token prompt takes 3 chunks
    adapters = []
    reference = hf
    if adapter:
        from peft import PeftModel

        make_adapter(hf, tmp_path / "a", seed=3)
        add_adapter(engine, "a", tmp_path / "a")
        adapters = [AdapterRef("a")]
        reference = PeftModel.from_pretrained(tiny_hf_model(), tmp_path / "a").eval()
    seq = engine.add_request(
        PROMPT, SamplingParams(max_tokens=5, ignore_eos=True, logprobs=3, prompt_logprobs=2), adapters
    )
    outputs = []
    while not seq.is_finished:
        outputs += [o for o in engine.step().outputs if o.request_id == seq.request_id]
    ids = PROMPT + seq.output_ids
    with torch.no_grad():
        expected = torch.log_softmax(reference(torch.tensor([ids])).logits[0].float(), -1)  # [L, V]
    prompt_logprobs = outputs[0].prompt_logprobs
    assert len(prompt_logprobs) == len(PROMPT) and prompt_logprobs[0] is None
    for pos, (token, lp, top) in enumerate(prompt_logprobs[1:], start=1):
        row = expected[pos - 1]
        assert token == PROMPT[pos] and abs(lp - row[token].item()) < 1e-4
        assert [t for t, _ in top] == row.topk(2).indices.tolist()
    assert [o.logprob[0] for o in outputs] == seq.output_ids
    for i, out in enumerate(outputs):
        token, lp, top = out.logprob
        row = expected[len(PROMPT) - 1 + i]
        assert abs(lp - row[token].item()) < 1e-4 and len(top) == 3
        assert max(v for _, v in top) == pytest.approx(row.max().item(), abs=1e-4)  # greedy: the token is the top
        assert top[0][0] == token


def test_logprobs_out_of_range_are_refused():
    with pytest.raises(InvalidRequest, match="logprobs must be between 0 and 20"):
        SamplingParams(logprobs=21)


def test_the_openai_shapes_carry_the_logprobs(tokenizer):
    import json
    import threading

    from fastapi.testclient import TestClient
    from mole_serve.api.app import create_app
    from mole_serve.config import Settings

    hf = tiny_hf_model()
    engine = engine_for(hf, tokenizer)
    with torch.no_grad():
        expected = torch.log_softmax(hf(torch.tensor([PROMPT])).logits[0].float(), -1)
    with TestClient(create_app(Settings(), lambda: served(engine))) as client:
        while client.get("/health").status_code != 200:
            threading.Event().wait(0.05)
        # lm-eval's loglikelihood request: token ids, echo, one generated token, logprobs=1
        r = client.post(
            "/v1/completions",
            json={"model": "auto", "prompt": PROMPT, "max_tokens": 1, "logprobs": 1, "echo": True, "temperature": 0},
        )
        assert r.status_code == 200, r.text
        lp = r.json()["choices"][0]["logprobs"]
        assert len(lp["tokens"]) == len(PROMPT) + 1 and lp["token_logprobs"][0] is None
        for pos in range(1, len(PROMPT)):
            assert abs(lp["token_logprobs"][pos] - expected[pos - 1, PROMPT[pos]].item()) < 1e-4
            assert max(lp["top_logprobs"][pos].values()) == pytest.approx(expected[pos - 1].max().item(), abs=1e-4)
        assert lp["text_offset"] == sorted(lp["text_offset"])
        chat = {
            "model": "auto",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4,
            "temperature": 0,
            "ignore_eos": True,
            "logprobs": True,
            "top_logprobs": 2,
        }
        whole = client.post("/v1/chat/completions", json=chat).json()["choices"][0]["logprobs"]["content"]
        assert len(whole) == 4 and all(len(t["top_logprobs"]) == 2 for t in whole)
        assert all(t["logprob"] == t["top_logprobs"][0]["logprob"] for t in whole)  # greedy
        streamed = []
        with client.stream("POST", "/v1/chat/completions", json={**chat, "stream": True}) as s:
            for line in s.iter_lines():
                if line.startswith("data: {"):
                    choice = (json.loads(line[6:])["choices"] or [{}])[0]
                    streamed += (choice.get("logprobs") or {}).get("content", [])
        assert [t["logprob"] for t in streamed] == pytest.approx([t["logprob"] for t in whole], abs=1e-5)
        bad = client.post("/v1/chat/completions", json={**chat, "logprobs": False})
        assert bad.status_code == 400 and "top_logprobs needs logprobs" in bad.json()["error"]["message"]
        bad = client.post("/v1/completions", json={"prompt": [10**9], "max_tokens": 1})
        assert bad.status_code == 400 and "outside the vocabulary" in bad.json()["error"]["message"]
