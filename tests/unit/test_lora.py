"""Batched multi-LoRA against the oracles: PEFT for one adapter, the explicit weighted sum of
B_i A_i deltas for a set, each request alone for a mixed batch, and the naive loop for ops."""

import json

import pytest
import torch
from mole_serve.engine.request import SamplingParams
from mole_serve.errors import AdapterNotFound
from mole_serve.lora.backends import create_backend
from mole_serve.lora.backends.torch_ref import TorchBackend
from mole_serve.lora.batch import build_lora_batch
from mole_serve.lora.kinds.base import AdapterFormatError
from mole_serve.lora.stacks import GroupStack
from mole_serve.routing.types import AdapterRef
from peft import PeftModel
from safetensors.torch import load_file, save_file

from tests.unit.helpers import add_adapter, engine_for, last_logits, make_adapter, tiny_hf_model

PROMPT = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]


def first_step_logits(engine, prompt, adapters):
    engine.add_request(prompt, SamplingParams(max_tokens=1), adapters)
    engine.step()
    return last_logits(engine)[0]


def test_single_adapter_matches_peft(tmp_path, tokenizer):
    hf = tiny_hf_model()
    path = make_adapter(hf, tmp_path / "a", seed=1)
    engine = engine_for(hf, tokenizer)
    add_adapter(engine, "a", path)
    ours = first_step_logits(engine, PROMPT, [AdapterRef("a")])
    peft = PeftModel.from_pretrained(tiny_hf_model(), path).eval()
    with torch.no_grad():
        ref = peft(torch.tensor([PROMPT])).logits[0, -1]
        base = tiny_hf_model()(torch.tensor([PROMPT])).logits[0, -1]
    assert (ref - base).abs().max() > 1e-2  # the adapter changes the output
    assert (ours - ref).abs().max() < 1e-4


@pytest.mark.parametrize("rslora", [False, True])
def test_partial_targets_and_rslora_match_peft(tmp_path, tokenizer, rslora):
    hf = tiny_hf_model()
    path = make_adapter(
        hf, tmp_path / "a", seed=2, rank=6, targets=["q_proj", "v_proj", "down_proj"], use_rslora=rslora
    )
    engine = engine_for(hf, tokenizer)
    add_adapter(engine, "a", path)
    ours = first_step_logits(engine, PROMPT, [AdapterRef("a")])
    with torch.no_grad():
        ref = PeftModel.from_pretrained(tiny_hf_model(), path)(torch.tensor([PROMPT])).logits[0, -1]
    assert (ours - ref).abs().max() < 1e-4


def merged_reference(paths_weights, prompt):
    """The transformers model with W += sum_i w_i * scale_i * B_i A_i folded in."""
    hf = tiny_hf_model()
    params = dict(hf.named_parameters())
    for path, weight in paths_weights:
        config = json.loads((path / "adapter_config.json").read_text())
        tensors = load_file(path / "adapter_model.safetensors")
        for key, A in tensors.items():
            if ".lora_A." not in key:
                continue
            B = tensors[key.replace("lora_A", "lora_B")]
            target = key.removeprefix("base_model.model.").replace(".lora_A", "")
            scale = config["lora_alpha"] / A.shape[0]
            with torch.no_grad():
                params[target] += weight * scale * (B @ A)
    with torch.no_grad():
        return hf(torch.tensor([prompt])).logits[0, -1]


def test_weighted_set_of_three_matches_sum_of_deltas(tmp_path, tokenizer):
    hf = tiny_hf_model()
    ranks = [4, 8, 2]  # mixed ranks: the pool pads to the largest
    paths = [make_adapter(hf, tmp_path / f"a{i}", seed=10 + i, rank=r) for i, r in enumerate(ranks)]
    weights = [0.5, 0.3, 0.2]
    engine = engine_for(hf, tokenizer)
    for i, p in enumerate(paths):
        add_adapter(engine, f"a{i}", p)
    ours = first_step_logits(engine, PROMPT, [AdapterRef(f"a{i}", w) for i, w in enumerate(weights)])
    ref = merged_reference(list(zip(paths, weights)), PROMPT)
    assert (ours - ref).abs().max() < 1e-4


@pytest.fixture(scope="module")
def library(tmp_path_factory, tokenizer):
    hf = tiny_hf_model()
    root = tmp_path_factory.mktemp("lib")
    paths = {f"a{i}": make_adapter(hf, root / f"a{i}", seed=100 + i) for i in range(6)}
    return hf, paths


def run_alone(hf, tokenizer, paths, prompt, adapters, max_tokens):
    engine = engine_for(hf, tokenizer)
    for name, p in paths.items():
        add_adapter(engine, name, p)
    return engine.generate([prompt], SamplingParams(max_tokens=max_tokens, ignore_eos=True), [adapters])[0].output_ids


MIXED = [
    ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20], ()),
    ([21, 22, 23], (AdapterRef("a0"),)),
    ([31, 32, 33, 34, 35, 36, 37, 38], (AdapterRef("a1", 0.6), AdapterRef("a2", 0.3), AdapterRef("a3", 0.1))),
    ([41, 42, 43, 44, 45], (AdapterRef("a0"),)),
    ([51] * 12, (AdapterRef("a4"), AdapterRef("a0", 0.5))),
    ([61, 62], (AdapterRef("a5"),)),
]


# 3 device slots and 2 CPU copies for 6 adapters: eviction between requests and re-reads from disk.
@pytest.mark.parametrize("max_loras,max_cpu_loras", [(8, 8), (3, 2)])
def test_mixed_batch_equals_each_request_alone(library, tokenizer, max_loras, max_cpu_loras):
    hf, paths = library
    engine = engine_for(
        hf, tokenizer, max_loras=max_loras, max_cpu_loras=max_cpu_loras, max_prefill_tokens=16, max_num_seqs=4
    )
    for name, p in paths.items():
        add_adapter(engine, name, p)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    seqs = [engine.add_request(p, params, a) for p, a in MIXED[:3]]
    for _ in range(3):  # later requests join a running batch
        engine.step()
    seqs += [engine.add_request(p, params, a) for p, a in MIXED[3:]]
    while engine.has_unfinished():
        engine.step()
    for (prompt, adapters), seq in zip(MIXED, seqs):
        assert seq.output_ids == run_alone(hf, tokenizer, paths, prompt, adapters, 12), adapters
    if max_loras == 3:
        assert engine.pool.evictions > 0 and engine.pool.loads > len(paths)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_pool_pins_its_cpu_tier_and_evicts_and_reloads_exactly(library, tokenizer):
    # 3 slots for 6 adapters: every reload is an asynchronous copy from the pinned CPU tier
    hf, paths = library
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    outputs = {}
    for max_loras in (3, 8):
        engine = engine_for(hf, tokenizer, device="cuda", max_loras=max_loras, max_cpu_loras=6, max_num_seqs=2)
        for name, p in paths.items():
            add_adapter(engine, name, p)
        seqs = engine.generate([p for p, _ in MIXED], params, [a for _, a in MIXED])
        outputs[max_loras] = [s.output_ids for s in seqs]
    tier = list(engine.pool._cpu.values())
    assert tier and all(A.is_pinned() and B.is_pinned() for w in tier for A, B in w.modules.values())
    assert outputs[3] == outputs[8]  # evicted and reloaded through the pinned tier: the same tokens


def test_gather_cache_is_not_reused_when_new_adapters_take_the_same_slots(library, tokenizer):
    # Two slots: the second batch's adapters evict the first's into the same slot numbers, so the
    # decode slot matrix repeats while the weights behind it changed.
    hf, paths = library
    params = SamplingParams(max_tokens=8, ignore_eos=True)

    def run(cache_mb: int):
        engine = engine_for(hf, tokenizer, max_loras=2, max_num_seqs=2, lora_gather_cache_mb=cache_mb)
        for name, p in paths.items():
            add_adapter(engine, name, p)
        outputs = [
            s.output_ids
            for names in (("a0", "a1"), ("a2", "a3"))
            for s in engine.generate([[5, 6, 7], [8, 9]], params, [(AdapterRef(n),) for n in names])
        ]
        return engine, outputs

    cached, outputs = run(cache_mb=64)
    assert cached.pool.evictions == 2 and cached.runner.backend.gather_cache.reused_steps > 0
    assert outputs == run(cache_mb=0)[1]


def random_stack(slots, n, r, d_in, outs, seed):
    g = torch.Generator().manual_seed(seed)
    columns, c = [], 0
    for d in outs:
        columns.append((c, c + d))
        c += d
    A = torch.randn(slots, n * r, d_in, generator=g)
    B = [torch.randn(slots, r, d, generator=g) for d in outs]
    A[0].zero_()  # slot 0 is the all-zero "no adapter" slot
    for b in B:
        b[0].zero_()
    return GroupStack(A, B, columns)


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("path", ["dense-view", "dense-gather", "gathered", "gathered-cached"])
def test_ops_match_naive_loop(path, backend):
    stack = random_stack(slots=7, n=3, r=4, d_in=16, outs=[16, 8, 8], seed=0)
    # 4 decode sequences (the last two with no adapter: the gathered op stops before them), then
    # 2 prefill chunks of 4 and 3 tokens.
    sets = [((1, 2), (0.7, 0.3)), ((3,), (1.0,)), ((), ()), ((), ()), ((4, 5, 6), (0.2, 0.3, 0.5)), ((2,), (1.0,))]
    counts = [1, 1, 1, 1, 4, 3]
    ops = create_backend(backend, cache_bytes=1 << 30 if path == "gathered-cached" else 0)
    slot_bytes = sum(t[0].numel() * 4 for t in (stack.A, *stack.B))
    if path == "gathered-cached":  # a first step fills the cache; the one checked below reads it
        first = build_lora_batch(sets, counts, 4, torch.device("cpu"), torch.float32)
        ops.prepare(first, 0, slot_bytes)
        ops.apply(torch.randn(sum(counts), 16), torch.zeros(sum(counts), 32), stack, first, first.token_weights)
    info = build_lora_batch(sets, counts, 4, torch.device("cpu"), torch.float32)
    ops.prepare(info, 0, slot_bytes)
    assert info.num_decode_with_sets == 2
    if path.startswith("dense"):
        info.unique_slots = torch.tensor([1, 2, 3, 4, 5, 6])
        info.unique_range = (1, 7) if path == "dense-view" else None
        seq_w = torch.zeros(len(sets), 6)
        for i, (slots, ws) in enumerate(sets):
            for s, w in zip(slots, ws):
                seq_w[i, s - 1] = w
        info.token_weights = seq_w.repeat_interleave(torch.tensor(counts), dim=0)
    else:
        assert info.unique_slots is None
    x = torch.randn(sum(counts), 16)
    out = torch.zeros(sum(counts), 32)
    used = ops.apply(x, out, stack, info, info.token_weights)
    assert torch.equal(used, info.token_weights)  # every row's weights, in row order
    expected = torch.zeros_like(out)
    row = 0
    for (slots, ws), n in zip(sets, counts):
        for t in range(row, row + n):
            for s, w in zip(slots, ws):
                for j, (c0, c1) in enumerate(stack.out_columns):
                    A = stack.A[s, j * 4 : (j + 1) * 4]  # [r, d_in]
                    expected[t, c0:c1] += w * (x[t] @ A.t()) @ stack.B[j][s]
        row += n
    assert torch.allclose(out, expected, atol=1e-4)
    if path == "gathered-cached" and backend == "torch":
        assert ops.gather_cache.reused_steps == 1


def test_gather_cache_is_dropped_when_slot_weights_change():
    """The pool's stacks version changes whenever a slot is written: the same decode slot matrix
    then gathers again instead of reading the old weights."""
    sets, counts = [((1, 2), (0.5, 0.5)), ((3,), (1.0,))], [1, 1]
    info = build_lora_batch(sets, counts, 2, torch.device("cpu"), torch.float32)
    ops = TorchBackend(cache_bytes=1 << 30)
    for version in (0, 0, 1):
        ops.prepare(info, version, 1000)
    assert ops.gather_cache.reused_steps == 1


def test_bad_adapters_are_refused_with_a_clear_error(tmp_path, tokenizer):
    hf = tiny_hf_model()
    engine = engine_for(hf, tokenizer, max_lora_rank=8)
    good = make_adapter(hf, tmp_path / "good", seed=3)
    tensors = load_file(good / "adapter_model.safetensors")
    config = json.loads((good / "adapter_config.json").read_text())

    def variant(name, tensors_, config_=config):
        d = tmp_path / name
        d.mkdir()
        save_file(tensors_, d / "adapter_model.safetensors")
        (d / "adapter_config.json").write_text(json.dumps(config_))
        return d

    key_a = next(k for k in tensors if "q_proj.lora_A" in k)
    cases = {
        "shape": ({**tensors, key_a: torch.zeros(4, 65)}, "the base model needs"),
        "nan": ({**tensors, key_a: torch.full_like(tensors[key_a], float("nan"))}, "non-finite"),
        "target": ({**tensors, key_a.replace("q_proj", "rotary"): tensors[key_a].clone()}, "unknown target"),
        "rank": (
            {
                k: torch.zeros(16, v.shape[1]) if "lora_A" in k else torch.zeros(v.shape[0], 16)
                for k, v in tensors.items()
            },
            "over the limit",
        ),
    }
    for name, (bad, message) in cases.items():
        with pytest.raises(AdapterFormatError, match=message) as err:
            add_adapter(engine, name, variant(name, bad))
        assert name in str(err.value)
    with pytest.raises(AdapterFormatError, match="DoRA"):
        add_adapter(engine, "dora", variant("dora", tensors, {**config, "use_dora": True}))
    with pytest.raises(AdapterNotFound, match="unknown adapter"):
        engine.add_request([1, 2], SamplingParams(), [AdapterRef("missing")])


def test_requests_over_the_limits_are_refused(library, tokenizer):
    hf, paths = library
    engine = engine_for(hf, tokenizer, max_adapters_per_request=4, max_model_len=64)
    for name, p in paths.items():
        add_adapter(engine, name, p)
    with pytest.raises(ValueError, match="context window is 64"):
        engine.add_request(list(range(1, 65)), SamplingParams())
    with pytest.raises(ValueError, match="at most 4 per request"):
        engine.add_request([1, 2], SamplingParams(), [AdapterRef(f"a{i}") for i in range(5)])
    assert not engine.has_unfinished()


def test_dense_path_for_one_shared_adapter_matches_naive_loop():
    """Every sequence on one adapter at weight 1 (the common case): the dense path with no weight
    scaling and strided per-module views of z."""
    stack = random_stack(slots=5, n=2, r=4, d_in=16, outs=[16, 8], seed=1)
    sets = [((2,), (1.0,))] * 4 + [((2,), (1.0,))]
    counts = [1, 1, 1, 1, 6]
    info = build_lora_batch(sets, counts, 4, torch.device("cpu"), torch.float32)
    assert info.unique_range == (2, 3) and info.token_weights is None
    x = torch.randn(sum(counts), 16)
    out = torch.zeros(sum(counts), 24)
    TorchBackend().apply(x, out, stack, info, info.token_weights)
    expected = torch.cat([x @ stack.A[2, j * 4 : (j + 1) * 4].t() @ stack.B[j][2] for j in range(2)], dim=1)
    assert torch.allclose(out, expected, atol=1e-4)
