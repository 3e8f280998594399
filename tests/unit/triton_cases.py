"""The Triton backend's cases against torch_ref, and each backend's at its slots' own ranks against
its padded op, shared by the interpreted tests (test_triton_lora.py, test_rank_bound.py: CPU
tensors) and by a CUDA run in a process of its own; and the ahead-of-time compile of every kernel
for a GPU target. Not collected by pytest (no test_ prefix): the importer decides whether
the kernels are interpreted (TRITON_INTERPRET is read when the kernel module is imported).

    python -m tests.unit.triton_cases cuda       # every case on the GPU, compiled kernels
    python -m tests.unit.triton_cases compile    # every kernel for sm_80 and sm_90, no GPU needed
"""

from __future__ import annotations

import itertools
import math
import random
import sys
from collections.abc import Sequence

import torch
from mole_serve.lora.backends.base import LoRABackend
from mole_serve.lora.backends.torch_ref import TorchBackend
from mole_serve.lora.backends.triton import TritonBackend
from mole_serve.lora.batch import BlockRows, LoRABatchInfo, as_range, build_lora_batch
from mole_serve.lora.gate import GateConfig, GateStats, LayerGate, MoLEGate
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
    TritonBackend().apply_experts(x, out, stack, slots, None, 6, weights)
    LoRABackend().apply_experts(
        x.float(), expected, as_fp32(stack), slots, None, 6, None if weights is None else weights.float()
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
    got = TritonBackend().selected_expert_outputs(x, gate_up, slots, (1, 5), 5, experts)
    expected = LoRABackend().selected_expert_outputs(x.float(), as_fp32(gate_up), slots, (1, 5), 5, experts)
    for got_j, expected_j in zip(got, expected, strict=True):
        assert_close(got_j, expected_j, dtype)
    down = random_stack("down", 5, dtype, device, seed)
    xk = torch.randn(T, k, GROUPS["down"][0], generator=g).to(device, dtype)
    base = torch.randn(T, GROUPS["down"][1][0], generator=g).to(device, dtype)
    out, expected = base.clone(), base.float()
    TritonBackend().apply_routed_inputs(xk, out, down, slots, (1, 5), 5, experts, weights)
    LoRABackend().apply_routed_inputs(xk.float(), expected, as_fp32(down), slots, (1, 5), 5, experts, weights.float())
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


# Each adapter at its own rank: the stacks at STACK_RANK, slot s holding SLOT_RANKS[s] rank rows
# (zero past them, as the pool packs), slot BIG the one adapter of the stacks' rank.
STACK_RANK, BIG, SMALL = 16, 6, 4  # SMALL: the largest rank but BIG's
SLOT_RANKS = [0, 4, 3, 4, 2, 4, STACK_RANK, 4, 1]
RANK_BOUND_CASES = [(group, dense, big) for group in GROUPS for dense in (False, True) for big in (False, True)]


def backend_for(name: str) -> LoRABackend:
    return TorchBackend() if name == "torch" else TritonBackend()


def held(stack: GroupStack, ranks: list[int], value: float) -> GroupStack:
    """A copy of the stacks with every row of slot s past ranks[s] (in each module block) set to value."""
    A, Bs = stack.A.clone(), [B.clone() for B in stack.B]
    blocks = A.view(len(A), len(Bs), STACK_RANK, -1)  # [slots, n, r, d_in]
    for s, r in enumerate(ranks):
        blocks[s, :, r:] = value
        for B in Bs:
            B[s, r:] = value
    return GroupStack(A, Bs, stack.out_columns)


def rank_stack(group: str, device: str, seed: int = 0) -> GroupStack:
    """A group's fp32 stacks at STACK_RANK, slot s holding SLOT_RANKS[s] rows."""
    return held(random_stack(group, STACK_RANK, torch.float32, device, seed), SLOT_RANKS, 0.0)


def rank_step(big_used: bool) -> tuple[list, list[int]]:
    """(sets, tokens per sequence): 7 decode rows (two neighbours share a set, one without adapters
    in the middle), then prefill chunks of 5, 0 and 9 tokens. big_used: the big adapter alone in a
    decode row and a chunk, and beside a small one in another decode row's set."""
    sets = [
        ((1, 2), (0.7, 0.3)),
        ((3,), (1.0,)),
        ((3,), (1.0,)),
        ((), ()),
        ((4, 5, 7), (0.2, -0.5, 1.0)),
        ((8,), (2.0,)),
        ((1,), (1.0,)),
        ((2, 5), (0.5, 0.5)),
        ((), ()),
        ((7, 1, 3), (1.0, 0.3, -1.25)),
    ]
    if big_used:
        sets[1] = ((BIG,), (1.0,))
        sets[4] = ((4, BIG), (0.6, 0.4))
        sets[9] = ((BIG,), (-0.5,))
    return sets, [1] * 7 + [5, 0, 9]


def read_by(backend: str, batch: LoRABatchInfo) -> list[int]:
    """Per slot, the rank rows the backend may read of it: Triton its own, where a set uses it;
    torch the rank of every block that uses it (the dense step, a decode run, a prefill chunk: slot
    0 pads their sets)."""
    if backend == "triton":
        used = set(batch.lora_slots.flatten().tolist())
        return [r if s in used else 0 for s, r in enumerate(SLOT_RANKS)]
    reads = [0] * SLOTS

    def use(slots: list[int], rank: int) -> None:
        for s in slots:
            reads[s] = max(reads[s], rank)

    if batch.unique_slots is not None:
        use(batch.unique_slots.tolist(), batch.rank)
        return reads
    row0 = 0
    for end, rank in batch.decode_runs:
        use(batch.lora_slots[row0:end].flatten().tolist(), rank)
        row0 = end
    for i in range(batch.num_decode, len(batch.set_ranks)):
        use(batch.lora_slots[i].tolist(), max(batch.set_ranks[i]))
    return reads


def run_op(
    backend: str,
    stack: GroupStack,
    batch: LoRABatchInfo,
    x: torch.Tensor,
    base: torch.Tensor,
    gate: LayerGate | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(out, weights used, gate sums or None) of one apply on a copy of `base`; with a gate, every
    other sequence gated."""
    ops = backend_for(backend)
    ops.prepare(batch, 0, 0)
    out = base.clone()
    gated = [i % 2 == 0 for i in range(len(batch.set_ranks))]
    counts = [1] * batch.num_decode + [n for _, n in batch.prefill_spans]
    stats = GateStats.for_batch(batch, gated, counts) if gate is not None else None
    weights = ops.apply(x, out, stack, batch, batch.token_weights, gate, stats)
    return out, weights, None if stats is None else stats.sums


def assert_same(got: Sequence, expected: Sequence, exact: bool) -> None:
    """fp32 on the same inputs: the bounded op adds the same products, less the zero ones. The
    interpreted kernels sum in the same order (exact); a BLAS or GPU may order a GEMM of another
    shape otherwise (equal to rounding)."""
    for g, e in zip(got, expected, strict=True):
        if e is None:
            assert g is None
        elif exact:
            assert torch.equal(g, e)
        else:
            assert torch.isfinite(g).all()
            torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-6)


def check_rank_bound(backend: str, group: str, dense: bool, big_used: bool, device: str) -> None:
    """The op on a batch built with the slot ranks == the padded op (built without) on the same
    backend in fp32, the stacks' rows past what the bounded op may read set to NaN (reading one
    shows). Unused, the big slot is not read, nor any slot past the small ranks."""
    stack = rank_stack(group, device)
    sets, counts = rank_step(big_used)
    bounded = build_lora_batch(sets, counts, 7, torch.device(device), torch.float32, dense, SLOT_RANKS)
    padded = build_lora_batch(sets, counts, 7, torch.device(device), torch.float32, dense)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(sum(counts), GROUPS[group][0], generator=g).to(device)
    base = torch.randn(sum(counts), stack.out_columns[-1][1], generator=g).to(device)
    reads = read_by(backend, bounded)
    if not big_used:
        assert reads[BIG] == 0 and max(reads) <= SMALL
    got = run_op(backend, held(stack, reads, math.nan), bounded, x, base)
    assert_same(got, run_op(backend, stack, padded, x, base), exact=backend == "triton" and device == "cpu")


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
        + [(check_rank_bound, ("triton", *c)) for c in RANK_BOUND_CASES]
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
