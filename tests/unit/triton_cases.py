"""The Triton backend's cases against torch_ref, shared by the interpreted tests (test_triton_lora.py,
CPU tensors) and by a CUDA run in a process of its own; and the ahead-of-time compile of every
kernel for a GPU target. Not collected by pytest (no test_ prefix): the importer decides whether
the kernels are interpreted (TRITON_INTERPRET is read when the kernel module is imported).

    python -m tests.unit.triton_cases cuda       # every case on the GPU, compiled kernels
    python -m tests.unit.triton_cases compile    # every kernel for sm_80 and sm_90, no GPU needed
"""

from __future__ import annotations

import itertools
import random
import sys

import torch
from mole_serve.lora.backends.base import LoRABackend
from mole_serve.lora.backends.torch_ref import TorchBackend
from mole_serve.lora.backends.triton import TritonBackend
from mole_serve.lora.batch import BlockRows, LoRABatchInfo, as_range, build_lora_batch
from mole_serve.lora.gate import GateConfig, GateStats, MoLEGate
from mole_serve.lora.stacks import GroupStack

# Every module group's column split, at toy sizes that divide no tile: group -> (d_in, outs)
GROUPS = {"qkv": (40, [24, 8, 8]), "o": (24, [40]), "gate_up": (40, [56, 56]), "down": (56, [40])}
WEIGHTS = (1.0, -0.5, 0.0, 0.3, 2.0, -1.25)  # priors as callers may send them: zero and negative too
SLOTS = 9
# |kernel - torch_ref in fp32 on the same rounded inputs| <= atol + rtol * |ref|
TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-2, 1e-2), torch.bfloat16: (8e-2, 2e-2)}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (rank, K) pairs: ranks 1..64 (none a multiple of 16 but 64) and one over 64, every K from 1 to 4
RANKS_K = ((1, 1), (3, 2), (17, 3), (64, 4), (33, 1), (80, 2))


def random_stack(group: str, rank: int, dtype: torch.dtype, device: str, seed: int) -> GroupStack:
    """A group's slot stacks, scaled so that every z and delta is O(1); slot 0 all zero."""
    d_in, outs = GROUPS[group]
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(SLOTS, len(outs) * rank, d_in, generator=g) / d_in**0.5
    B = [torch.randn(SLOTS, rank, d, generator=g) / rank**0.5 for d in outs]
    A[0] = 0
    for b in B:
        b[0] = 0
    columns = [(sum(outs[:j]), sum(outs[: j + 1])) for j in range(len(outs))]
    return GroupStack(A.to(device, dtype), [b.to(device, dtype) for b in B], columns)


def as_fp32(stack: GroupStack) -> GroupStack:
    return GroupStack(stack.A.float(), [b.float() for b in stack.B], stack.out_columns)


def random_batch(K: int, dense: bool, device: str, dtype: torch.dtype, seed: int) -> tuple[LoRABatchInfo, list[int]]:
    """7 decode rows (two neighbours share their set: one segment; one row in the middle and the
    last have no adapter: no segment covers the last), then prefill chunks of 7, 0 (an empty
    segment) and 19 tokens. -> (batch, tokens per sequence)."""
    rng = random.Random(seed)

    def one_set(k: int) -> tuple[tuple[int, ...], tuple[float, ...]]:
        return tuple(rng.sample(range(1, SLOTS), k)), tuple(rng.choice(WEIGHTS) for _ in range(k))

    sets = [one_set(rng.randint(1, K)) for _ in range(4)]
    sets.insert(2, sets[1])
    sets.insert(4, ((), ()))
    sets += [((), ()), one_set(K), one_set(rng.randint(1, K)), one_set(K)]
    counts = [1] * 7 + [7, 0, 19]
    batch = build_lora_batch(sets, counts, 7, torch.device(device), dtype, force_dense=dense)
    assert (batch.unique_slots is not None) == dense
    return batch, counts


def assert_close(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(got.float(), expected.float(), atol=atol, rtol=rtol)


def check_apply(group: str, rank: int, K: int, dense: bool, dtype: torch.dtype, device: str, seed: int = 0) -> None:
    """TritonBackend.apply == TorchBackend.apply in fp32 on the same inputs, added into a nonzero base output."""
    stack = random_stack(group, rank, dtype, device, seed)
    batch, counts = random_batch(K, dense, device, dtype, seed)
    T, d_out = sum(counts), stack.out_columns[-1][1]
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(T, GROUPS[group][0], generator=g).to(device, dtype)
    base = torch.randn(T, d_out, generator=g).to(device, dtype)
    out = base.clone()
    backend = TritonBackend()
    backend.prepare(batch, 0, 0)
    weights = backend.apply(x, out, stack, batch, batch.token_weights)
    expected = base.float()
    w32 = None if batch.token_weights is None else batch.token_weights.float()
    TorchBackend().apply(x.float(), expected, as_fp32(stack), batch, w32)
    assert weights is batch.token_weights
    assert_close(out, expected, dtype)


def check_gate(dense: bool, device: str, seed: int = 0) -> None:
    """At the probe group with a gate (fp32): the same weights, statistics and output as torch_ref."""
    stack = random_stack("qkv", 5, torch.float32, device, seed)
    batch, counts = random_batch(3, dense, device, torch.float32, seed)
    d_in, outs = GROUPS["qkv"]
    gate = MoLEGate(GateConfig("base", num_layers=1, hidden_size=d_in, probe_size=sum(outs), rank=6))
    torch.nn.init.normal_(gate.log_gain, 1.0)
    layer = gate.to(device).requires_grad_(False).layer_gates([{"qkv": stack}])[0]
    gated = [i % 2 == 0 for i in range(len(counts))]
    x = torch.randn(sum(counts), d_in, device=device)
    results = []
    for backend in (TritonBackend(), TorchBackend()):
        out, stats = torch.zeros(sum(counts), sum(outs), device=device), GateStats.for_batch(batch, gated, counts)
        backend.prepare(batch, 0, 0)
        results.append((out, backend.apply(x, out, stack, batch, batch.token_weights, layer, stats), stats.sums))
    for got, expected in zip(*results):
        assert_close(got, expected, torch.float32)


def check_experts(group: str, with_weights: bool, dtype: torch.dtype, device: str, seed: int = 0) -> None:
    """MoE kinds: every row against one adapter's E expert slots, top-2 of 4 weights per module."""
    stack = random_stack(group, 6, dtype, device, seed)
    n, E, T = len(stack.B), 4, 13
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, GROUPS[group][0], generator=g).to(device, dtype)
    slots = torch.tensor([2, 3, 5, 8], device=device)  # not a range: gathered expert slots
    weights = None
    if with_weights:
        probs = torch.softmax(torch.randn(T, n, E, generator=g), -1)
        top, experts = probs.topk(2, dim=-1)
        weights = torch.zeros(T, n, E).scatter_(-1, experts, top).to(device, dtype)
    base = torch.randn(T, stack.out_columns[-1][1], generator=g).to(device, dtype)
    out, expected = base.clone(), base.float()
    TritonBackend().apply_experts(x, out, stack, slots, None, weights)
    LoRABackend().apply_experts(
        x.float(), expected, as_fp32(stack), slots, None, None if weights is None else weights.float()
    )
    assert_close(out, expected, dtype)


def check_ffn_experts(dtype: torch.dtype, device: str, seed: int = 0) -> None:
    """MixLoRA's FFN experts: each token's k selected experts' gate/up outputs, then the down
    projection of each expert's own activation, weighted and summed per token."""
    E, k, T = 4, 2, 11
    slots = torch.tensor([1, 2, 3, 4], device=device)
    g = torch.Generator().manual_seed(seed)
    experts = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).to(device)  # [T, k]
    weights = torch.softmax(torch.randn(T, k, generator=g), -1).to(device, dtype)
    gate_up = random_stack("gate_up", 5, dtype, device, seed)
    x = torch.randn(T, GROUPS["gate_up"][0], generator=g).to(device, dtype)
    got = TritonBackend().selected_expert_outputs(x, gate_up, slots, (1, 5), experts)
    expected = LoRABackend().selected_expert_outputs(x.float(), as_fp32(gate_up), slots, (1, 5), experts)
    for got_j, expected_j in zip(got, expected, strict=True):
        assert_close(got_j, expected_j, dtype)
    down = random_stack("down", 5, dtype, device, seed)
    xk = torch.randn(T, k, GROUPS["down"][0], generator=g).to(device, dtype)
    base = torch.randn(T, GROUPS["down"][1][0], generator=g).to(device, dtype)
    out, expected = base.clone(), base.float()
    TritonBackend().apply_routed_inputs(xk, out, down, slots, (1, 5), experts, weights)
    LoRABackend().apply_routed_inputs(xk.float(), expected, as_fp32(down), slots, (1, 5), experts, weights.float())
    assert_close(out, expected, dtype)


def check_blocks(n: int, rank: int, rows: list[int], dtype: torch.dtype, device: str, seed: int = 0) -> None:
    """MELoRA's native blocks, into a column view of a wider fused output (as the layer passes it)."""
    d_in, d_out, T = 8 * n, 6 * n, 11
    g = torch.Generator().manual_seed(seed)
    A = (torch.randn(SLOTS, n, rank, d_in // n, generator=g) / (d_in // n) ** 0.5).to(device, dtype)
    B = (torch.randn(SLOTS, n, d_out // n, rank, generator=g) / rank**0.5).to(device, dtype)
    x = torch.randn(T, d_in, generator=g).to(device, dtype)
    fused = torch.randn(T, d_out + 10, generator=g).to(device, dtype)
    expected = fused.float()
    block_rows = BlockRows(
        (n, rank),
        torch.tensor(rows, device=device),
        torch.tensor([1 + i % (SLOTS - 1) for i in range(len(rows))], device=device),
        torch.tensor([WEIGHTS[i % len(WEIGHTS)] for i in range(len(rows))], device=device, dtype=dtype),
        as_range(rows),
    )
    TritonBackend().apply_blocks(x, fused[:, 4 : 4 + d_out], A, B, block_rows)
    w32 = BlockRows(
        block_rows.shape, block_rows.rows, block_rows.slots, block_rows.weights.float(), block_rows.row_range
    )
    LoRABackend().apply_blocks(x.float(), expected[:, 4 : 4 + d_out], A.float(), B.float(), w32)
    assert_close(fused, expected, dtype)


APPLY_CASES = []  # every group in every dtype, both paths, the (rank, K) pairs in turn
for i, (group, dtype) in enumerate(itertools.product(GROUPS, DTYPES)):
    APPLY_CASES += [(group, *RANKS_K[i % len(RANKS_K)], dense, dtype) for dense in (False, True)]
RANK_CASES = [c for c in (("qkv", rank, K, False, torch.float32) for rank, K in RANKS_K) if c not in APPLY_CASES]
EXPERT_CASES = [(group, w, dtype) for group in ("qkv", "down") for w in (True, False) for dtype in DTYPES]
BLOCK_CASES = [
    (n, rank, rows, dtype) for n, rank, rows in ((4, 1, [0, 1, 2, 3]), (2, 3, [1, 4, 5, 9])) for dtype in DTYPES
]


def run_all(device: str) -> int:
    """Every case on one device; prints each, returns the number of failures."""
    cases = (
        [(check_apply, c) for c in APPLY_CASES + RANK_CASES]
        + [(check_gate, (d,)) for d in (False, True)]
        + [(check_experts, c) for c in EXPERT_CASES]
        + [(check_ffn_experts, (d,)) for d in DTYPES]
        + [(check_blocks, c) for c in BLOCK_CASES]
    )
    failures = 0
    for fn, args in cases:
        try:
            fn(*args, device=device)
            print(f"ok   {fn.__name__}{args}", flush=True)
        except AssertionError as e:
            failures += 1
            print(f"FAIL {fn.__name__}{args}: {e}", flush=True)
    print(f"{len(cases) - failures} passed, {failures} failed on {device}")
    return failures


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else ""
    if mode == "cuda":
        sys.exit(1 if run_all("cuda") else 0)
    if mode == "compile":
        from tests.unit.triton_compile import compile_all

        sys.exit(compile_all())
    sys.exit(f"usage: python -m tests.unit.triton_cases cuda|compile (got {mode!r})")
