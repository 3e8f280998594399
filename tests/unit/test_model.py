"""Our decoder forward against transformers: logits for a prefill and 20 decode steps, and
greedy generations, on tiny random Llama and Qwen2 (q/k/v bias) models."""

import pytest
import torch

from server.engine.request import SamplingParams
from tests.unit.helpers import engine_for, tiny_hf_model

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30,
            31, 32, 33, 34, 35, 36, 37], [30, 31, 32], [40] * 7, [100]]


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_logits_match_transformers_prefill_and_decode(kind, tokenizer):
    hf = tiny_hf_model(kind)
    if kind == "qwen2":  # the default init leaves q/k/v biases at zero; make them count
        for layer in hf.model.layers:
            torch.nn.init.normal_(layer.self_attn.q_proj.bias, std=0.5)
            torch.nn.init.normal_(layer.self_attn.k_proj.bias, std=0.5)
    engine = engine_for(hf, tokenizer)
    prompt = PROMPTS[0]
    engine.add_request(prompt, SamplingParams(max_tokens=21, ignore_eos=True))
    ours = []
    while engine.has_unfinished():
        if engine.step():
            ours.append(engine.runner.last_logits[0])
    seq_ids = torch.tensor([prompt + [int(t.argmax()) for t in ours[:-1]]])
    with torch.no_grad():
        ref = hf(seq_ids).logits[0, len(prompt) - 1 :]  # [21, V]: the prefill's last row + 20 decode rows
    assert len(ours) == 21
    assert (torch.stack(ours) - ref).abs().max() < 1e-4


def test_greedy_batch_matches_transformers_generate(tokenizer):
    hf = tiny_hf_model()
    # A small token budget forces chunked prefill of the long prompt beside decoding ones.
    engine = engine_for(hf, tokenizer, max_prefill_tokens=16)
    seqs = engine.generate(PROMPTS, SamplingParams(max_tokens=20, ignore_eos=True))
    for prompt, seq in zip(PROMPTS, seqs):
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=None,
                          pad_token_id=0)
        assert seq.output_ids == ref[0, len(prompt) :].tolist()
        assert seq.finish_reason.value == "length"
