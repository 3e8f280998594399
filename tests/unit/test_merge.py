"""Static merges against PEFT's add_weighted_adapter: the merged A/B and delta B A per module, and
the engine's logits with the merged adapter loaded into a slot like any other."""

import json

import pytest
import torch
from mole_serve.engine.model import DecoderModel
from mole_serve.engine.request import SamplingParams
from mole_serve.library.catalog import read_adapter
from mole_serve.lora.kinds.base import AdapterWeights
from mole_serve.routing.merge import merge_adapters, merge_key
from mole_serve.routing.types import MERGE_STRATEGIES, AdapterRef
from peft import PeftModel
from safetensors.torch import save_file

from tests.unit.helpers import add_adapter, engine_for, last_logits, make_adapter, tiny_hf_model

PROMPT = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]
WEIGHTS = [0.6, -0.3, 0.5]  # a negative weight: PEFT puts its sign on A only


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Three rank-4 adapters with different alphas, one targeting only some modules, and a rank-8 one."""
    hf = tiny_hf_model()
    root = tmp_path_factory.mktemp("merge")
    paths = {
        "a0": make_adapter(hf, root / "a0", seed=1, alpha=8),
        "a1": make_adapter(hf, root / "a1", seed=2, alpha=16),
        "a2": make_adapter(hf, root / "a2", seed=3, alpha=4, targets=["q_proj", "v_proj", "down_proj"]),
        "r8": make_adapter(hf, root / "r8", seed=4, rank=8),
    }
    spec = DecoderModel(hf.config, hf.state_dict(), torch.device("cpu"), torch.float32).lora_spec()
    return hf, paths, {n: read_adapter(p, spec, 64, n) for n, p in paths.items()}


def peft_merged(paths, names, weights, strategy, density, seed):
    """PEFT's merge. Injecting the new adapter draws its init from the global RNG, so the seed is set
    right after that, just before PEFT's module loop: then DARE's draws line up with ours model-wide."""
    model = PeftModel.from_pretrained(tiny_hf_model(), paths[names[0]], adapter_name=names[0]).eval()
    for n in names[1:]:
        model.load_adapter(paths[n], adapter_name=n)
    lora = model.base_model
    inject = lora.inject_adapter

    def inject_then_seed(*args, **kwargs):
        inject(*args, **kwargs)
        torch.manual_seed(seed)

    lora.inject_adapter = inject_then_seed
    lora.add_weighted_adapter(names, weights, "merged", combination_type=strategy, density=density)
    model.set_adapter("merged")
    return model


def peft_modules(model) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    """(layer, module) -> (A, B * scaling) of the "merged" adapter."""
    out = {}
    for key, mod in model.named_modules():
        if hasattr(mod, "lora_A") and "merged" in mod.lora_A:
            parts = key.split(".")
            layer, module = int(parts[parts.index("layers") + 1]), parts[-1]
            out[(layer, module)] = (
                mod.lora_A["merged"].weight.detach(),
                mod.lora_B["merged"].weight.detach() * mod.scaling["merged"],
            )
    return out


def save_as_peft(weights: AdapterWeights, path):
    """A PEFT folder for a merged adapter: r = alpha = its rank, so B (scaling folded) loads as is."""
    path.mkdir()
    assert all(A.shape[0] == weights.rank for A, _ in weights.modules.values())
    tensors = {}
    for (layer, module), (A, B) in weights.modules.items():
        block = "mlp" if module in ("gate_proj", "up_proj", "down_proj") else "self_attn"
        prefix = f"base_model.model.model.layers.{layer}.{block}.{module}"
        tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"] = A, B
    save_file(tensors, path / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": weights.rank, "lora_alpha": weights.rank, "target_modules": []}
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


CASES = [
    ("linear", ["a0", "a1", "a2"], None),
    ("cat", ["a0", "r8", "a2"], None),  # mixed ranks: rank 16, zero-padded where a2 is absent
    ("ties", ["a0", "a1", "a2"], 0.5),
    ("dare_linear", ["a0", "a1", "a2"], 0.5),
    ("dare_ties", ["a0", "a1", "a2"], 0.7),
]


@pytest.mark.parametrize("strategy,names,density", CASES, ids=[c[0] for c in CASES])
def test_merge_matches_peft(adapters, tmp_path, tokenizer, strategy, names, density):
    hf, paths, loaded = adapters
    seed = 1234
    ours = merge_adapters([loaded[n] for n in names], WEIGHTS, strategy, "merged", density=density, seed=seed)
    peft = peft_merged(paths, names, WEIGHTS, strategy, density, seed)
    ref = peft_modules(peft)
    assert ours.rank == (16 if strategy == "cat" else 4)
    assert set(ours.modules) == set(ref) and len(ref) == 2 * 7
    for key, (A_ref, B_ref) in ref.items():
        A, B = ours.modules[key]
        assert A.shape == A_ref.shape and B.shape == B_ref.shape, key
        assert torch.allclose(A, A_ref, atol=1e-5, rtol=0), key
        assert torch.allclose(B, B_ref, atol=1e-5, rtol=0), key
        assert torch.allclose(B @ A, B_ref @ A_ref, atol=1e-5, rtol=0), key
    # The engine, serving the merged adapter from a slot, gives PEFT's logits with "merged" active.
    engine = engine_for(hf, tokenizer)
    add_adapter(engine, "merged", save_as_peft(ours, tmp_path / "merged"))
    engine.add_request(PROMPT, SamplingParams(max_tokens=1), [AdapterRef("merged")])
    engine.step()
    with torch.no_grad():
        expected = peft(torch.tensor([PROMPT])).logits[0, -1]
        base = tiny_hf_model()(torch.tensor([PROMPT])).logits[0, -1]
    assert (expected - base).abs().max() > 1e-2  # the merge changes the output
    assert (last_logits(engine)[0] - expected).abs().max() < 1e-4


def test_dare_depends_on_the_seed_only(adapters):
    _, _, loaded = adapters
    group = [loaded["a0"], loaded["a1"]]
    torch.manual_seed(0)
    state = torch.get_rng_state()
    a = merge_adapters(group, [0.5, 0.5], "dare_linear", "m", density=0.5, seed=1)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is left alone
    b = merge_adapters(group, [0.5, 0.5], "dare_linear", "m", density=0.5, seed=1)
    c = merge_adapters(group, [0.5, 0.5], "dare_linear", "m", density=0.5, seed=2)
    key = (0, "q_proj")
    assert torch.equal(a.modules[key][0], b.modules[key][0])
    assert not torch.equal(a.modules[key][0], c.modules[key][0])


def test_single_adapter_is_the_adapter_scaled(adapters):
    _, _, loaded = adapters
    merged = merge_adapters([loaded["a2"]], [0.5], "ties", "m", density=0.3)  # as PEFT: linear for one
    for key, (A, B) in loaded["a2"].modules.items():
        mA, mB = merged.modules[key]
        assert torch.allclose(mB @ mA, 0.5 * B @ A, atol=1e-6)


@pytest.mark.parametrize("strategy", ["linear", "ties", "dare_linear", "dare_ties"])
def test_unequal_ranks_are_refused_except_by_cat(adapters, strategy):
    _, _, loaded = adapters
    with pytest.raises(ValueError, match="equal rank.*'a0': 4, 'r8': 8"):
        merge_adapters([loaded["a0"], loaded["r8"]], [0.5, 0.5], strategy, "m", density=0.5)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(strategy="svd"), "unknown merge strategy 'svd'"),
        (dict(strategy="ties", density=None), "needs a density in \\(0, 1\\]"),
        (dict(strategy="dare_ties", density=0.0), "needs a density"),
        (dict(strategy="ties", density=1.5), "needs a density"),
        (dict(weights=[0.5]), "needs 2 weights, got 1"),
        (dict(weights=[0.5, float("nan")]), "must be finite"),
        (dict(names=[]), "at least one adapter"),
    ],
)
def test_bad_specs_raise_clear_errors(adapters, kwargs, message):
    _, _, loaded = adapters
    spec = dict(names=["a0", "a1"], weights=[0.5, 0.5], strategy="linear", density=0.5) | kwargs
    with pytest.raises(ValueError, match=message):
        merge_adapters(
            [loaded[n] for n in spec["names"]], spec["weights"], spec["strategy"], "m", density=spec["density"]
        )


def test_merge_key():
    key = merge_key(["a", "b"], [0.5, 0.5], "ties", 0.5, seed=0)
    assert key == merge_key(("a", "b"), [0.5, 0.5], "ties", 0.5, seed=7)  # ties draws nothing
    assert key != merge_key(["b", "a"], [0.5, 0.5], "ties", 0.5)
    assert key != merge_key(["a", "b"], [0.5, 0.5], "ties", 0.6)
    assert merge_key(["a"], [1], "linear", 0.3, 1) == merge_key(["a"], [1.0], "linear", None, 2)
    assert merge_key(["a"], [1], "dare_linear", 0.5, 1) != merge_key(["a"], [1], "dare_linear", 0.5, 2)
    assert len(key) == 16 and set(MERGE_STRATEGIES) == {"linear", "cat", "ties", "dare_linear", "dare_ties"}
