"""Logprobs: each generated token's and each prompt token's, with alternatives, equal to
transformers' log_softmax over the same sequence (with an adapter too), through chunked prefill."""

from __future__ import annotations

import pytest
import torch

from server.engine.request import SamplingParams
from server.errors import InvalidRequest
from server.routing.types import AdapterRef
from tests.unit.helpers import engine_for, make_adapter, tiny_hf_model

PROMPT = list(range(5, 45))


@pytest.mark.parametrize("adapter", [False, True])
def test_generated_and_prompt_logprobs_equal_transformers(tokenizer, tmp_path, adapter):
    hf = tiny_hf_model()
    engine = engine_for(hf, tokenizer, max_num_batched_tokens=16)  # the 40-token prompt takes 3 chunks
    adapters = []
    reference = hf
    if adapter:
        from peft import PeftModel

        make_adapter(hf, tmp_path / "a", seed=3)
        engine.add_adapter("a", tmp_path / "a")
        adapters = [AdapterRef("a")]
        reference = PeftModel.from_pretrained(tiny_hf_model(), tmp_path / "a").eval()
    seq = engine.add_request(PROMPT, SamplingParams(max_tokens=5, ignore_eos=True, logprobs=3, prompt_logprobs=2),
                             adapters)
    outputs = []
    while not seq.is_finished:
        outputs += [o for o in engine.step() if o.request_id == seq.request_id]
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
