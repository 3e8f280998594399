"""Our decoder forward against transformers: logits for a prefill and 20 decode steps, and
greedy generations, on tiny random Llama and Qwen2 (q/k/v bias) models."""

import pytest
import torch
from mole_serve.engine.request import SamplingParams

from tests.unit.helpers import engine_for, last_logits, tiny_hf_model

PROMPTS = [
    [
        5,
        6,
        7,
        8,
        9,
        10,
        11,
        12,
        13,
        14,
        15,
        16,
        17,
        18,
        19,
        20,
        21,
        22,
        23,
        24,
        25,
        26,
        27,
        28,
        29,
        30,
        31,
        32,
        33,
        34,
        35,
        36,
        37,
    ],
    [30, 31, 32],
    [40] * 7,
    [100],
]


def ours_and_reference(hf, engine) -> tuple[torch.Tensor, torch.Tensor]:
    """Our float32 logits for a prefill and 20 decode steps of PROMPTS[0], and transformers' (fp32)
    over the same tokens: both [21, V], on the engine's device."""
    prompt = PROMPTS[0]
    engine.add_request(prompt, SamplingParams(max_tokens=21, ignore_eos=True))
    ours = []
    while engine.has_unfinished():
        if engine.step().outputs:
            ours.append(last_logits(engine)[0])
    assert len(ours) == 21
    seq_ids = torch.tensor([prompt + [int(t.argmax()) for t in ours[:-1]]], device=ours[0].device)
    with torch.no_grad():
        ref = hf(seq_ids).logits[0, len(prompt) - 1 :].float()  # the prefill's last row + 20 decode rows
    return torch.stack(ours), ref


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_logits_match_transformers_prefill_and_decode(kind, tokenizer):
    hf = tiny_hf_model(kind)
    if kind == "qwen2":  # the default init leaves q/k/v biases at zero; make them count
        for layer in hf.model.layers:
            torch.nn.init.normal_(layer.self_attn.q_proj.bias, std=0.5)
            torch.nn.init.normal_(layer.self_attn.k_proj.bias, std=0.5)
    ours, ref = ours_and_reference(hf, engine_for(hf, tokenizer))
    assert (ours - ref).abs().max() < 1e-4


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_logits_match_transformers_on_cuda(dtype, tokenizer):
    """The CUDA path (paged KV, SDPA, the triton LoRA backend by default) against transformers in
    fp32 on the same GPU: fp32 to 1e-3 (cuBLAS and SDPA kernels differ from CPU's), bf16 to 5% of the
    logits' range (bf16 keeps ~3 significant digits per operation)."""
    hf = tiny_hf_model().cuda()
    engine = engine_for(hf, tokenizer, dtype, device="cuda", num_kv_blocks=64)  # not half the GPU
    ours, ref = ours_and_reference(hf, engine)
    tolerance = 1e-3 if dtype == torch.float32 else 0.05 * float(ref.max() - ref.min())
    assert (ours - ref).abs().max() < tolerance


def test_greedy_batch_matches_transformers_generate(tokenizer):
    hf = tiny_hf_model()
    # A small token budget forces chunked prefill of the long prompt beside decoding ones.
    engine = engine_for(hf, tokenizer, max_prefill_tokens=16)
    seqs = engine.generate(PROMPTS, SamplingParams(max_tokens=20, ignore_eos=True))
    for prompt, seq in zip(PROMPTS, seqs):
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert seq.output_ids == ref[0, len(prompt) :].tolist()
        assert seq.finish_reason.value == "length"
