"""Shared pieces of the benchmarks: machine description, JSON output, synthetic adapters."""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import torch
from mole_serve.lora.kinds.base import TARGET_MODULES, LoRATargetSpec
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]


@contextmanager
def served(env: dict[str, str], log: Path) -> Iterator[tuple[str, int]]:
    """`mole-serve serve` in a subprocess on a free loopback port with these MOLE_* settings;
    yields (url, pid) once /health answers, stops it after."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "mole_serve", "serve", "--port", str(port)],
        env={**os.environ, "HF_HUB_OFFLINE": "1", **env},
        cwd=REPO,
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the server did not start:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        yield url, proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def cpu_model() -> str:
    """The CPU's marketing name (/proc/cpuinfo): MKL's speed differs a lot between vendors."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def timed(fn: Callable[[int], object], iters: int, warmup: int = 10) -> dict:
    """p50/p99 in ms of fn(i) over iters calls, after warm-up."""
    for i in range(warmup):
        fn(i)
    times = []
    for i in range(iters):
        start = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - start)
    return {
        "p50_ms": round(float(np.percentile(times, 50)) * 1e3, 3),
        "p99_ms": round(float(np.percentile(times, 99)) * 1e3, 3),
    }


def machine() -> dict:
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
    }


def write_json(path: str | Path, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")


def synthetic_adapter(out_dir: Path, spec: LoRATargetSpec, rank: int, seed: int, blocks: int = 0) -> Path:
    """A folder with small random A/B on all projections: real shapes and bytes for throughput
    work, no training needed. blocks > 0: a MELoRA of that many mini LoRAs of rank `rank` each
    (the authors' layout), else a PEFT LoRA."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(spec.num_layers):
        for module in TARGET_MODULES:
            d_in, d_out = spec.shapes[module]
            part = "self_attn" if module.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            key = f"base_model.model.model.layers.{layer}.{part}.{module}"
            n = max(blocks, 1)
            for suffix in [f".{i}" for i in range(blocks)] or [""]:
                tensors[f"{key}.lora_A{suffix}.weight"] = torch.randn(rank, d_in // n, generator=g) * 0.02
                tensors[f"{key}.lora_B{suffix}.weight"] = torch.randn(d_out // n, rank, generator=g) * 0.02
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out_dir / "adapter_model.safetensors")
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": list(TARGET_MODULES),
        "bias": "none",
    }
    if blocks:
        config = {**config, "peft_type": "MELORA", "r": [rank] * blocks, "lora_alpha": [2 * rank] * blocks}
    (out_dir / "adapter_config.json").write_text(json.dumps(config))
    return out_dir


def synthetic_moe_adapter(
    out_dir: Path, spec: LoRATargetSpec, kind: str, experts: int, top_k: int, rank: int, seed: int
) -> Path:
    """A random MixLoRA (shared attention LoRAs, FFN experts, a router per layer) or MoELoRA (a router
    and E experts on every projection) on all 7 projections, in MoE-PEFT's layout; written as
    safetensors and as the .bin the `mixlora` package reads."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}

    def pair(prefix: str, module: str) -> None:
        d_in, d_out = spec.shapes[module]
        tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, d_in, generator=g) * 0.02
        tensors[f"{prefix}.lora_B.weight"] = torch.randn(d_out, rank, generator=g) * 0.02

    for layer in range(spec.num_layers):
        for module in TARGET_MODULES:
            part = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            key = f"{kind}.layers.{layer}.{part}.{module}"
            if kind == "mixlora" and part == "self_attn":
                pair(key, module)
                continue
            if kind == "moelora":
                tensors[f"{key}.moe_gate.weight"] = torch.randn(experts, spec.shapes[module][0], generator=g) * 0.1
            for e in range(experts):
                pair(f"{key}.experts.{e}", module)
        if kind == "mixlora":
            tensors[f"mixlora.layers.{layer}.mlp.moe_gate.weight"] = (
                torch.randn(experts, spec.shapes["gate_proj"][0], generator=g) * 0.1
            )
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out_dir / "adapter_model.safetensors")
    torch.save(tensors, out_dir / "adapter_model.bin")
    config = {
        "peft_type": kind.upper(),
        "routing_strategy": kind,
        "num_experts": experts,
        "top_k": top_k,
        "r": rank,
        "lora_alpha": 2 * rank,
        "lora_dropout": 0.05,
        "target_modules": list(TARGET_MODULES),
        "bias": "none",
        "act_fn": spec.hidden_act,
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "base",
    }
    (out_dir / "adapter_config.json").write_text(json.dumps(config))
    return out_dir
