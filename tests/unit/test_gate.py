"""The MoLE gate: the rank-space score against the explicit v_i = B_i A_i x, branch masking,
independence from batchmates, the zero gate as a uniform mixture, and refusal of a foreign gate."""

import json
import math

import pytest
import torch
from mole_serve.engine.request import SamplingParams
from mole_serve.library.artifacts import GateFormatError, load_gate, save_gate
from mole_serve.lora.backends.base import shrink
from mole_serve.lora.batch import build_lora_batch
from mole_serve.lora.gate import GateConfig, GateStats, MoLEGate
from mole_serve.lora.stacks import GroupStack
from mole_serve.routing.types import AdapterRef, Selection

from tests.unit.helpers import add_adapter, engine_for, last_logits

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [21, 22, 23], [31, 32, 33, 34, 35, 36], [41, 42, 43, 44]]


def random_probe_stack(slots: int, r: int, d: int, outs: list[int], seed: int) -> GroupStack:
    g = torch.Generator().manual_seed(seed)
    columns, c = [], 0
    for o in outs:
        columns.append((c, c + o))
        c += o
    return GroupStack(
        torch.randn(slots, len(outs) * r, d, generator=g),
        [torch.randn(slots, r, o, generator=g) for o in outs],
        columns,
    )


def test_rank_space_score_equals_score_from_explicit_lora_outputs():
    d, r, outs, rg = 16, 4, [16, 8, 8], 6
    stack = random_probe_stack(slots=5, r=r, d=d, outs=outs, seed=0)
    gate = MoLEGate(GateConfig("base", num_layers=1, hidden_size=d, probe_size=sum(outs), rank=rg, temperature=0.7))
    layer = gate.layer_gates([{"qkv": stack}])[0]
    x = torch.randn(3, d)
    slots = torch.tensor([1, 3, 4])
    batch = build_lora_batch([((1, 3, 4), (1 / 3,) * 3)], [3], 0, torch.device("cpu"), torch.float32)
    stats = GateStats.for_batch(batch, [True], [3])
    with torch.no_grad():
        w = layer.weigh(x, shrink(x, stack, slots, None), slots, torch.full((3, 3), 1 / 3), stats, slice(None))
        Ar, Br = gate.query[0], gate.key[0]  # [rg, d], [d_probe, rg]

        def unit_rms(v):
            return v / v.pow(2).mean().sqrt()

        for t in range(3):
            scores = []
            for s in slots.tolist():
                # v_i: the fused q/k/v output of adapter i on token t, module by module.
                v = torch.cat([x[t] @ stack.A[s, j * r : (j + 1) * r].t() @ stack.B[j][s] for j in range(3)])
                scores.append(gate.log_gain[0].exp() * unit_rms(Ar @ x[t]) @ unit_rms(Br.t() @ v) / math.sqrt(rg))
            expected = torch.softmax(torch.stack(scores) / 0.7, dim=0)
            assert torch.allclose(w[t], expected, atol=1e-5)


def test_masking_renormalizes_over_the_remaining_candidates():
    d, outs = 16, [16, 8, 8]
    stack = random_probe_stack(slots=5, r=4, d=d, outs=outs, seed=1)
    gate = MoLEGate(GateConfig("base", num_layers=1, hidden_size=d, probe_size=sum(outs), rank=4))
    layer = gate.layer_gates([{"qkv": stack}])[0]
    x = torch.randn(2, d)
    slots = torch.tensor([1, 2, 3])
    z = shrink(x, stack, slots, None)
    batch = build_lora_batch([((1, 2, 3), (1.0,) * 3)], [2], 0, torch.device("cpu"), torch.float32)
    stats = GateStats.for_batch(batch, [True], [2])
    with torch.no_grad():
        full = layer.weigh(x, z, slots, torch.ones(2, 3), stats, slice(None))
        masked = layer.weigh(x, z, slots, torch.tensor([[1.0, 0.0, 1.0]] * 2), stats, slice(None))
    assert torch.all(masked[:, 1] == 0)
    kept = full[:, [0, 2]]
    assert torch.allclose(masked[:, [0, 2]], kept / kept.sum(-1, keepdim=True), atol=1e-6)


def gated_engine(hf, paths, tokenizer, scale: float = 5.0, fusion: dict | None = None, **settings):
    """fusion: the fusion form's parameters to set (GateConfig.fusion), by name."""
    engine = engine_for(hf, tokenizer, **settings)
    for name, p in paths.items():
        add_adapter(engine, name, p)
    config = GateConfig.for_base("tiny", engine.model.lora_spec(), rank=8, fusion=fusion is not None)
    torch.manual_seed(7)
    gate = MoLEGate(config).requires_grad_(False)
    gate.log_gain.fill_(math.log(scale) if scale else -100.0)  # sharp enough to be far from uniform
    for name, value in (fusion or {}).items():
        getattr(gate, name).copy_(torch.as_tensor(value))
    engine.pool.attach_gate(gate)
    return engine


def gate_selection(*names: str) -> Selection:
    return Selection("gate", tuple(AdapterRef(n) for n in names))


def test_gate_weights_do_not_depend_on_batchmates(gated_engine_parts, tokenizer):
    hf, paths = gated_engine_parts
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    alone = gated_engine(hf, paths, tokenizer).generate(
        [PROMPTS[0]], params, selections=[gate_selection("a0", "a1", "a2")]
    )[0]
    engine = gated_engine(hf, paths, tokenizer)
    seqs = engine.generate(
        PROMPTS,
        params,
        selections=[
            gate_selection("a0", "a1", "a2"),  # the request under test
            None,  # base model
            Selection("mixture", (AdapterRef("a3"), AdapterRef("a1", 2.0))),
            gate_selection("a3", "a2"),
        ],
    )
    mixed = seqs[0]
    assert mixed.output_ids == alone.output_ids
    assert mixed.gated and mixed.gate_count == alone.gate_count
    assert torch.allclose(torch.tensor(mixed.gate_sums), torch.tensor(alone.gate_sums), rtol=1e-4)
    weights = [w / mixed.gate_count for w in mixed.gate_sums[:-2]]
    assert abs(sum(weights) - 1) < 1e-4 and max(weights) - min(weights) > 0.05  # a real, non-uniform gate


def test_silent_router_is_the_prior_mixture(gated_engine_parts, tokenizer):
    hf, paths = gated_engine_parts
    params = SamplingParams(max_tokens=1)
    engine = gated_engine(hf, paths, tokenizer, scale=0.0)  # gain 0: the router is silent, the prior rules
    weighted = (AdapterRef("a0", 0.5), AdapterRef("a1", 0.3), AdapterRef("a3", 0.2))
    engine.generate([PROMPTS[2]], params, selections=[Selection("gate", weighted)])
    gated = last_logits(engine)[0].clone()
    engine.generate([PROMPTS[2]], params, selections=[Selection("mixture", weighted)])
    assert torch.allclose(last_logits(engine)[0], gated, atol=1e-5)


def test_dense_and_gathered_paths_gate_alike(gated_engine_parts, tokenizer):
    """Eight gated requests on one set take the dense path; one alone takes the gathered one."""
    hf, paths = gated_engine_parts
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    dense = gated_engine(hf, paths, tokenizer).generate(
        [PROMPTS[1]] * 8, params, selections=[gate_selection("a1", "a2")] * 8
    )
    single = gated_engine(hf, paths, tokenizer).generate([PROMPTS[1]], params, selections=[gate_selection("a1", "a2")])
    assert all(s.output_ids == single[0].output_ids for s in dense)
    assert torch.allclose(torch.tensor(dense[0].gate_sums), torch.tensor(single[0].gate_sums), rtol=1e-4)


def test_a_gate_for_another_base_is_refused(tmp_path):
    mine = GateConfig("SmolLM2-135M-Instruct", num_layers=30, hidden_size=576, probe_size=960)
    save_gate(MoLEGate(GateConfig("SmolLM2-135M-Instruct", 2, 64, 128)), tmp_path / "other_shape")
    save_gate(MoLEGate(GateConfig("Qwen2-0.5B", 30, 576, 960)), tmp_path / "other_name")
    with pytest.raises(GateFormatError, match="num_layers"):
        load_gate(tmp_path / "other_shape", mine)
    with pytest.raises(GateFormatError, match="Qwen2-0.5B"):
        load_gate(tmp_path / "other_name", mine)
    with pytest.raises(GateFormatError, match="cannot read"):
        load_gate(tmp_path / "missing", mine)
    (tmp_path / "other_name" / "gate.safetensors").write_bytes(b"not safetensors")  # safetensors' own error type
    with pytest.raises(GateFormatError, match="cannot read"):
        load_gate(tmp_path / "other_name", mine)


def test_every_composition_mode_shares_one_batch(gated_engine_parts, tokenizer):
    """gate, an explicit adapter, a TIES merge, select and mixture side by side: each request gets
    exactly the tokens it gets alone, and the merge is built once into one virtual adapter."""
    from mole_serve.routing.types import MergeSpec

    hf, paths = gated_engine_parts
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    three = (AdapterRef("a0"), AdapterRef("a1", 2.0), AdapterRef("a2"))
    selections = [
        gate_selection("a0", "a1", "a2"),
        Selection("mixture", (AdapterRef("a3"),)),
        Selection("merge", three, merge=MergeSpec("ties", density=0.5)),
        Selection("select", three),
        Selection("mixture", three),
    ]
    prompts = PROMPTS + [[71, 72, 73]]
    engine = gated_engine(hf, paths, tokenizer)
    together = engine.generate(prompts, params, selections=selections)
    for prompt, sel, seq in zip(prompts, selections, together):
        alone = gated_engine(hf, paths, tokenizer).generate([prompt], params, selections=[sel])[0]
        assert seq.output_ids == alone.output_ids, sel.composition
    merged, select = together[2], together[3]
    assert merged.adapters[0].name.startswith("merge-") and merged.chosen.sources == ("a0", "a1", "a2")
    assert select.adapters == (AdapterRef("a1", 1.0),)  # the largest prior weight
    again = engine.generate([PROMPTS[0]], params, selections=[selections[2]])[0]
    assert again.adapters == merged.adapters and engine.pool.loads == 4 + 1  # 4 adapters + 1 merge, built once


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_gated_batch_on_cuda_equals_cpu(gated_engine_parts, tokenizer):
    """The gate (loaded on CPU) runs beside the stacks on the device, as do its keys."""
    hf, paths = gated_engine_parts
    logits = []
    for device in ("cpu", "cuda"):
        engine = gated_engine(hf, paths, tokenizer, device=device, num_kv_blocks=64)
        engine.generate(PROMPTS[:2], SamplingParams(max_tokens=1), selections=[gate_selection("a0", "a1", "a2")] * 2)
        logits.append(last_logits(engine).cpu())
    assert (logits[0] - logits[1]).abs().max() < 1e-3


def explicit_logits(gate: MoLEGate, stack: GroupStack, x: torch.Tensor, slots: list[int], prior: torch.Tensor):
    """The router's logits [T, C] from the explicit LoRA outputs v_i = B_i A_i x (gate.py's formula)."""
    r, rg = stack.rank, gate.config.rank

    def unit_rms(v):
        return v / v.pow(2).mean().sqrt()

    rows = []
    for t in range(len(x)):
        u = unit_rms(gate.query[0] @ x[t])
        scores = []
        for s in slots:
            v = torch.cat([x[t] @ stack.A[s, j * r : (j + 1) * r].t() @ stack.B[j][s] for j in range(len(stack.B))])
            scores.append(gate.log_gain[0].exp() * u @ unit_rms(gate.key[0].t() @ v) / math.sqrt(rg))
        rows.append(torch.stack(scores) + gate.log_prior_scale[0].exp() * prior[t].log())
    return torch.stack(rows) / gate.config.temperature


@pytest.mark.parametrize("bias_by_base", [False, True], ids=["constant-bias", "bias-by-base"])
def test_fusion_form_is_a_softmax_with_a_base_column_plus_a_bias_per_prior_rank(bias_by_base):
    """LoRA-Flow's form on the rank-space router, by hand: softmax over the candidates' logits and
    the base column's (its learned key against Ar x, plus an offset), then each candidate's bias by
    its rank in the prior (bias_by_base: times the token's base-column share); the statistics get
    the base column's share and the softmax's entropy."""
    d, outs, rg, tau = 16, [16, 8, 8], 6, 0.7
    stack = random_probe_stack(slots=5, r=4, d=d, outs=outs, seed=0)
    config = GateConfig(
        "base", 1, d, sum(outs), rank=rg, temperature=tau, fusion=True, max_candidates=3, bias_by_base=bias_by_base
    )
    torch.manual_seed(1)
    gate = MoLEGate(config).requires_grad_(False)
    gate.rank_bias.copy_(torch.tensor([[0.3, -0.1, 0.05]]))
    gate.base_logit.fill_(0.5)
    x, slots = torch.randn(3, d), [1, 3, 4]
    prior = torch.tensor([[0.2, 0.5, 0.3]] * 3)  # prior ranks 2, 0, 1
    batch = build_lora_batch([(slots, (0.2, 0.5, 0.3))], [3], 0, torch.device("cpu"), torch.float32)
    stats = GateStats.for_batch(batch, [True], [3])
    index = torch.tensor(slots)
    w = gate.layer_gates([{"qkv": stack}])[0].weigh(x, shrink(x, stack, index, None), index, prior, stats, slice(None))

    u = gate.query[0] @ x.t()  # [rg, T]
    u = u / u.pow(2).mean(0).sqrt()
    kb = gate.base_key[0] / gate.base_key[0].pow(2).mean().sqrt()
    base = (gate.log_gain[0].exp() * (kb @ u) / math.sqrt(rg) + 0.5) / tau  # [T]
    distribution = torch.softmax(torch.cat([explicit_logits(gate, stack, x, slots, prior), base[:, None]], 1), -1)
    bias = torch.tensor([0.05, 0.3, -0.1]) * (distribution[:, 3:] if bias_by_base else 1.0)
    expected = distribution[:, :3] + bias
    torch.testing.assert_close(w, expected, atol=1e-5, rtol=1e-5)
    entropy = -(distribution * distribution.log()).sum(-1)
    totals = torch.cat([w.sum(0), distribution[:, 3].sum()[None], entropy.sum()[None]])
    torch.testing.assert_close(stats.sums[0], totals, atol=1e-5, rtol=1e-5)


def test_a_fusion_gate_whose_base_column_takes_everything_is_the_base_model(gated_engine_parts, tokenizer):
    """All the weight on the base column: the gated request answers as the base model, and its
    report says so; with the column shut and no bias, the fusion gate is the plain gate."""
    hf, paths = gated_engine_parts
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    selection = gate_selection("a0", "a1", "a2")
    base = gated_engine(hf, paths, tokenizer).generate([PROMPTS[0]], params)[0]
    base_logits = last_logits_of(gated_engine(hf, paths, tokenizer), PROMPTS[0], params, None)
    engine = gated_engine(hf, paths, tokenizer, fusion={"base_logit": 60.0})
    seq = engine.generate([PROMPTS[0]], params, selections=[selection])[0]
    assert seq.output_ids == base.output_ids
    torch.testing.assert_close(last_logits(engine), base_logits, atol=1e-5, rtol=1e-5)
    report = seq.report()
    assert report[0]["base_gate_weight"] == pytest.approx(1.0, abs=1e-4)
    assert all(e["gate_weight"] == pytest.approx(0.0, abs=1e-4) for e in report)
    shut = gated_engine(hf, paths, tokenizer, fusion={"base_logit": -60.0})
    fused = shut.generate([PROMPTS[0]], params, selections=[selection])[0]
    plain = gated_engine(hf, paths, tokenizer).generate([PROMPTS[0]], params, selections=[selection])[0]
    assert fused.output_ids == plain.output_ids
    torch.testing.assert_close(torch.tensor(fused.gate_sums), torch.tensor(plain.gate_sums), atol=1e-4, rtol=1e-4)
    assert "base_gate_weight" not in plain.report()[0]


def last_logits_of(engine, prompt, params, selection):
    engine.generate([prompt], params, selections=[selection])
    return last_logits(engine).clone()


def test_a_fusion_gate_saves_and_loads_and_an_old_gate_file_loads_as_the_plain_form(tmp_path):
    config = GateConfig("tiny", 2, 64, 128, fusion=True, max_candidates=3)
    gate = MoLEGate(config)
    torch.nn.init.normal_(gate.rank_bias)
    save_gate(gate, tmp_path / "fusion")
    loaded = load_gate(tmp_path / "fusion", config)
    assert loaded.config.fusion and torch.equal(loaded.rank_bias, gate.rank_bias)
    raw = json.loads((tmp_path / "fusion" / "gate_config.json").read_text())
    raw.pop("bias_by_base")  # a fusion gate written before the bias could follow the base column
    (tmp_path / "fusion" / "gate_config.json").write_text(json.dumps(raw))
    assert not load_gate(tmp_path / "fusion", config).config.bias_by_base
    old = MoLEGate(GateConfig("tiny", 2, 64, 128))
    save_gate(old, tmp_path / "old")
    raw = json.loads((tmp_path / "old" / "gate_config.json").read_text())
    for key in ("fusion", "max_candidates"):  # a file written before the fusion form
        raw.pop(key)
    (tmp_path / "old" / "gate_config.json").write_text(json.dumps(raw))
    reloaded = load_gate(tmp_path / "old", config)
    assert not reloaded.config.fusion and not hasattr(reloaded, "rank_bias")
