"""The Triton backend without a GPU: every kernel under the Triton interpreter on CPU tensors against
torch_ref (the cases are in triton_cases.py), the backend inside the engine on a batch of every
kind, every kernel compiled for sm_80 and sm_90 in a process without the interpreter, the same
cases on CUDA when there is one, and bench/device_check.sh's dry run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mole_serve.engine.request import SamplingParams
from mole_serve.lora.backends.triton import TritonBackend, ops
from mole_serve.routing.types import AdapterRef, Selection

from tests.unit import triton_cases as cases
from tests.unit.helpers import add_adapter, engine_for, last_logits, make_adapter, tiny_hf_model
from tests.unit.test_melora import melora_tensors, write_melora

ROOT = Path(__file__).resolve().parents[2]
# tests/conftest.py sets TRITON_INTERPRET=1 for the whole run where there is no CUDA
interpreted = pytest.mark.skipif(
    not ops.INTERPRETED, reason="the kernels are compiled in this process (CUDA present): the CUDA test covers them"
)


def _ids(case: tuple) -> str:
    return "-".join(str(v).replace("torch.", "") for v in case)


@interpreted
@pytest.mark.parametrize("case", cases.APPLY_CASES + cases.RANK_CASES, ids=_ids)
def test_apply_matches_torch_ref(case):
    group, rank, K, dense, dtype = case
    cases.check_apply(group, rank, K, dense, dtype, "cpu")


@interpreted
@pytest.mark.parametrize("dense", [False, True])
def test_gated_probe_group_matches_torch_ref(dense):
    cases.check_gate(dense, "cpu")


@interpreted
@pytest.mark.parametrize("case", cases.EXPERT_CASES, ids=_ids)
def test_experts_match_torch_ref(case):
    cases.check_experts(*case, device="cpu")


@interpreted
@pytest.mark.parametrize("dtype", cases.DTYPES, ids=str)
def test_mixlora_ffn_experts_match_torch_ref(dtype):
    cases.check_ffn_experts(dtype, "cpu")


@interpreted
@pytest.mark.parametrize("case", cases.BLOCK_CASES, ids=_ids)
def test_melora_blocks_match_torch_ref(case):
    cases.check_blocks(*case, device="cpu")


def test_recorded_autograd_takes_the_torch_path():
    """train-gate differentiates through the op: the kernels have no backward, so such a step runs
    in torch and the gradient reaches the weights."""
    stack = cases.random_stack("o", 4, torch.float32, "cpu", seed=3)
    batch, counts = cases.random_batch(2, True, "cpu", torch.float32, seed=3)  # train-gate: dense
    weights = batch.token_weights.clone().requires_grad_(True)
    out = torch.zeros(sum(counts), stack.out_columns[-1][1])
    TritonBackend().apply(torch.randn(sum(counts), cases.GROUPS["o"][0]), out, stack, batch, weights)
    out.sum().backward()
    assert weights.grad is not None and weights.grad.abs().sum() > 0


@interpreted
def test_engine_batch_of_every_kind_equals_the_torch_backend(tokenizer, tmp_path):
    """The backend inside the engine (the runner's prepare, decode rows and prefill chunks, the gate,
    MELoRA rows in a fused output's view, MoE experts): the same tokens and logits as torch."""
    from mole_serve.lora.gate import GateConfig, MoLEGate

    from tests.unit.test_moe_kinds import mixlora_config, mixlora_tensors, moelora_config, moelora_tensors, write_folder

    hf = tiny_hf_model()
    make_adapter(hf, tmp_path / "a", seed=11)
    make_adapter(hf, tmp_path / "b", seed=12, rank=3)
    write_melora(tmp_path / "me", melora_tensors(hf, 4, 2, seed=3), 4, 2)
    write_folder(tmp_path / "mix", mixlora_tensors(hf, E=4, r=4, seed=1), mixlora_config())
    write_folder(tmp_path / "moe", moelora_tensors(hf, E=4, r=4, seed=2), moelora_config())
    requests = [
        ([AdapterRef("a")], None),
        ([AdapterRef("a", 0.3), AdapterRef("b", -0.7)], None),
        ([], Selection("gate", explicit=(AdapterRef("a"), AdapterRef("b")))),
        ([AdapterRef("me")], None),
        ([AdapterRef("mix")], None),
        ([AdapterRef("moe")], None),
        ([], None),
    ]
    prompts = [list(range(5, 9 + i)) for i in range(len(requests))]
    runs = []
    for backend in ("triton", "torch"):
        engine = engine_for(hf, tokenizer, max_loras=16, max_prefill_tokens=64, lora_backend=backend)
        assert engine.runner.backend.name == backend
        for name in ("a", "b", "me", "mix", "moe"):
            add_adapter(engine, name, tmp_path / name)
        torch.manual_seed(0)
        engine.pool.attach_gate(MoLEGate(GateConfig.for_base("tiny", engine.model.lora_spec())))
        seqs = engine.generate(
            prompts, SamplingParams(max_tokens=3, ignore_eos=True), [a for a, _ in requests], [s for _, s in requests]
        )
        runs.append(([s.output_ids for s in seqs], last_logits(engine).clone()))
    (tokens, logits), (ref_tokens, ref_logits) = runs
    assert tokens == ref_tokens
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)


def test_backend_setting_defaults_to_triton_on_cuda_only(monkeypatch):
    from mole_serve.config import Settings
    from mole_serve.lora.backends import create_backend

    monkeypatch.delenv("MOLE_LORA_BACKEND", raising=False)
    assert Settings(device="cpu").lora_backend == "torch"
    assert Settings(device="cuda").lora_backend == "triton"  # triton imports here
    assert Settings(device="cuda", lora_backend="torch").lora_backend == "torch"
    monkeypatch.setenv("MOLE_LORA_BACKEND", "triton")
    assert isinstance(create_backend(Settings().lora_backend), TritonBackend)


def _without_interpreter() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _run(*args: str, timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=_without_interpreter(), capture_output=True, text=True, timeout=timeout
    )


def test_every_kernel_compiles_for_sm80_and_sm90():
    """What the interpreter lets through (tl.dot shapes, dtypes, pointer casts) fails here."""
    result = _run("-m", "tests.unit.triton_cases", "compile", timeout=300)
    if result.returncode == 77:  # triton_compile's "cannot compile here" exit, with the reason
        pytest.skip(result.stdout.strip().splitlines()[-1])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_kernels_match_torch_ref_on_cuda():
    result = _run("-m", "tests.unit.triton_cases", "cuda", timeout=600)
    print(result.stdout)  # every case, for device_check.sh's log (pytest -s)
    assert result.returncode == 0, result.stdout + result.stderr


def test_device_check_script_dry_run():
    """bench/device_check.sh --dry-run: every command it would run on the GPU machine parses."""
    env = {**_without_interpreter(), "PYTHON": sys.executable}
    result = subprocess.run(
        ["bash", "bench/device_check.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "dry run: ok" in result.stdout
    assert "MOLE_LORA_BACKEND=torch" in result.stdout and "MOLE_LORA_BACKEND=triton" in result.stdout


def test_throughput_merge_reads_the_log_of_a_run_cut_off(tmp_path):
    """A backend's run killed by its step timeout leaves no JSON: its printed figures still merge."""
    from bench.throughput_merge import merge, read_run

    torch_run = tmp_path / "torch.json"
    torch_run.write_text(json.dumps({"base_tok_s": 1000.0, "hetero1_tok_s": 500.0, "e2e_tok_s": {}}))
    log = tmp_path / "throughput_triton.log"
    log.write_text(
        "Loading weights: 100%\n      base: decode  1100.0 tok/s   end-to-end  1000.0 tok/s\n"
        "   hetero1: decode   750.5 tok/s   end-to-end   700.0 tok/s\n"
        "melora_dense: decode   893.1 tok/s   end-to-end   848.9 tok/s\n"
    )
    merged = merge({"torch": read_run(torch_run), "triton": read_run(log)})
    assert merged["triton/torch"] == {"base": 1.1, "hetero1": 1.501}
    assert merged["backends"]["triton"]["melora_dense_tok_s"] == 893.1
    assert merged["backends"]["triton"]["e2e_tok_s"]["hetero1"] == 700.0
