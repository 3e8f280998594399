"""A base-model folder with the architecture and tokenizer of a real one and random weights, for
throughput runs where the real weights cannot travel (the GPU machine takes 64 MiB; SmolLM2's GGUF
is 98 MB). Decode speed does not depend on the weights' values: bench.throughput generates a fixed
number of tokens per request (ignore_eos), so every kernel sees the same shapes.

    python -m bench.random_base SRC OUT   # SRC: config.json + tokenizer files (no weights needed)
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
MARKER = "RANDOM_WEIGHTS"  # bench.throughput reports a base with this file as random-weight


def write_random_base(src: Path, out: Path, seed: int = 0) -> Path:
    """Copy src's config and tokenizer files to out, beside freshly initialized weights (the
    architecture's own init, as before training). The folder keeps src's name, so a gate trained
    for that base loads on it."""
    torch.manual_seed(seed)
    config = AutoConfig.from_pretrained(src)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    for file in src.iterdir():
        if file.is_file() and file.name not in WEIGHT_FILES:
            shutil.copy2(file, out / file.name)
    model.save_pretrained(out)
    (out / MARKER).write_text(f"weights initialized at random (seed {seed}); config and tokenizer from {src}\n")
    return out


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    print(write_random_base(Path(sys.argv[1]), Path(sys.argv[2])))
