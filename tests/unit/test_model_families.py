"""Every supported base-model family against transformers on tiny random models (fp32, CPU): our
logits equal transformers' over a chunked prefill and decode steps (Llama 3 rope scaling tied and
untied, Qwen2 biases, Qwen3 q/k norms, Mistral's sliding window, Gemma 2's soft caps and
alternating windows, Gemma 3's local rope and q/k norms, Phi-3's fused checkpoint, longrope and
partial rotary); a PEFT LoRA on every projection equals PEFT (Phi-3's on its fused modules); a
MixLoRA and a MoELoRA on Phi-3's fused modules equal the authors' package and the naive loop; a
MELoRA, a MixLoRA and a gated set in one batch equal each request alone. The logits and PEFT
tests also run on CUDA (fp32) where there is one."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from mole_serve.engine.model import DecoderModel
from mole_serve.engine.paged_attention import INTERPRETED, paged_decode_attention
from mole_serve.engine.request import SamplingParams
from mole_serve.lora.gate import GateConfig, MoLEGate
from mole_serve.lora.kinds import lora as lora_kind
from mole_serve.lora.kinds import mixlora as mixlora_kind
from mole_serve.lora.kinds import moelora as moelora_kind
from mole_serve.lora.kinds.base import FUSED_MODULES, AdapterFormatError
from mole_serve.routing.types import AdapterRef, Selection
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, LlamaConfig, LlamaForCausalLM

from tests.unit import test_moe_kinds
from tests.unit.helpers import ALL_TARGETS, add_adapter, engine_for, last_logits, make_adapter
from tests.unit.test_melora import melora_tensors, write_melora
from tests.unit.test_model import PROMPTS, ours_and_reference
from tests.unit.test_moe_kinds import (
    PROMPT,
    mixlora_config,
    mixlora_package_model,
    mixlora_tensors,
    moelora_config,
    moelora_loop_model,
    moelora_tensors,
    oracle_logits,
    step_logits,
    write_folder,
)

WINDOW = 6  # sliding window: shorter than the prompts, longer than a KV block
BLOCK = 4  # KV block size: a window spans block boundaries
ORIGINAL = 16  # longrope's original_max_position_embeddings
COMMON = dict(
    vocab_size=160,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    initializer_range=0.08,  # logits of order one: a wrong window, cap or rope shows
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
LLAMA3 = dict(
    rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16
    )
)
GEMMA = dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=WINDOW, final_logit_softcapping=3.0)
# name -> (model_type, config fields over COMMON)
FAMILIES: dict[str, tuple[str, dict]] = {
    "llama3-tied": ("llama", {**LLAMA3, "tie_word_embeddings": True}),
    "llama3-untied": ("llama", {**LLAMA3, "tie_word_embeddings": False}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {"head_dim": 32}),  # not hidden / heads
    "mistral": ("mistral", {"sliding_window": WINDOW}),
    "gemma2": ("gemma2", {**GEMMA, "attn_logit_softcapping": 2.0}),  # sliding, full, ...
    "gemma3": (
        "gemma3_text",
        {
            **GEMMA,
            "num_hidden_layers": 3,
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
            "rope_local_base_freq": 100.0,
        },
    ),
    "phi3": (
        "phi3",
        {
            "original_max_position_embeddings": ORIGINAL,
            "partial_rotary_factor": 0.5,  # 8 of head_dim 16 rotate
            "rope_scaling": {"type": "longrope", "short_factor": [1.0, 1.2, 1.5, 2.0], "long_factor": [1.5, 3, 5, 8]},
        },
    ),
}
PEFT_TARGETS = {"phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]}  # its checkpoint's fused modules
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def family_config(family: str):
    model_type, fields = FAMILIES[family]
    return AutoConfig.for_model(model_type, **{**COMMON, **fields})


def randomized(hf):
    """Norm weights and biases away from the constants transformers initializes them to."""
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.3)
    return hf.eval()


def family_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    return randomized(AutoModelForCausalLM.from_config(family_config(family)))


def family_engine(hf, tokenizer, **settings):
    """An engine on blocks of BLOCK positions, a pool of a few hundred (not the CPU default's size)."""
    return engine_for(hf, tokenizer, **{"kv_block_size": BLOCK, "num_kv_blocks": 256, **settings})


def split_twin(model: DecoderModel) -> LlamaForCausalLM:
    """A Llama of the model's shapes on the meta device, q/k/v and gate/up as separate modules:
    what the kind tests' tensor builders read (module names and weight shapes) for any family."""
    config = LlamaConfig(
        vocab_size=8,
        hidden_size=model.hidden_size,
        intermediate_size=model.intermediate_size,
        num_hidden_layers=model.num_layers,
        num_attention_heads=model.num_heads,
        num_key_value_heads=model.num_kv_heads,
        head_dim=model.head_dim,
    )
    with torch.device("meta"):
        return LlamaForCausalLM(config)


def fused_names(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors named for q/k/v and gate/up (the kind tests' builders) renamed onto Phi-3's fused
    modules: each fused LoRA takes its first part's A and the parts' B stacked in the fused
    output's order; the other parts' A are dropped."""
    out = dict(tensors)
    for fused, parts in FUSED_MODULES.items():
        for key in [k for k in tensors if f".{parts[0]}." in k and ".lora_" in k]:
            named = [key.replace(f".{parts[0]}.", f".{part}.") for part in parts]
            for k in named:
                del out[k]
            stacked = [tensors[k] for k in named] if ".lora_B." in key else [tensors[key]]
            out[key.replace(f".{parts[0]}.", f".{fused}.")] = torch.cat(stacked)  # B: [sum d_out, r]
    return out


def logits_error(family: str, tokenizer, device: str = "cpu") -> float:
    """Our logits against transformers' on one device: a 33-token prompt (two prefill chunks, the
    second reading the first from the pool) and 20 decode steps, windows of 6 over blocks of 4."""
    hf = family_model(family).to(device)
    ours, ref = ours_and_reference(hf, family_engine(hf, tokenizer, device=device))
    return (ours - ref).abs().max().item()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_transformers_prefill_and_decode(family, tokenizer):
    assert logits_error(family, tokenizer) < 1e-4


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_transformers_on_cuda(family, tokenizer):
    """fp32 on the GPU, transformers on the same GPU: to 1e-3 (cuBLAS and SDPA kernels differ from
    CPU's, and the compiled decode kernel runs where the family allows it)."""
    assert logits_error(family, tokenizer, "cuda") < 1e-3


@pytest.mark.skipif(not INTERPRETED, reason="CUDA present: the kernel runs compiled in the CUDA tests")
@pytest.mark.parametrize("family", ["gemma3", "gemma2"])
def test_paged_kernel_layers_and_their_fallback_match_transformers(family, tokenizer):
    """With the Triton decode kernel (interpreted here), as on CUDA: Gemma 3's global layers run it
    at query_pre_attn_scalar's scale, its sliding layers and Gemma 2's capped ones fall back to
    the gather path through the block tables."""
    hf = family_model(family)
    engine = family_engine(hf, tokenizer)
    engine.kv.decode_kernel = paged_decode_attention
    ours, ref = ours_and_reference(hf, engine)
    assert (ours - ref).abs().max() < 1e-4


@pytest.mark.parametrize("family", ["mistral", "gemma2", "gemma3"])
def test_sliding_window_batch_matches_transformers_generate(family, tokenizer):
    """Prompts shorter and longer than the window, in prefill chunks of 16 beside decoding rows of
    other lengths (padding), each greedy continuation as transformers' generate."""
    hf = family_model(family)
    engine = family_engine(hf, tokenizer, max_prefill_tokens=16)
    seqs = engine.generate(PROMPTS, SamplingParams(max_tokens=12, ignore_eos=True))
    for prompt, seq in zip(PROMPTS, seqs):
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert seq.output_ids == ref[0, len(prompt) :].tolist()


def test_longrope_switches_factors_with_the_sequence_length(tokenizer):
    """Phi-3's longrope: a step's tokens use the short factors while their sequence is within
    original_max_position_embeddings, the long ones past it, as transformers' rotary embedding
    picks per forward call: a decode that crosses the length equals transformers' forward over its
    cache one token at a time. (transformers' generate() for Phi-3 also drops its cache at the
    crossing and recomputes every key with the long factors; the engine keeps the cached keys.)"""
    hf = family_model("phi3")
    prompt = PROMPT  # 9 tokens: decode positions 9..20 cross 16
    engine = family_engine(hf, tokenizer)
    output, ours = step_logits(engine, prompt, [], tokens=12)
    cache, ids, ref = DynamicCache(config=hf.config), prompt + output, []
    with torch.no_grad():
        ref.append(hf(torch.tensor([prompt]), cache=cache, use_cache=True).logits[0, -1])
        for t in ids[len(prompt) : -1]:
            ref.append(hf(torch.tensor([[t]]), cache=cache, use_cache=True).logits[0, -1])
    assert (ours - torch.stack(ref)).abs().max() < 1e-4


def test_longrope_prompt_in_chunks_uses_the_whole_prompt_length(tokenizer):
    """Each token's sequence length (AttentionMetadata.rope_lens, filled by the runner): a prompt
    past the original length whose first prefill chunk ends within it takes the long factors
    throughout, as transformers' forward over the whole prompt."""
    hf = family_model("phi3")
    engine = family_engine(hf, tokenizer, max_prefill_tokens=16)
    prompt = PROMPTS[0][:24]
    seq = engine.add_request(prompt, SamplingParams(max_tokens=6, ignore_eos=True))
    rows = []
    while not seq.is_finished:
        if engine.step().outputs:
            rows.append(last_logits(engine)[0].clone())
    ref = oracle_logits(hf, prompt, seq.output_ids)
    assert (torch.stack(rows) - ref).abs().max() < 1e-4


def peft_error(family: str, tokenizer, folder, device: str = "cpu") -> float:
    """A PEFT LoRA on every projection served on `device` against PEFT (fp32, CPU) over a prefill
    and 5 decode steps."""
    hf = family_model(family)
    path = make_adapter(hf, folder, seed=1, targets=PEFT_TARGETS.get(family, ALL_TARGETS))
    engine = family_engine(hf, tokenizer, device=device)
    add_adapter(engine, "a", path)
    output, ours = step_logits(engine, PROMPT, [AdapterRef("a")], tokens=6)
    ref = oracle_logits(PeftModel.from_pretrained(copy.deepcopy(hf), path).eval(), PROMPT, output)
    assert (ref - oracle_logits(hf, PROMPT, output)).abs().max() > 1e-2  # the adapter changes the output
    return (ours.cpu() - ref).abs().max().item()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_peft_lora_on_every_projection_matches_peft(family, tokenizer, tmp_path):
    assert peft_error(family, tokenizer, tmp_path / "a") < 1e-4


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("family", list(FAMILIES))
def test_peft_lora_on_every_projection_matches_peft_on_cuda(family, tokenizer, tmp_path):
    """fp32 on the GPU (the Triton LoRA kernels by default) against PEFT on the CPU: to 1e-3."""
    assert peft_error(family, tokenizer, tmp_path / "a", "cuda") < 1e-3


@pytest.mark.parametrize("family", list(FAMILIES))
def test_melora_mixlora_and_gated_set_in_one_batch_equal_each_alone(family, tokenizer, tmp_path):
    hf = family_model(family)
    engine = family_engine(hf, tokenizer, max_loras=16, max_prefill_tokens=24)
    targets = PEFT_TARGETS.get(family, ALL_TARGETS)
    for i in range(3):
        add_adapter(engine, f"a{i}", make_adapter(hf, tmp_path / f"a{i}", seed=20 + i, targets=targets))
    twin = split_twin(engine.model)
    add_adapter(engine, "me", write_melora(tmp_path / "me", melora_tensors(twin, 4, 2, seed=3), 4, 2))
    # act_fn unset: the experts take the family's FFN activation (Gemma's gelu_pytorch_tanh)
    config = mixlora_config(act_fn=None)
    mix = add_adapter(engine, "mix", write_folder(tmp_path / "mix", mixlora_tensors(twin, E=4, r=4, seed=1), config))
    assert mix.moe is not None and mix.moe.act_fn == engine.model.hidden_act
    torch.manual_seed(0)
    engine.pool.attach_gate(MoLEGate(GateConfig.for_base("tiny", engine.model.lora_spec())))
    requests = [
        ([AdapterRef("me")], None),
        ([AdapterRef("mix")], None),
        ([], Selection("gate", explicit=(AdapterRef("a0"), AdapterRef("a1"), AdapterRef("a2")))),
        ([AdapterRef("a0", 0.4), AdapterRef("me", 0.6)], None),
        ([], None),
    ]
    prompts = [PROMPTS[0][: 5 + 3 * i] for i in range(len(requests))]  # up to 17 tokens: past the window
    sampling = SamplingParams(max_tokens=8, ignore_eos=True)
    together = engine.generate(prompts, sampling, [a for a, _ in requests], [s for _, s in requests])
    for prompt, (adapters, selection), seq in zip(prompts, requests, together):
        alone = engine.generate([prompt], sampling, [adapters], [selection])[0]
        assert seq.output_ids == alone.output_ids, (adapters, selection)


def test_fused_module_lora_is_checked_against_the_family_and_split_by_rows(tokenizer, tmp_path):
    hf = family_model("phi3")
    path = make_adapter(hf, tmp_path / "a", seed=1, targets=PEFT_TARGETS["phi3"])
    config = json.loads((path / "adapter_config.json").read_text())
    tensors = load_file(path / "adapter_model.safetensors")
    spec = DecoderModel(hf.config, hf.state_dict(), torch.device("cpu"), torch.float32).lora_spec()
    weights = lora_kind.parse("a", config, tensors, spec, max_rank=64)
    scaling = config["lora_alpha"] / config["r"]
    for fused, parts in (
        ("self_attn.qkv_proj", ("q_proj", "k_proj", "v_proj")),
        ("mlp.gate_up_proj", ("gate_proj", "up_proj")),
    ):
        key = f"base_model.model.model.layers.1.{fused}.lora_{{}}.weight"
        A, B = tensors[key.format("A")], tensors[key.format("B")] * scaling
        rows = B.split([spec.shapes[m][1] for m in parts])
        for part, B_part in zip(parts, rows):
            assert torch.equal(weights.modules[(1, part)][0], A)
            assert torch.allclose(weights.modules[(1, part)][1], B_part)

    engine = family_engine(hf, tokenizer)
    key = "base_model.model.model.layers.0.self_attn.qkv_proj.lora_B.weight"
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps(config))
    save_file({**tensors, key: tensors[key][:-2].contiguous()}, bad / "adapter_model.safetensors")
    with pytest.raises(AdapterFormatError, match="qkv_proj"):
        add_adapter(engine, "bad", bad)
    llama = family_model("llama3-tied")
    llama_spec = DecoderModel(llama.config, llama.state_dict(), torch.device("cpu"), torch.float32).lora_spec()
    with pytest.raises(AdapterFormatError, match="unknown target module '(qkv|gate_up)_proj'"):
        lora_kind.parse("a", config, tensors, llama_spec, max_rank=64)


def test_mixlora_and_moelora_on_fused_modules_equal_their_references(tokenizer, tmp_path, monkeypatch):
    """A MixLoRA and a MoELoRA saved against Phi-3, on qkv_proj and gate_up_proj: the MixLoRA
    against the authors' package (its own Phi-3 forward reads the fused names), the MoELoRA against
    the naive per-token loop around each fused Linear, where one router picks the experts of the
    whole fused output (ours copies it onto each part)."""
    hf = family_model("phi3")
    # the references build their model with tiny_hf_model(): here a fresh copy of this Phi-3
    monkeypatch.setattr(test_moe_kinds, "tiny_hf_model", lambda: copy.deepcopy(hf))
    engine = family_engine(hf, tokenizer, max_loras=16)

    mix = fused_names(mixlora_tensors(split_twin(engine.model), E=4, r=4, seed=1))
    assert "mixlora.layers.1.mlp.gate_up_proj.experts.3.lora_B.weight" in mix
    folder = write_folder(tmp_path / "mix", mix, mixlora_config(target_modules=PEFT_TARGETS["phi3"]), bin_format=True)
    add_adapter(engine, "mix", folder)
    output, ours = step_logits(engine, PROMPT, [AdapterRef("mix")], tokens=8)
    ref = oracle_logits(mixlora_package_model(folder), PROMPT, output)
    assert (ref - oracle_logits(hf, PROMPT, output)).abs().max() > 1e-2  # the adapter changes the output
    assert (ours - ref).abs().max() < 1e-4

    targets = ["qkv_proj", "gate_up_proj", "down_proj"]
    moe = moelora_tensors(hf, E=4, r=4, seed=2, targets=tuple(targets))
    add_adapter(engine, "moe", write_folder(tmp_path / "moe", moe, moelora_config(target_modules=targets)))
    output, ours = step_logits(engine, PROMPT, [AdapterRef("moe")], tokens=8)
    ref = oracle_logits(moelora_loop_model(moe, 4, 2, 8 / 4), PROMPT, output)
    assert (ref - oracle_logits(hf, PROMPT, output)).abs().max() > 1e-2
    assert (ours - ref).abs().max() < 1e-4


def test_moe_kinds_split_fused_modules_and_refuse_them_where_they_cannot_be():
    hf = family_model("phi3")
    model = DecoderModel(hf.config, hf.state_dict(), torch.device("cpu"), torch.float32)
    spec, twin = model.lora_spec(), split_twin(model)
    moe = moelora_tensors(hf, E=4, r=4, seed=2, targets=("qkv_proj", "down_proj"))
    weights = moelora_kind.parse("moe", moelora_config(), moe, spec, max_rank=64)
    prefix = "moelora.layers.1.self_attn.qkv_proj"
    for part in ("q_proj", "k_proj", "v_proj"):
        assert torch.equal(weights.moe.routers[(1, part)], moe[f"{prefix}.moe_gate.weight"])
        assert torch.equal(weights.moe.experts[2][(1, part)][0], moe[f"{prefix}.experts.2.lora_A.weight"])
    assert sorted(m for layer, m in weights.moe.routers if layer == 0) == ["down_proj", "k_proj", "q_proj", "v_proj"]
    beside = {**moe, **moelora_tensors(twin, E=4, r=4, seed=3, targets=("k_proj",))}
    with pytest.raises(AdapterFormatError, match="qkv_proj.experts.0 and one of its parts"):
        moelora_kind.parse("moe", moelora_config(), beside, spec, max_rank=64)

    mix = fused_names(mixlora_tensors(twin, E=4, r=4, seed=1))
    expert = "mixlora.layers.0.mlp.gate_up_proj.experts.0.lora_{}.weight"
    for moved, message in (
        ("mixlora.layers.0.self_attn.gate_up_proj.lora_{}.weight", "shared LoRA on an FFN projection"),
        ("mixlora.layers.0.mlp.qkv_proj.experts.0.lora_{}.weight", "is not on an FFN projection"),
    ):
        bad = {**mix, **{moved.format(w): mix[expert.format(w)] for w in "AB"}}
        with pytest.raises(AdapterFormatError, match=message):
            mixlora_kind.parse("mix", mixlora_config(), bad, spec, max_rank=64)
    llama = family_model("llama3-tied")
    llama_spec = DecoderModel(llama.config, llama.state_dict(), torch.device("cpu"), torch.float32).lora_spec()
    for kind, tensors, config in ((mixlora_kind, mix, mixlora_config()), (moelora_kind, moe, moelora_config())):
        with pytest.raises(AdapterFormatError, match="unknown target module '(qkv|gate_up)_proj'"):
            kind.parse("x", config, tensors, llama_spec, max_rank=64)


def test_a_multimodal_gemma3_checkpoint_serves_its_text_model(tokenizer):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    text = family_config("gemma3").to_dict()
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
    )
    torch.manual_seed(0)
    hf = randomized(Gemma3ForConditionalGeneration(Gemma3Config(text_config=text, vision_config=vision)))
    engine = family_engine(hf, tokenizer)
    assert engine.model.config.model_type == "gemma3_text"
    ours, ref = ours_and_reference(hf, engine)
    assert (ours - ref).abs().max() < 1e-4
