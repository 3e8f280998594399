"""The paged decode-attention kernel (engine/paged_attention.py) against KVCache's gather + SDPA in
fp32 on the same rounded inputs: under the Triton interpreter on CPU tensors here, compiled on CUDA
when there is one; compiled ahead of time for sm_80 and sm_90 without a GPU; and a CUDA engine's
decode with the kernel against the same engine on SDPA."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mole_serve.engine.kv_cache import AttentionMetadata, KVCache, block_slots
from mole_serve.engine.paged_attention import INTERPRETED, paged_decode_attention
from mole_serve.engine.request import SamplingParams

from tests.unit.helpers import engine_for, last_logits, tiny_hf_model

ROOT = Path(__file__).resolve().parents[2]
BS = 16  # block size
# lengths across block (16) and tile (64) boundaries; 0: a padding row of a graph bucket
LENS = [1, 15, 16, 17, 33, 64, 97, 0]
# |kernel - SDPA in fp32 on the same rounded inputs| <= atol + rtol * |ref|
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.float16: (4e-3, 4e-3), torch.bfloat16: (3e-2, 3e-2)}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (H, kvH, D): GQA with G = 2, plain MHA, G = 8 (one kv head); then the narrowest and widest heads
CASES = [(h, kvh, 64, dtype) for h, kvh in ((4, 2), (4, 4), (8, 1)) for dtype in DTYPES]
CASES += [(4, 2, 16, torch.float32), (2, 1, 256, torch.bfloat16)]

interpreted = pytest.mark.skipif(
    not INTERPRETED, reason="the kernel is compiled in this process (CUDA present): the CUDA test covers it"
)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _ids(case: tuple) -> str:
    return "-".join(str(v).replace("torch.", "") for v in case)


def decode_metadata(tables: torch.Tensor, lens: torch.Tensor) -> AttentionMetadata:
    """A decode-only step's metadata over block tables [N, max_blocks] int32 and lens [N]."""
    L = int(lens.max())
    slots = block_slots(tables, BS)[:, :L].contiguous()
    mask = (torch.arange(L, device=lens.device)[None, :] < lens[:, None]).view(len(lens), 1, 1, L)
    empty = torch.zeros(0, dtype=torch.long, device=lens.device)
    return AttentionMetadata(empty, empty, len(lens), slots, mask, tables, lens.int(), [])


def check_case(H: int, kv_heads: int, D: int, dtype: torch.dtype, device: str, seed: int = 0) -> None:
    """Rows own blocks in random order; their tables carry a spare column, padded with a block no
    row owns; every slot outside a row's first len positions holds NaN in the kernel's pool."""
    g = torch.Generator().manual_seed(seed)
    widths = [-(-n // BS) for n in LENS]
    num_blocks = sum(widths) + 2  # and two blocks no row owns
    order = torch.randperm(num_blocks, generator=g).tolist()
    tables = []
    for i, w in enumerate(widths):
        own = order[sum(widths[:i]) : sum(widths[:i]) + w]
        tables.append(own + [order[-1]] * (max(widths) + 1 - w))
    tables_t = torch.tensor(tables, dtype=torch.int32)
    lens = torch.tensor(LENS, dtype=torch.int32)
    shape = (num_blocks * BS, kv_heads, D)
    k, v = (torch.randn(shape, generator=g).to(dtype) for _ in range(2))
    q = torch.randn(len(LENS), H, D, generator=g).to(dtype)
    attended = torch.cat([block_slots(tables_t[i : i + 1], BS)[0, :n] for i, n in enumerate(LENS)])

    kv = KVCache(1, num_blocks, BS, kv_heads, D, dtype, torch.device(device))
    kv.decode_kernel = paged_decode_attention
    for pool, src in ((kv.k[0], k), (kv.v[0], v)):
        pool.fill_(float("nan"))
        pool[attended.to(device)] = src[attended].to(device)
    out = torch.full((len(LENS), H, D), float("nan"), dtype=dtype, device=device)
    kv._attend_decode(
        0, q.to(device), decode_metadata(tables_t.to(device), lens.to(device)), kv_heads, H // kv_heads, out
    )

    live = lens > 0  # SDPA has no answer for a row that attends to nothing
    ref_kv = KVCache(1, num_blocks, BS, kv_heads, D, torch.float32, torch.device("cpu"))
    ref_kv.k[0].copy_(k)
    ref_kv.v[0].copy_(v)
    expected = torch.empty(int(live.sum()), H, D)
    ref_kv._attend_decode(
        0, q[live].float(), decode_metadata(tables_t[live], lens[live]), kv_heads, H // kv_heads, expected
    )
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(out[live.to(device)].float().cpu(), expected, atol=atol, rtol=rtol)
    assert (out[~live.to(device)] == 0).all(), "a padding row is written with zeros"


@interpreted
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_kernel_matches_gather_and_sdpa(case):
    check_case(*case, device="cpu")


def test_head_dim_outside_the_kernel_is_refused():
    q = torch.zeros(1, 2, 48)
    pool = torch.zeros(BS, 1, 48)
    tables, lens = torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32)
    with pytest.raises(ValueError, match="head_dim"):
        paged_decode_attention(q, pool, pool, tables, lens, BS, 1.0, torch.empty_like(q))


def test_cpu_pool_keeps_gather_and_sdpa():
    assert KVCache(1, 1, BS, 1, 64, torch.float32, torch.device("cpu")).decode_kernel is None


# (compute capability, storage dtype, G, D) compiled ahead of time: every dtype at Llama-3-8B's
# group and head for Hopper, the narrowest and widest heads and a wide group, the serving dtype for Ampere
COMPILE_VARIANTS = [(90, dt, 4, 128) for dt in ("fp32", "fp16", "bf16")]
COMPILE_VARIANTS += [(90, "bf16", 2, 16), (90, "bf16", 32, 256), (80, "bf16", 4, 128)]


def compile_all() -> int:
    """The kernel compiled for COMPILE_VARIANTS: what the interpreter lets through (tl.dot shapes,
    dtype mismatches) fails here. 0: all compiled; 1: a failure (printed); 77: no CUDA compiler."""
    from mole_serve.engine import paged_attention as pa

    from tests.unit.triton_compile import CANNOT_COMPILE, try_compile

    failures = 0
    for cc, dt, group, D in COMPILE_VARIANTS:
        signature = {
            **dict.fromkeys(("q_ptr", "k_ptr", "v_ptr", "out_ptr"), f"*{dt}"),
            **dict.fromkeys(("tables_ptr", "lens_ptr"), "*i32"),
            "scale_log2": "fp32",
            **dict.fromkeys(("stride_qn", "stride_qh", "stride_ks", "stride_kh", "stride_vs"), "i32"),
            **dict.fromkeys(("stride_vh", "stride_tn", "stride_on", "stride_oh"), "i32"),
        }
        const = {
            "GROUP": group,
            "BLOCK_SIZE": BS,
            "BLOCK_H": pa.block_h(group),
            "BLOCK_N": pa.block_n(D),
            "HEAD_DIM": D,
            "DOT_FP32": False,
        }
        signature.update(dict.fromkeys(const, "constexpr"))
        ok = try_compile(pa.paged_decode_kernel, signature, const, cc, f"sm_{cc} {dt} G={group} D={D}")
        if ok is None:
            return CANNOT_COMPILE
        failures += not ok
    return 1 if failures else 0


def test_kernel_compiles_for_sm80_and_sm90():
    """In a process without the interpreter (the kernel must be a JITFunction)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    code = "import sys; from tests.unit.test_paged_attention import compile_all; sys.exit(compile_all())"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    if result.returncode == 77:
        pytest.skip(result.stdout.strip().splitlines()[-1])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_compiled_kernel_matches_gather_and_sdpa_on_cuda(case):
    check_case(*case, device="cuda")


@pytest.mark.cuda
@needs_cuda
def test_engine_decode_with_the_kernel_equals_sdpa_on_cuda(tokenizer):
    """Rows of different lengths decoding across block boundaries: the same tokens, and logits to
    fp32 rounding, with the kernel and with gather + SDPA on the same CUDA engine."""
    hf = tiny_hf_model().cuda()
    # no prefix cache: the second run's prefill is then the first's, only decode attention differs
    engine = engine_for(hf, tokenizer, device="cuda", num_kv_blocks=64, enable_prefix_caching=False)
    assert engine.kv.decode_kernel is paged_decode_attention
    prompts = [list(range(5, 5 + n)) for n in (3, 14, 30)]
    runs = []
    for kernel in (paged_decode_attention, None):
        engine.kv.decode_kernel = kernel
        seqs = engine.generate(prompts, SamplingParams(max_tokens=20, ignore_eos=True))
        runs.append(([s.output_ids for s in seqs], last_logits(engine).clone()))
    (tokens, logits), (ref_tokens, ref_logits) = runs
    assert tokens == ref_tokens
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
