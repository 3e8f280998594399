"""Each adapter computes at its own rank: the pool stores every slot padded to the largest rank it
holds, and an op reads only the rank rows its slots hold (the torch backend: the largest rank of
each block it runs, a dense step, a decode run or a prefill chunk; the Triton kernels: each
column's own). Against the padded op (every slot at the stacks' rank: what a batch built without
the pool's slot ranks runs) in fp32, with a resident adapter of a larger rank that the step does
not use and one that it does: the op alone on every path, its stacks' rows past what it may read
set to NaN (reading one shows; the cases are triton_cases'), then the engine on a batch of every
kind."""

from __future__ import annotations

import math

import pytest
import torch
from mole_serve.engine.request import SamplingParams
from mole_serve.lora.backends.triton import ops
from mole_serve.lora.batch import UNKNOWN_RANK, build_lora_batch, rank_runs
from mole_serve.lora.gate import GateConfig, MoLEGate
from mole_serve.routing.types import AdapterRef, Selection

from tests.unit import triton_cases as cases
from tests.unit.helpers import add_adapter, engine_for, last_logits, make_adapter, tiny_hf_model
from tests.unit.test_melora import melora_tensors, write_melora
from tests.unit.test_moe_kinds import mixlora_config, mixlora_tensors, moelora_config, moelora_tensors, write_folder

CPU, F32 = torch.device("cpu"), torch.float32
# tests/conftest.py sets TRITON_INTERPRET=1 where there is no CUDA; with CUDA the kernels are
# compiled, and triton_cases' CUDA run (test_triton_lora) covers their rank bound
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(not ops.INTERPRETED, reason="compiled"))]


def test_batch_ranks_and_decode_runs():
    sets, counts = cases.rank_step(big_used=True)
    batch = build_lora_batch(sets, counts, 7, CPU, F32, slot_ranks=cases.SLOT_RANKS)
    assert batch.rank == cases.STACK_RANK and batch.set_ranks[4] == [2, cases.STACK_RANK]
    # row ranks 4, 16, 4, 0 (joins the run before), 16, 1, 4
    assert batch.decode_runs == ((1, 4), (2, 16), (4, 4), (5, 16), (6, 1), (7, 4))
    unused = build_lora_batch(*cases.rank_step(big_used=False), 7, CPU, F32, slot_ranks=cases.SLOT_RANKS)
    assert unused.rank == cases.SMALL
    dense = build_lora_batch(sets, counts, 7, CPU, F32, force_dense=True, slot_ranks=cases.SLOT_RANKS)
    assert dense.unique_ranks == [cases.SLOT_RANKS[s] for s in dense.unique_slots.tolist()]
    assert build_lora_batch(sets, counts, 7, CPU, F32).rank == UNKNOWN_RANK  # no slot ranks: the stacks'
    assert rank_runs([0, 0, 8, 8, 0, 32, 32, 8]) == ((5, 8), (7, 32), (8, 8))


def _case_id(case: tuple[str, bool, bool]) -> str:
    group, dense, big_used = case
    return f"{group}-{'dense' if dense else 'gathered'}-big-{'used' if big_used else 'unused'}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", cases.RANK_BOUND_CASES, ids=_case_id)
def test_slot_stack_op_at_its_ranks_equals_the_padded_op(backend, case):
    cases.check_rank_bound(backend, *case, device="cpu")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dense", [False, True], ids=["gathered", "dense"])
@pytest.mark.parametrize("big_used", [False, True], ids=["big-unused", "big-used"])
def test_gated_sets_at_their_ranks_equal_the_padded_op(backend, dense, big_used):
    """The gate scores z at the op's rank against its keys cut to it: the same weights, statistics
    and output. Its keys come from the slots (at load, in the pool): the clean stacks'."""
    stack = cases.rank_stack("qkv", "cpu", seed=2)
    d_in, outs = cases.GROUPS["qkv"]
    gate = MoLEGate(GateConfig("base", num_layers=1, hidden_size=d_in, probe_size=sum(outs), rank=6))
    torch.nn.init.normal_(gate.log_gain, 1.0)
    layer = gate.requires_grad_(False).layer_gates([{"qkv": stack}])[0]
    sets, counts = cases.rank_step(big_used)
    bounded = build_lora_batch(sets, counts, 7, CPU, F32, dense, cases.SLOT_RANKS)
    padded = build_lora_batch(sets, counts, 7, CPU, F32, dense)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(sum(counts), d_in, generator=g)
    base = torch.randn(sum(counts), sum(outs), generator=g)
    expected = cases.run_op(backend, stack, padded, x, base, layer)
    got = cases.run_op(backend, cases.held(stack, cases.read_by(backend, bounded), math.nan), bounded, x, base, layer)
    cases.assert_same(got, expected, exact=backend == "triton")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("group", ["qkv", "down"])
def test_expert_ops_at_the_experts_rank_equal_the_padded_ops(backend, group):
    """MixLoRA / MoELoRA: E expert slots of rank 4 in rank-16 stacks (rows past 4 NaN); the routed
    weights per (token, module, expert), each token's k experts' outputs (MixLoRA's gate/up) and
    each expert on its own input (its down projection)."""
    stack = cases.rank_stack(group, "cpu", seed=4)
    slots, rank, T, k = torch.tensor([1, 3, 5, 7]), cases.SMALL, 13, 2  # slots of rank <= 4; a gather, not a range
    E, n, d_in = len(slots), len(stack.B), cases.GROUPS[group][0]
    poisoned = cases.held(stack, [rank] * cases.SLOTS, math.nan)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(T, d_in, generator=g)
    top, chosen = torch.softmax(torch.randn(T, n, E, generator=g), -1).topk(k, dim=-1)
    weights = torch.zeros(T, n, E).scatter_(-1, chosen, top)
    base = torch.randn(T, stack.out_columns[-1][1], generator=g)
    ops_, exact = cases.backend_for(backend), backend == "triton"
    got, expected = base.clone(), base.clone()
    ops_.apply_experts(x, got, poisoned, slots, None, rank, weights)
    ops_.apply_experts(x, expected, stack, slots, None, cases.STACK_RANK, weights)
    cases.assert_same([got], [expected], exact)
    experts = chosen[:, 0]  # [T, k]: the first module's router
    cases.assert_same(
        ops_.selected_expert_outputs(x, poisoned, slots, None, rank, experts),
        ops_.selected_expert_outputs(x, stack, slots, None, cases.STACK_RANK, experts),
        exact,
    )
    if n == 1:
        xk, w = torch.randn(T, k, d_in, generator=g), top[:, 0]
        got, expected = base.clone(), base.clone()
        ops_.apply_routed_inputs(xk, got, poisoned, slots, None, rank, experts, w)
        ops_.apply_routed_inputs(xk, expected, stack, slots, None, cases.STACK_RANK, experts, w)
        cases.assert_same([got], [expected], exact)


def write_every_kind(tmp):
    """A tiny model and adapters of every kind at rank <= 8, and a plain LoRA of rank 16, in tmp."""
    hf = tiny_hf_model()
    make_adapter(hf, tmp / "a", seed=11)
    make_adapter(hf, tmp / "b", seed=12, rank=3)
    make_adapter(hf, tmp / "big", seed=13, rank=16)
    write_melora(tmp / "me", melora_tensors(hf, 4, 2, seed=3), 4, 2)
    write_folder(tmp / "mix", mixlora_tensors(hf, E=4, r=4, seed=1), mixlora_config())
    write_folder(tmp / "moe", moelora_tensors(hf, E=4, r=4, seed=2), moelora_config())
    return hf, tmp


@pytest.fixture(scope="module")
def every_kind(tmp_path_factory):
    return write_every_kind(tmp_path_factory.mktemp("ranks"))


def pad_every_slot(engine, monkeypatch) -> None:
    """What the engine ran before ranks were known: every slot and expert at the stacks' rank (the
    step's batches built without the pool's slot ranks; decode rows in the same order)."""
    monkeypatch.setattr(
        "mole_serve.engine.runner.build_lora_batch", lambda *args: build_lora_batch(*args[:-1])
    )  # the runner passes pool.slot_ranks last
    for experts in engine.pool.experts.values():
        experts.rank = experts.shared_rank = engine.pool.rank


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("big_used", [False, True], ids=["big-unused", "big-used"])
def test_engine_batch_of_every_kind_at_its_ranks_equals_the_padded_engine(
    every_kind, tokenizer, monkeypatch, backend, big_used
):
    """Plain LoRA sets, gated sets, MELoRA native blocks, MixLoRA and MoELoRA in one batch, beside a
    resident rank-16 adapter: the same tokens and logits as the same engine padding every slot."""
    hf, tmp = every_kind
    big = [AdapterRef("big")] if big_used else []
    requests = [
        ([AdapterRef("a")], None),
        ([AdapterRef("a", 0.3), AdapterRef("b", -0.7), *big], None),
        ([], Selection("gate", explicit=(AdapterRef("a"), AdapterRef("b"), *big))),
        ([AdapterRef("me")], None),
        ([AdapterRef("mix")], None),
        ([AdapterRef("moe")], None),
        (big or [AdapterRef("b")], None),
        ([], None),
    ]
    prompts = [list(range(5, 9 + i)) for i in range(len(requests))]
    engine = engine_for(hf, tokenizer, max_loras=16, max_prefill_tokens=64, lora_backend=backend)
    for name in ("a", "b", "big", "me", "mix", "moe"):
        add_adapter(engine, name, tmp / name)
    torch.manual_seed(0)
    engine.pool.attach_gate(MoLEGate(GateConfig.for_base("tiny", engine.model.lora_spec())))
    pool = engine.pool
    names = ["a", "b", "big", "me", "mix", "moe"]
    slots = pool.acquire(names)  # every one resident: the stacks at rank 16
    assert pool.rank == 16 and [pool.slot_ranks[s] for s in slots] == [4, 3, 16, 8, 4, 0]  # moe: no shared LoRA
    assert [(pool.experts[s].rank, pool.experts[s].shared_rank) for s in slots[4:]] == [(4, 4), (4, 0)]
    pool.release(slots)
    step_ranks: list[int] = []  # each step's largest rank on the slot stacks
    prepare = engine.runner.backend.prepare

    def recorded(batch, *args):
        step_ranks.append(batch.rank)
        prepare(batch, *args)

    monkeypatch.setattr(engine.runner.backend, "prepare", recorded)
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    adapters, selections = [a for a, _ in requests], [s for _, s in requests]
    tokens = [s.output_ids for s in engine.generate(prompts, params, adapters, selections)]
    logits = last_logits(engine).clone()
    assert max(step_ranks) == (16 if big_used else 4)
    pad_every_slot(engine, monkeypatch)
    assert [s.output_ids for s in engine.generate(prompts, params, adapters, selections)] == tokens
    assert pool.num_resident == len(names) and step_ranks[-1] == UNKNOWN_RANK  # the same slots, padded
    torch.testing.assert_close(last_logits(engine), logits, atol=1e-5, rtol=1e-5)
