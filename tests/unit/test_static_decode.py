"""The static decode step (engine/decode_step.py): decode-only steps on persistent, bucket-padded
inputs give the tokens and logits of the eager step, for every adapter kind and a mix of them all,
and the step traces with torch._dynamo without a graph break (what CUDA graph capture needs: no
host read, no data-dependent branch). CUDA graph replay itself is checked on a GPU
(test_static_decode_cuda below, and bench/device_check.sh)."""

from __future__ import annotations

import pytest
import torch
from mole_serve.engine.decode_step import bucket_sizes
from mole_serve.engine.request import SamplingParams
from mole_serve.lora.backends.triton import ops
from mole_serve.lora.gate import GateConfig, MoLEGate
from mole_serve.routing.types import AdapterRef, Selection

from tests.unit.helpers import add_adapter, engine_for, last_logits
from tests.unit.test_rank_bound import write_every_kind

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(not ops.INTERPRETED, reason="compiled"))]
NAMES = ("a", "b", "big", "me", "mix", "moe")
# one request of each kind, then a mix of them all
REQUESTS = [
    ([AdapterRef("a")], None),
    ([AdapterRef("a", 0.3), AdapterRef("b", -0.7), AdapterRef("big")], None),
    ([], Selection("gate", explicit=(AdapterRef("a"), AdapterRef("b"), AdapterRef("big")))),
    ([AdapterRef("me")], None),
    ([AdapterRef("mix")], None),
    ([AdapterRef("moe")], None),
    ([], None),
]


@pytest.fixture(scope="module")
def every_kind(tmp_path_factory):
    return write_every_kind(tmp_path_factory.mktemp("kinds"))


def _engine(
    every_kind, tokenizer, backend: str, device: str = "cpu", dtype=torch.float32, static: bool = False, fusion=False
):
    hf, tmp = every_kind
    engine = engine_for(
        hf, tokenizer, dtype, max_loras=16, max_num_seqs=16, max_prefill_tokens=256, lora_backend=backend, device=device
    )
    for name in NAMES:
        add_adapter(engine, name, tmp / name)
    torch.manual_seed(0)
    gate = MoLEGate(GateConfig.for_base("tiny", engine.model.lora_spec(), fusion=fusion))
    torch.nn.init.normal_(gate.log_gain, 1.0)  # a gate that moves away from the prior
    if fusion:  # a base column that takes a real share, and biases that change the weights
        torch.nn.init.zeros_(gate.base_logit)
        torch.nn.init.normal_(gate.rank_bias, std=0.3)
    engine.pool.attach_gate(gate.to(device))
    if static:
        engine.use_static_decode(cuda_graphs=device == "cuda")
    return engine


def _run(engine, requests):
    prompts = [list(range(5, 9 + 2 * i)) for i in range(len(requests))]
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    seqs = engine.generate(prompts, params, [a for a, _ in requests], [s for _, s in requests])
    return [s.output_ids for s in seqs], [s.report() for s in seqs], last_logits(engine).clone()


def test_buckets():
    assert bucket_sizes(32) == [1, 2, 4, 8, 16, 24, 32]
    assert bucket_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert bucket_sizes(1) == [1]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "picked", [[0], [2], [3], [4], [5], list(range(7)), [1, 2, 4, 5, 6]], ids=lambda p: "-".join(map(str, p))
)
def test_static_decode_equals_eager(every_kind, tokenizer, backend, picked):
    """Each kind alone (one row in the bucket of 1), every kind at once (7 rows padded to 8), and 5
    rows padded to 8: the same tokens, gate weights, expert usage and last logits."""
    requests = [REQUESTS[i] for i in picked]
    eager = _engine(every_kind, tokenizer, backend)
    static = _engine(every_kind, tokenizer, backend, static=True)
    tokens, reports, logits = _run(eager, requests)
    got_tokens, got_reports, got_logits = _run(static, requests)
    assert static.runner.static.steps == 4  # every decode step of the 5 tokens (the first comes from prefill)
    assert got_tokens == tokens
    torch.testing.assert_close(got_logits, logits, atol=1e-5, rtol=1e-5)
    for got, expected in zip(got_reports, reports):
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            assert g.keys() == e.keys()
            for key, value in e.items():
                if isinstance(value, (float, list)):
                    torch.testing.assert_close(torch.tensor(g[key]), torch.tensor(value), atol=1e-5, rtol=1e-5)
                else:
                    assert g[key] == value


@pytest.mark.parametrize("backend", BACKENDS)
def test_static_decode_equals_eager_with_a_fusion_gate(every_kind, tokenizer, backend):
    """The fusion form (a base column, biases per prior rank) over every kind at once."""
    eager = _engine(every_kind, tokenizer, backend, fusion=True)
    static = _engine(every_kind, tokenizer, backend, static=True, fusion=True)
    tokens, reports, logits = _run(eager, REQUESTS)
    got_tokens, got_reports, got_logits = _run(static, REQUESTS)
    assert got_tokens == tokens and 0 < reports[2][0]["base_gate_weight"] < 1
    torch.testing.assert_close(got_logits, logits, atol=1e-5, rtol=1e-5)
    assert got_reports[2][0]["base_gate_weight"] == pytest.approx(reports[2][0]["base_gate_weight"], abs=1e-5)


def test_the_decode_step_traces_without_a_graph_break(every_kind, tokenizer):
    """torch._dynamo.explain over the step of every signature the mixed batch runs: base rows, sets
    on the stacks with the gate, MELoRA blocks and both mixtures of experts, in one trace each."""
    engine = _engine(every_kind, tokenizer, "torch", static=True)
    _run(engine, REQUESTS)
    _run(engine, [REQUESTS[-1]])  # the base model alone
    static = engine.runner.static
    signatures = list(static._entries)
    assert any(s.rank and s.gated and s.block_shapes and len(s.expert_slots) == 2 for s in signatures)
    assert any(not s.rank and not s.block_shapes and not s.expert_slots for s in signatures)
    for signature in signatures:
        torch._dynamo.reset()
        with torch.inference_mode():  # as the runner steps
            explanation = torch._dynamo.explain(static.step_forward)(static.entry(signature))
        assert explanation.graph_break_count == 0, explanation.break_reasons
        assert explanation.graph_count == 1


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("picked", [list(range(7)), [6]], ids=["every-kind", "base"])
def test_static_decode_cuda(every_kind, tokenizer, picked):
    """On the GPU: graph replay (bf16, the Triton backend) gives the eager step's tokens."""
    requests = [REQUESTS[i] for i in picked]
    eager = _engine(every_kind, tokenizer, "triton", "cuda", torch.bfloat16)
    graphs = _engine(every_kind, tokenizer, "triton", "cuda", torch.bfloat16, static=True)
    tokens, _, logits = _run(eager, requests)
    got_tokens, _, got_logits = _run(graphs, requests)
    assert graphs.runner.static.replays == 4
    assert got_tokens == tokens
    torch.testing.assert_close(got_logits, logits, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "phi3", "qwen3"])
def test_static_decode_equals_eager_for_each_family(family, tokenizer, tmp_path):
    """Sliding windows and soft caps (Gemma), longrope and fused projections (Phi-3), q/k norms
    (Qwen3): 3 rows padded to 4, contexts past the window across KV blocks, one row on a LoRA."""
    from tests.unit.helpers import ALL_TARGETS, make_adapter
    from tests.unit.test_model_families import PEFT_TARGETS, family_engine, family_model

    hf = family_model(family)
    path = make_adapter(hf, tmp_path / "a", seed=1, targets=PEFT_TARGETS.get(family, ALL_TARGETS))
    prompts = [list(range(5, 5 + n)) for n in (7, 13, 19)]
    adapters = [[AdapterRef("a")], [], [AdapterRef("a", 0.5)]]
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    runs = []
    for static in (False, True):
        engine = family_engine(hf, tokenizer, max_num_seqs=4)
        add_adapter(engine, "a", path)
        if static:
            engine.use_static_decode(cuda_graphs=False)
        seqs = engine.generate(prompts, params, adapters)
        runs.append(([s.output_ids for s in seqs], last_logits(engine).clone()))
    assert engine.runner.static.steps == 11
    assert runs[1][0] == runs[0][0]
    torch.testing.assert_close(runs[1][1], runs[0][1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
def test_a_gated_rows_report_is_its_own_when_the_steps_k_changes(every_kind, tokenizer, static):
    """A gated request of 2 candidates beside a 3-adapter request that ends first: the gathered
    path pads rows to the step's K (3, then 2). Its gate weights and entropy are those it gets alone."""
    gated = ([], Selection("gate", explicit=(AdapterRef("a"), AdapterRef("b"))))
    engine = _engine(every_kind, tokenizer, "torch", static=static)
    prompts = [list(range(5, 12)), list(range(5, 9))]
    params = [SamplingParams(max_tokens=6, ignore_eos=True), SamplingParams(max_tokens=2, ignore_eos=True)]
    seqs = [
        engine.add_request(prompts[0], params[0], gated[0], None, gated[1]),
        engine.add_request(prompts[1], params[1], REQUESTS[1][0], None, None),
    ]
    while engine.has_unfinished():
        engine.step()
    alone = engine.generate([prompts[0]], params[0], [gated[0]], [gated[1]])[0]
    got, expected = seqs[0].report(), alone.report()
    assert [e["gate_weight"] for e in got] == pytest.approx([e["gate_weight"] for e in expected], abs=1e-5)
    assert seqs[0].gate_entropy() == pytest.approx(alone.gate_entropy(), abs=1e-5)


def test_a_new_gate_reaches_the_static_step(every_kind, tokenizer):
    """The step's inputs are built once per signature and pool version: attaching another gate
    replaces the tensors they read, so it must change the version (else a graph, or the kept
    context on CPU, would run the old gate)."""
    gated = [REQUESTS[2]]
    static = _engine(every_kind, tokenizer, "torch", static=True)
    _run(static, gated)
    torch.manual_seed(1)
    other = MoLEGate(GateConfig.for_base("tiny", static.model.lora_spec()))
    torch.nn.init.normal_(other.log_gain, 2.0)
    static.pool.attach_gate(other)
    eager = _engine(every_kind, tokenizer, "torch")
    eager.pool.attach_gate(other)
    got, expected = _run(static, gated), _run(eager, gated)
    assert got[0] == expected[0]
    assert got[1][0][0]["gate_weight"] == pytest.approx(expected[1][0][0]["gate_weight"], abs=1e-5)
    torch.testing.assert_close(got[2], expected[2], atol=1e-5, rtol=1e-5)
