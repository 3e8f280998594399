"""GGUF base models through the loader (engine/loader.py), one tiny case per GGUF family it
converts. A random-weight transformers model is written the way llama.cpp's converter writes that
family (its metadata keys, its tensor names and value transforms, F32 tensors, a small tokenizer and
a chat template in the metadata), converted by the loader, and compared with the model it came
from: the same weights, tokenizer and chat template, the same logits in transformers, and, for the
families engine/model.py's SUPPORTED_MODEL_TYPES lists, the same logits in DecoderModel. Then the
loader's checks: a quantized file, the conversion cache, sharded folders, refusals."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from mole_serve.compose import build
from mole_serve.config import Settings
from mole_serve.engine import loader
from mole_serve.engine.loader import (
    GGUF_MODEL_TYPES,
    UnsupportedBaseModel,
    convert_gguf,
    gguf_cache_dir,
    resolve_base_model,
)
from mole_serve.engine.model import SUPPORTED_MODEL_TYPES, DecoderModel
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.convert_slow_tokenizer import bytes_to_unicode

from tests.unit.helpers import TINY_SHAPE, watch_logits
from tests.unit.test_model import PROMPTS, ours_and_reference

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEXT = "hello world"
SHAPE = dict(TINY_SHAPE, rms_norm_eps=1e-6)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
# GGUF token types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6
TOOL_TAGS = ("<tool_call>", "</tool_call>")


@dataclass(frozen=True)
class Vocab:
    """A tokenizer as GGUF metadata states it (tokenizer.ggml.*)."""

    model: str  # gpt2 (byte-level BPE, with merges) or llama (sentencepiece, with scores)
    tokens: list[str]
    types: list[int]
    bos: int
    eos: int
    merges: list[str] | None = None
    scores: list[float] | None = None
    pre: str | None = None


def bpe_vocab(pre: str) -> Vocab:
    """Byte-level BPE (Llama 3, Qwen): the 256 byte symbols, a few merges, Qwen's tool-call tags
    (added tokens llama.cpp marks user-defined), three control tokens."""
    merges = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld"]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = [*bytes_to_unicode().values(), *(m.replace(" ", "") for m in merges), *TOOL_TAGS, *specials]
    types = [NORMAL] * (len(tokens) - 5) + [USER_DEFINED] * 2 + [CONTROL] * len(specials)
    return Vocab("gpt2", tokens, types, bos=len(tokens) - 2, eos=len(tokens) - 1, merges=merges, pre=pre)


def spm_vocab() -> Vocab:
    """Sentencepiece (Gemma, Phi-3): control tokens, pieces best first, byte fallback."""
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<|im_start|>", "<|im_end|>"]
    words = ["he", "ll", "hell", "hello", "▁hello", "or", "ld", "▁w", "▁wor", "▁world"]
    pieces = ["▁", *"abcdefghijklmnopqrstuvwxyz", *words]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    return Vocab(
        "llama",
        [*specials, *pieces, *byte_tokens],
        [CONTROL, CONTROL, CONTROL, UNKNOWN, CONTROL, CONTROL] + [NORMAL] * len(pieces) + [BYTE] * 256,
        bos=2,
        eos=1,
        scores=[0.0] * len(specials) + [-float(i) for i in range(len(pieces))] + [0.0] * 256,
    )


@dataclass(frozen=True)
class Family:
    arch: str  # the GGUF's general.architecture
    hparams: dict  # the model's config.json: what llama.cpp's converter reads
    vocab: Callable[[], Vocab]


FAMILIES = {
    "llama": Family(  # Llama 3.1+: llama3 rope scaling, which llama.cpp stores as a rope_freqs tensor
        "llama",
        {
            "model_type": "llama",
            **SHAPE,
            "head_dim": 16,
            "max_position_embeddings": 16384,
            "rope_theta": 500000.0,
            "rope_scaling": LLAMA3_ROPE,
            "tie_word_embeddings": False,
        },
        lambda: bpe_vocab("llama-bpe"),
    ),
    "qwen2": Family(  # Qwen2.5: q/k/v biases, tied embeddings, here with YaRN as the long-context files
        "qwen2",
        {
            "model_type": "qwen2",
            **SHAPE,
            "rope_theta": 1000000.0,
            "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
            "tie_word_embeddings": True,
        },
        lambda: bpe_vocab("qwen2"),
    ),
    "qwen3": Family(  # q/k norms, a head_dim other than hidden / heads
        "qwen3",
        {"model_type": "qwen3", **SHAPE, "head_dim": 32, "rope_theta": 1000000.0, "tie_word_embeddings": True},
        lambda: bpe_vocab("qwen2"),
    ),
    "gemma2": Family(  # norms stored +1, soft-capping, a sliding window
        "gemma2",
        {
            "model_type": "gemma2",
            **SHAPE,
            "head_dim": 16,
            "query_pre_attn_scalar": 16,
            "sliding_window": 8,
            "attn_logit_softcapping": 20.0,
            "final_logit_softcapping": 10.0,
            "tie_word_embeddings": True,
        },
        spm_vocab,
    ),
    "gemma3": Family(  # five sliding layers to one global, linear rope scaling on the global ones
        "gemma3",
        {
            "model_type": "gemma3_text",
            **SHAPE,
            "num_hidden_layers": 6,
            "head_dim": 16,
            "query_pre_attn_scalar": 16,
            "sliding_window": 8,
            "rope_theta": 1000000.0,
            "rope_scaling": {"rope_type": "linear", "factor": 8.0},
            "tie_word_embeddings": True,
        },
        spm_vocab,
    ),
    "phi3": Family(  # fused qkv and gate/up, LongRoPE (Phi-3.5), partial rotary (Phi-4-mini)
        "phi3",
        {
            "model_type": "phi3",
            **SHAPE,
            "original_max_position_embeddings": 64,
            "partial_rotary_factor": 0.5,
            "rope_scaling": {
                "rope_type": "longrope",
                "long_factor": [1.0, 1.5, 2.0, 4.0],
                "short_factor": [1.0, 1.1, 1.3, 1.7],
            },
            "tie_word_embeddings": False,
        },
        spm_vocab,
    ),
}


def source_model(family: Family, vocab: Vocab) -> PreTrainedModel:
    """The random-weight model a GGUF is written from, every norm and bias made to count."""
    torch.manual_seed(7)
    ids = {"bos_token_id": vocab.bos, "eos_token_id": vocab.eos, "pad_token_id": None}
    config = AutoConfig.for_model(**family.hparams, **ids, vocab_size=len(vocab.tokens))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.3)
    return model


def llama3_rope_freqs(hparams: dict) -> np.ndarray:
    """The divisors llama.cpp's LlamaModel writes as rope_freqs for rope_type llama3 (its own loop)."""
    rope, base, dim = hparams["rope_scaling"], hparams["rope_theta"], hparams["head_dim"]
    context, low_factor, high_factor = (
        rope["original_max_position_embeddings"],
        rope["low_freq_factor"],
        rope["high_freq_factor"],
    )
    low, high = context / low_factor, context / high_factor
    factors = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * base ** (i / dim)
        if wavelen < high:
            factors.append(1.0)
        elif wavelen > low:
            factors.append(rope["factor"])
        else:
            smooth = (context / wavelen - rope["low_freq_factor"]) / (
                rope["high_freq_factor"] - rope["low_freq_factor"]
            )
            factors.append(1 / ((1 - smooth) / rope["factor"] + smooth))
    return np.array(factors, dtype=np.float32)


def permute_for_llama_cpp(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: q/k rows reordered from rotate-half to interleaved pairs."""
    return (
        weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def write_gguf(
    model: PreTrainedModel,
    family: Family,
    vocab: Vocab,
    path: Path,
    quant: gguf.GGMLQuantizationType | None = None,
    rope_freqs: np.ndarray | None = None,
) -> Path:
    """`model` as llama.cpp's convert_hf_to_gguf.py writes its family (F32, or `quant` for the
    matrices whose rows fit its blocks)."""
    h, arch = family.hparams, family.arch
    hidden, heads = h["hidden_size"], h["num_attention_heads"]
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name(f"tiny-{arch}")
    writer.add_context_length(h["max_position_embeddings"])
    writer.add_embedding_length(hidden)
    writer.add_block_count(h["num_hidden_layers"])
    writer.add_feed_forward_length(h["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(h["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(h["rms_norm_eps"])
    if "rope_theta" in h:
        writer.add_rope_freq_base(h["rope_theta"])
    if "head_dim" in h:
        writer.add_key_length(h["head_dim"])
        writer.add_value_length(h["head_dim"])
    rope = h.get("rope_scaling") or {}
    extra: dict[str, np.ndarray] = {}
    if arch == "llama":
        writer.add_rope_dimension_count(h.get("head_dim", hidden // heads))
        writer.add_vocab_size(len(vocab.tokens))
        if rope.get("rope_type") == "llama3":
            extra["rope_freqs.weight"] = llama3_rope_freqs(h) if rope_freqs is None else rope_freqs
    if arch == "qwen2" and rope.get("rope_type") == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    if arch in ("gemma2", "gemma3"):
        writer.add_sliding_window(h["sliding_window"])
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(h["attn_logit_softcapping"])
        writer.add_final_logit_softcapping(h["final_logit_softcapping"])
    if arch == "gemma3" and rope:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    if arch == "phi3":
        original, longest = h["original_max_position_embeddings"], h["max_position_embeddings"]
        writer.add_rope_dimension_count(int(h.get("partial_rotary_factor", 1.0) * hidden) // heads)
        writer.add_sliding_window(h.get("sliding_window") or 0)
        writer.add_rope_scaling_orig_ctx_len(original)
        writer.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(longest / original) / math.log(original)))
        extra["rope_factors_long.weight"] = np.array(rope["long_factor"], dtype=np.float32)
        extra["rope_factors_short.weight"] = np.array(rope["short_factor"], dtype=np.float32)

    writer.add_tokenizer_model(vocab.model)
    if vocab.pre:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    if vocab.scores:
        writer.add_token_scores(vocab.scores)
    writer.add_bos_token_id(vocab.bos)
    writer.add_eos_token_id(vocab.eos)
    writer.add_chat_template(CHAT_TEMPLATE)

    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_id, h["num_hidden_layers"])
    tied = model.config.tie_word_embeddings
    for key, tensor in model.state_dict().items():
        if tied and key == "lm_head.weight":
            continue
        module, suffix = key.rsplit(".", 1)
        name = f"{names.get_name(module)}.{suffix}"
        data = tensor.numpy().astype(np.float32)
        if arch == "llama" and name.endswith("attn_q.weight"):
            data = permute_for_llama_cpp(data, heads)
        elif arch == "llama" and name.endswith("attn_k.weight"):
            data = permute_for_llama_cpp(data, h["num_key_value_heads"])
        if arch in ("gemma2", "gemma3") and name.endswith("norm.weight"):
            data = data + 1
        if quant is not None and data.ndim == 2 and data.shape[1] % gguf.GGML_QUANT_SIZES[quant][0] == 0:
            writer.add_tensor(name, gguf.quants.quantize(data, quant), raw_dtype=quant)
        else:
            writer.add_tensor(name, data)
    for name, data in extra.items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def hf_logits(model: PreTrainedModel, vocab_size: int) -> torch.Tensor:
    ids = torch.tensor([[t % vocab_size for t in PROMPTS[0]]])
    with torch.no_grad():
        return model(ids).logits[0]


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict[str, tuple[PreTrainedModel, Vocab, Path]]:
    """family -> (the source model, its vocabulary, its GGUF)"""
    root = tmp_path_factory.mktemp("gguf")
    out = {}
    for name, family in FAMILIES.items():
        vocab = family.vocab()
        model = source_model(family, vocab)
        out[name] = (model, vocab, write_gguf(model, family, vocab, root / f"tiny-{name}.gguf"))
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_a_gguf_converts_to_the_model_it_was_written_from(family, cases, tmp_path):
    model, vocab, path = cases[family]
    convert_gguf(path, tmp_path / "out")
    folder = tmp_path / "out"

    config = AutoConfig.from_pretrained(folder)
    assert config.model_type == GGUF_MODEL_TYPES[FAMILIES[family].arch]
    source = {k: v for k, v in model.state_dict().items() if not (config.tie_word_embeddings and k == "lm_head.weight")}
    converted = weights(folder)
    assert converted.keys() == source.keys()
    for key, tensor in source.items():  # (to float32 rounding: Gemma's norms are stored plus one)
        torch.testing.assert_close(converted[key], tensor, rtol=0, atol=1e-6, msg=key)

    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert tokenizer.eos_token == vocab.tokens[vocab.eos]
    assert tokenizer.decode(tokenizer(TEXT, add_special_tokens=False).input_ids) == TEXT
    if TOOL_TAGS[0] in vocab.tokens:  # whole tokens that the detokenizer (skip_special_tokens) keeps
        call = f'{TOOL_TAGS[0]}{{"name": "f"}}{TOOL_TAGS[1]}'
        ids = tokenizer(call, add_special_tokens=False).input_ids
        assert {vocab.tokens.index(t) for t in TOOL_TAGS} <= set(ids)
        assert tokenizer.decode(ids, skip_special_tokens=True) == call

    # every config field the forward reads came through (rope scaling, head and window sizes, capping)
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert (hf_logits(reloaded, len(vocab.tokens)) - hf_logits(model, len(vocab.tokens))).abs().max() < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_a_gguf_base_model_is_served_by_the_forward(family, cases, tmp_path):
    """MOLE_BASE_MODEL=file.gguf: DecoderModel on the converted folder gives the source model's
    logits (a prefill and 20 decode steps)."""
    model, vocab, path = cases[family]
    settings = Settings(base_model=str(path), cache_dir=tmp_path)
    folder = resolve_base_model(settings)
    assert folder == gguf_cache_dir(path, tmp_path) and folder.name == path.stem  # the served model's id
    tokenizer = AutoTokenizer.from_pretrained(folder)
    engine = build(
        Settings(max_num_seqs=8, max_model_len=128, max_prefill_tokens=32, max_loras=8),
        retrieval=False,
        load_store=False,
        model=DecoderModel.from_pretrained(folder, torch.device("cpu"), torch.float32),
        tokenizer=tokenizer,
    ).engine
    assert engine.model_name == path.stem
    ours, reference = ours_and_reference(model, watch_logits(engine))
    assert (ours - reference).abs().max() < 1e-4


def test_a_quantized_gguf_is_dequantized_once_per_file(cases, tmp_path, monkeypatch):
    model, vocab, _ = cases["llama"]
    quant = gguf.GGMLQuantizationType.Q8_0
    path = write_gguf(model, FAMILIES["llama"], vocab, tmp_path / "tiny-llama-Q8_0.gguf", quant=quant)
    settings = Settings(base_model=str(path), cache_dir=tmp_path / "cache")
    folder = resolve_base_model(settings)
    converted = weights(folder)
    for key, tensor in model.state_dict().items():
        data = tensor.numpy()
        if data.ndim == 2:  # the quantized matrices: Q8_0's values, exactly (rows permute block by block)
            data = gguf.quants.dequantize(gguf.quants.quantize(data, quant), quant)
        assert torch.equal(converted[key], torch.from_numpy(data)), key

    def no_conversion(*args):
        raise AssertionError("converted again")

    monkeypatch.setattr(loader, "convert_gguf", no_conversion)
    assert resolve_base_model(settings) == folder  # the same file: its conversion is reused
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    with pytest.raises(AssertionError, match="converted again"):  # a changed file converts again
        resolve_base_model(settings)


def test_a_gguf_family_the_forward_does_not_run_is_refused_before_converting(cases, tmp_path, monkeypatch):
    monkeypatch.setattr(loader, "SUPPORTED_MODEL_TYPES", ("llama", "mistral"))
    with pytest.raises(
        UnsupportedBaseModel, match="GGUF architecture 'qwen3'.*'qwen3' is not supported.*llama, mistral"
    ):
        resolve_base_model(Settings(base_model=str(cases["qwen3"][2]), cache_dir=tmp_path))
    assert not (tmp_path / "gguf").exists()


def test_a_gguf_of_another_architecture_is_refused_naming_it(tmp_path):
    path = tmp_path / "coder.gguf"
    writer = gguf.GGUFWriter(path, "starcoder2")
    writer.add_block_count(2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedBaseModel, match="GGUF architecture 'starcoder2'.* converts llama, qwen2"):
        resolve_base_model(Settings(base_model=str(path), cache_dir=tmp_path))
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf")
    with pytest.raises(UnsupportedBaseModel, match="not a readable GGUF"):
        resolve_base_model(Settings(base_model=str(tmp_path / "junk.gguf"), cache_dir=tmp_path))
    with pytest.raises(FileNotFoundError, match="no such GGUF"):
        resolve_base_model(Settings(base_model=str(tmp_path / "absent.gguf"), cache_dir=tmp_path))


def test_rope_frequency_factors_other_than_llama3s_are_refused(cases, tmp_path):
    """llama.cpp stores Llama 3's rope scaling as divisors only; divisors no Llama 3 parameters
    give would be served wrong, so they are refused."""
    model, vocab, _ = cases["llama"]
    odd = np.linspace(1.0, 3.0, 8, dtype=np.float32)
    path = write_gguf(model, FAMILIES["llama"], vocab, tmp_path / "odd.gguf", rope_freqs=odd)
    with pytest.raises(UnsupportedBaseModel, match="rope_freqs"):
        convert_gguf(path, tmp_path / "out")


def test_a_sharded_folder_is_served_and_a_missing_shard_named(cases, tmp_path):
    model = cases["qwen2"][0]
    folder = tmp_path / "sharded"
    model.save_pretrained(folder, max_shard_size="100KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    assert resolve_base_model(Settings(base_model=str(folder))) == folder
    loaded = DecoderModel.from_pretrained(folder, torch.device("cpu"), torch.float32)
    assert torch.equal(loaded.embed, model.model.embed_tokens.weight)
    (folder / shards[1]).unlink()
    with pytest.raises(FileNotFoundError, match=f"1 of the {len(shards)} shards.*{shards[1]}"):
        resolve_base_model(Settings(base_model=str(folder)))


def test_a_folder_the_forward_cannot_run_is_refused_at_start(tmp_path):
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(UnsupportedBaseModel, match=f"'gpt2' is not supported.*{', '.join(SUPPORTED_MODEL_TYPES)}"):
        resolve_base_model(Settings(base_model=str(folder)))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (folder / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="only pytorch_model.bin: save the model with safetensors"):
        resolve_base_model(Settings(base_model=str(folder)))
    with pytest.raises(FileNotFoundError, match="not a Hugging Face model folder"):
        resolve_base_model(Settings(base_model=str(tmp_path / "nothing")))
