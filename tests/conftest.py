"""Shared fixtures: a tiny random Llama (fast, CPU) and the real tokenizer of the base model."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The Triton kernels run under the interpreter on CPU (tests/unit/test_triton_lora.py). Triton reads
# this when it is first imported and when @triton.jit decorates, and other packages of the suite
# (xgrammar, torch's inductor) import triton early: set it before anything does. Not where CUDA
# is: there the kernels run compiled.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def base_model_path():
    from mole_serve.config import Settings
    from mole_serve.engine.loader import resolve_base_model

    return resolve_base_model(Settings())


@pytest.fixture(scope="session")
def tokenizer(base_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_model_path)


@pytest.fixture(scope="module")
def gated_engine_parts(tmp_path_factory):
    """A tiny model and four random adapters a0..a3 (tests/unit/test_gate.py's gated_engine)."""
    from tests.unit.helpers import make_adapter, tiny_hf_model

    hf = tiny_hf_model()
    root = tmp_path_factory.mktemp("gated")
    paths = {f"a{i}": make_adapter(hf, root / f"a{i}", seed=200 + i) for i in range(4)}
    torch.manual_seed(5)
    return hf, paths
