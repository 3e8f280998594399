"""Kinds `mixlora` and `moelora`: MixLoRA against its authors' package (`mixlora` 0.2.3, dropout
switched off), MoELoRA against a naive per-token per-expert loop written from the paper, both in
a batch of every kind, and each bad checkpoint a clear error."""

from __future__ import annotations

import json

import pytest
import torch
from mole_serve.engine.request import SamplingParams
from mole_serve.lora.kinds.base import AdapterFormatError
from mole_serve.routing.selection import SelectionError
from mole_serve.routing.types import AdapterRef, MergeSpec, Selection
from safetensors.torch import save_file

from tests.unit.helpers import ALL_TARGETS, add_adapter, engine_for, last_logits, make_adapter, served, tiny_hf_model
from tests.unit.test_melora import melora_tensors, write_melora

PROMPT = [5, 6, 7, 8, 9, 10, 11, 12, 13]
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
FFN = ("gate_proj", "up_proj", "down_proj")


def _pair(g: torch.Generator, linear: torch.nn.Linear, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    d_out, d_in = linear.weight.shape
    return torch.randn(r, d_in, generator=g) * 0.2, torch.randn(d_out, r, generator=g) * 0.2


def mixlora_tensors(hf, E: int, r: int, seed: int, legacy: bool = False) -> dict[str, torch.Tensor]:
    """Random attention LoRAs, routers and FFN experts (B nonzero), named as MoE-PEFT saves them
    (legacy: as m-LoRA <= 0.3 did)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for L, layer in enumerate(hf.model.layers):
        for proj in ATTENTION:
            A, B = _pair(g, getattr(layer.self_attn, proj), r)
            tensors[f"mixlora.layers.{L}.self_attn.{proj}.lora_A.weight"] = A
            tensors[f"mixlora.layers.{L}.self_attn.{proj}.lora_B.weight"] = B
        router = torch.randn(E, hf.config.hidden_size, generator=g)
        tensors[f"mixlora.layers.{L}.gate.weight" if legacy else f"mixlora.layers.{L}.mlp.moe_gate.weight"] = router
        for proj, legacy_name in zip(FFN, ("w1_proj", "w3_proj", "w2_proj")):
            for e in range(E):
                A, B = _pair(g, getattr(layer.mlp, proj), r)
                prefix = (
                    f"mixlora.layers.{L}.experts.{e}.{legacy_name}"
                    if legacy
                    else f"mixlora.layers.{L}.mlp.{proj}.experts.{e}"
                )
                tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"] = A, B
    return tensors


def moelora_tensors(hf, E: int, r: int, seed: int, targets=("q_proj", "v_proj", "down_proj")) -> dict:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in hf.named_modules():
        if name.split(".")[-1] in targets and isinstance(module, torch.nn.Linear):
            prefix = f"moelora.{name.removeprefix('model.')}"
            tensors[f"{prefix}.moe_gate.weight"] = torch.randn(E, module.in_features, generator=g)
            for e in range(E):
                A, B = _pair(g, module, r)
                tensors[f"{prefix}.experts.{e}.lora_A.weight"], tensors[f"{prefix}.experts.{e}.lora_B.weight"] = A, B
    return tensors


def write_folder(folder, tensors, config: dict, bin_format: bool = False):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    if bin_format:
        torch.save(tensors, folder / "adapter_model.bin")
    else:
        save_file(tensors, folder / "adapter_model.safetensors")
    return folder


def mixlora_config(E: int = 4, top_k: int = 2, r: int = 4, alpha: int = 8, **extra) -> dict:
    return {
        "peft_type": "MIXLORA",
        "routing_strategy": "mixlora",
        "num_experts": E,
        "top_k": top_k,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": 0.05,
        "act_fn": "silu",
        "target_modules": ALL_TARGETS,
        "bias": "none",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "tiny",
        **extra,
    }


def moelora_config(E: int = 4, top_k: int = 2, r: int = 4, alpha: int = 8, **extra) -> dict:
    return {
        "peft_type": "MOELORA",
        "num_experts": E,
        "top_k": top_k,
        "r": r,
        "lora_alpha": alpha,
        "target_modules": ["q_proj", "v_proj", "down_proj"],
        **extra,
    }


def step_logits(engine, prompt: list[int], adapters, tokens: int) -> tuple[list[int], torch.Tensor]:
    """The greedy tokens and the logits [tokens, V] of each step (the prefill's last row, then decodes)."""
    seq = engine.add_request(prompt, SamplingParams(max_tokens=tokens, ignore_eos=True), adapters)
    rows = []
    while not seq.is_finished:
        engine.step()
        rows.append(last_logits(engine)[0].clone())
    return seq.output_ids, torch.stack(rows)


def oracle_logits(model, prompt: list[int], output: list[int]) -> torch.Tensor:
    """Logits of a full forward over prompt + output at the rows that predicted each output token."""
    ids = torch.tensor([prompt + output[:-1]])
    with torch.no_grad():
        return model(ids).logits[0, len(prompt) - 1 :]


@pytest.fixture(scope="module")
def hf():
    return tiny_hf_model()


def mixlora_package_model(folder):
    """The authors' inference over a fresh copy of the tiny base, every dropout off."""
    from mixlora import inject_adapter_in_model, load_adapter_weights

    model = tiny_hf_model()
    config, weights = load_adapter_weights(str(folder), device="cpu", dtype=torch.float32)
    inject_adapter_in_model(model, config, weights)
    model.eval()  # the attention LoraLinears were created after the model's eval()
    for layer in model.model.layers:  # the experts live in plain dicts that eval() never reaches
        for moe in layer.mlp.mixlora_moes.values():
            for expert in moe.experts_.values():
                expert.eval()
    return model


@pytest.mark.parametrize("legacy", [False, True])
def test_mixlora_equals_the_authors_package(hf, tokenizer, tmp_path, legacy):
    pytest.importorskip("mixlora")  # `make setup` installs it (the oracle)
    tensors = mixlora_tensors(hf, E=4, r=4, seed=1)
    oracle = mixlora_package_model(write_folder(tmp_path / "ref", tensors, mixlora_config(), bin_format=True))
    served = mixlora_tensors(hf, E=4, r=4, seed=1, legacy=legacy)
    config = (
        mixlora_config(routing_strategy="mixtral", target_modules=[*ATTENTION, "w1_proj", "w2_proj", "w3_proj"])
        if legacy
        else mixlora_config()
    )
    engine = engine_for(hf, tokenizer, max_loras=8)
    add_adapter(engine, "mix", write_folder(tmp_path / "mix", served, config, bin_format=True))
    output, logits = step_logits(engine, PROMPT, [AdapterRef("mix")], tokens=11)
    expected = oracle_logits(oracle, PROMPT, output)
    assert (logits - expected).abs().max() < 1e-4  # the prefill and 10 decode steps
    base_output, _ = step_logits(engine, PROMPT, [], tokens=11)
    assert output != base_output  # the adapter matters


def moelora_loop_model(tensors: dict, E: int, top_k: int, scaling: float, renormalize: bool = True):
    """The paper's per-linear mixture as a naive loop, token by token and expert by expert."""

    class NaiveMoELinear(torch.nn.Module):
        def __init__(self, base: torch.nn.Linear, prefix: str) -> None:
            super().__init__()
            self.base, self.router = base, tensors[f"{prefix}.moe_gate.weight"]
            self.experts = [
                (tensors[f"{prefix}.experts.{e}.lora_A.weight"], tensors[f"{prefix}.experts.{e}.lora_B.weight"])
                for e in range(E)
            ]

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.base(x)
            flat_x, flat_y = x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1])
            for t in range(flat_x.shape[0]):
                probs = torch.softmax(self.router @ flat_x[t], dim=-1)
                weights, chosen = probs.topk(top_k)
                if renormalize:
                    weights = weights / weights.sum()
                for w, e in zip(weights.tolist(), chosen.tolist()):
                    A, B = self.experts[e]
                    flat_y[t] += w * scaling * (B @ (A @ flat_x[t]))
            return y

    model = tiny_hf_model()
    for name, module in list(model.named_modules()):
        prefix = f"moelora.{name.removeprefix('model.')}"
        if f"{prefix}.moe_gate.weight" in tensors:
            parent, attr = name.rsplit(".", 1)
            setattr(model.get_submodule(parent), attr, NaiveMoELinear(module, prefix))
    return model


@pytest.mark.parametrize("renormalize", [True, False])
def test_moelora_equals_a_naive_loop(hf, tokenizer, tmp_path, renormalize):
    tensors = moelora_tensors(hf, E=4, r=4, seed=2)
    engine = engine_for(hf, tokenizer)
    add_adapter(engine, "moe", write_folder(tmp_path / "moe", tensors, moelora_config(top_k_renormalize=renormalize)))
    output, logits = step_logits(engine, PROMPT, [AdapterRef("moe")], tokens=11)
    expected = oracle_logits(moelora_loop_model(tensors, 4, 2, 8 / 4, renormalize), PROMPT, output)
    assert (logits - expected).abs().max() < 1e-4


def test_mola_folders_load_as_moelora(hf, tmp_path):
    from mole_serve.library.catalog import read_adapter
    from mole_serve.lora.kinds.base import LoRATargetSpec

    tensors = {k.replace("moelora.", "mola."): t for k, t in moelora_tensors(hf, E=4, r=4, seed=2).items()}
    folder = write_folder(tmp_path / "mola", tensors, moelora_config(peft_type="MOLA", routing_strategy="mola"))
    spec = LoRATargetSpec(
        2,
        {
            m: (64, 64)
            if m in ("q_proj", "o_proj")
            else (64, 32)
            if m in ("k_proj", "v_proj")
            else (128, 64)
            if m == "down_proj"
            else (64, 128)
            for m in ALL_TARGETS
        },
    )
    weights = read_adapter(folder, spec, 64, "mola")
    assert weights.kind == "moelora" and weights.moe.num_experts == 4 and len(weights.moe.routers) == 6


def test_a_batch_of_every_kind_gives_each_request_its_own_tokens(hf, tokenizer, tmp_path):
    from mole_serve.lora.gate import GateConfig, MoLEGate

    make_adapter(hf, tmp_path / "a", seed=11)
    make_adapter(hf, tmp_path / "b", seed=12)
    write_melora(tmp_path / "me", melora_tensors(hf, 4, 2, seed=3), 4, 2)
    write_folder(tmp_path / "mix", mixlora_tensors(hf, E=4, r=4, seed=1), mixlora_config())
    write_folder(tmp_path / "moe", moelora_tensors(hf, E=4, r=4, seed=2), moelora_config())
    engine = engine_for(hf, tokenizer, max_loras=16, max_prefill_tokens=24)
    for name in ("a", "b", "me", "mix", "moe"):
        add_adapter(engine, name, tmp_path / name)
    torch.manual_seed(0)
    engine.pool.attach_gate(MoLEGate(GateConfig.for_base("tiny", engine.model.lora_spec())))
    requests = [
        ([AdapterRef("a")], None),
        ([AdapterRef("a", 0.3), AdapterRef("b", 0.7)], None),
        ([], Selection("gate", explicit=(AdapterRef("a"), AdapterRef("b")))),
        ([], Selection("merge", explicit=(AdapterRef("a"), AdapterRef("b")), merge=MergeSpec("ties", 0.5))),
        ([AdapterRef("me")], None),
        ([AdapterRef("mix")], None),
        ([AdapterRef("moe")], None),
        ([AdapterRef("mix")], None),
        ([], None),
    ]
    prompts = [PROMPT[: 4 + i] for i in range(len(requests))]
    sampling = SamplingParams(max_tokens=6, ignore_eos=True)
    together = engine.generate(prompts, sampling, [a for a, _ in requests], [s for _, s in requests])
    for prompt, (adapters, selection), seq in zip(prompts, requests, together):
        alone = engine.generate([prompt], sampling, [adapters], [selection])[0]
        assert seq.output_ids == alone.output_ids, seq.report()
    usage = together[5].report()[0]["expert_usage"]
    assert len(usage) == 4 and abs(sum(usage) - 1) < 1e-3


def mixture_and_lora(hf, tokenizer, tmp_path, max_loras: int):
    """An engine with the MixLoRA `mix` (4 experts: 5 slots) and the LoRA `a`."""
    write_folder(tmp_path / "mix", mixlora_tensors(hf, E=4, r=4, seed=1), mixlora_config())
    make_adapter(hf, tmp_path / "a", seed=11)
    engine = engine_for(hf, tokenizer, max_loras=max_loras)
    add_adapter(engine, "mix", tmp_path / "mix")
    add_adapter(engine, "a", tmp_path / "a")
    return engine


def test_pool_counts_an_adapter_of_e_experts_as_e_plus_one_slots(hf, tokenizer, tmp_path):
    engine = mixture_and_lora(hf, tokenizer, tmp_path, max_loras=5)
    sampling = SamplingParams(max_tokens=3, ignore_eos=True)
    before = engine.generate([PROMPT], sampling, [[AdapterRef("mix")]])[0].output_ids
    engine.generate([PROMPT], sampling, [[AdapterRef("a")]])  # 5 slots: the mixture (1 + 4) must go
    assert not engine.pool.is_resident("mix") and engine.pool.evictions == 1
    assert engine.generate([PROMPT], sampling, [[AdapterRef("mix")]])[0].output_ids == before  # back from CPU


def test_a_mixture_loaded_after_churn_takes_consecutive_slots(hf, tokenizer, tmp_path):
    """With slots 1-6 held by plain adapters and 7 free, least recently used first a, c, e, b, d,
    f: evicting in LRU order would free 1, 2, 3, 5, 7, scattered. The mixture's 1 + 4 slots are
    one run (its experts read as views), the one that evicts fewest: 3-7 (c, d, e, f)."""
    engine = mixture_and_lora(hf, tokenizer, tmp_path, max_loras=7)
    for name in "bcdef":
        make_adapter(hf, tmp_path / name, seed=ord(name))
        add_adapter(engine, name, tmp_path / name)
    sampling = SamplingParams(max_tokens=2, ignore_eos=True)
    for name in "abcdef":  # a..f in slots 1..6; touching b, d, f again leaves a, c, e least recent
        engine.generate([PROMPT], sampling, [[AdapterRef(name)]])
    for name in "bdf":
        engine.generate([PROMPT], sampling, [[AdapterRef(name)]])
    alone = engine_for(hf, tokenizer, max_loras=7)
    add_adapter(alone, "mix", tmp_path / "mix")
    expected = alone.generate([PROMPT], sampling, [[AdapterRef("mix")]])[0].output_ids
    assert engine.generate([PROMPT], sampling, [[AdapterRef("mix")]])[0].output_ids == expected
    experts = next(iter(engine.pool.experts.values()))
    assert experts.slot_range == (4, 8) and engine.pool.evictions == 4
    assert engine.pool.is_resident("a") and engine.pool.is_resident("b")


def test_a_mixture_named_with_others_or_merged_is_refused(hf, tokenizer, tmp_path):
    engine = mixture_and_lora(hf, tokenizer, tmp_path, max_loras=8)
    with pytest.raises(SelectionError, match="names it alone, not with other adapters"):
        engine.selector.choose(Selection("mixture", explicit=(AdapterRef("mix"), AdapterRef("a"))), [])
    with pytest.raises(SelectionError, match="names it alone"):  # in-process, adapters named directly
        engine.add_request(PROMPT, SamplingParams(max_tokens=2), [AdapterRef("a"), AdapterRef("mix")])
    with pytest.raises(SelectionError, match="not in a merge"):
        engine.selector.choose(Selection("merge", explicit=(AdapterRef("mix"),)), [])
    small = engine_for(hf, tokenizer, max_loras=4)
    add_adapter(small, "mix", tmp_path / "mix")
    with pytest.raises(SelectionError, match="needs 5 adapter slots"):
        small.selector.choose(Selection("mixture", explicit=(AdapterRef("mix"),)), [])
    with pytest.raises(SelectionError, match="needs 5 adapter slots"):  # not a request that waits forever
        small.add_request(PROMPT, SamplingParams(max_tokens=2), [AdapterRef("mix")])


def _drop(suffix: str):
    return lambda t: {k: v for k, v in t.items() if not k.endswith(suffix)}


def _set(key_suffix: str, make):
    return lambda t: {k: (make(v).contiguous() if k.endswith(key_suffix) else v) for k, v in t.items()}


@pytest.mark.parametrize(
    "kind, change_tensors, change_config, message",
    [
        ("mixlora", _drop("layers.1.mlp.moe_gate.weight"), {}, "layers.1 has FFN experts but no router"),
        ("mixlora", _drop("layers.0.mlp.up_proj.experts.3.lora_A.weight"), {}, "experts.3 has lora_B without its pair"),
        (
            "mixlora",
            lambda t: t,
            {"num_experts": 3},
            "has shape (4, 64); num_experts=3 and the base model need [3, 64]",
        ),
        (
            "mixlora",
            lambda t: {k: v for k, v in t.items() if "layers.1.mlp.up_proj.experts.3." not in k},
            {},
            "layers.1.up_proj lacks experts 3 of 4",
        ),
        ("mixlora", _set("layers.0.mlp.moe_gate.weight", lambda v: v[:, :32]), {}, "need [4, 64]"),
        ("mixlora", _set("layers.0.mlp.gate_proj.experts.1.lora_B.weight", lambda v: v[:, :2]), {}, "A [r, 64]"),
        ("mixlora", lambda t: t, {"routing_strategy": "mixlora-switch"}, "'mixlora-switch' is not supported"),
        ("mixlora", lambda t: t, {"routing_strategy": "hash"}, "unknown routing_strategy 'hash'"),
        ("mixlora", lambda t: t, {"use_dora": True}, "DoRA experts are not supported"),
        ("mixlora", lambda t: t, {"top_k": 5}, "`top_k` must be an integer from 1 to num_experts (4)"),
        (
            "mixlora",
            _set("layers.1.mlp.down_proj.experts.0.lora_A.weight", lambda v: v * float("nan")),
            {},
            "layers.1.down_proj.experts.0 holds non-finite values",
        ),
        ("mixlora", _set("layers.0.mlp.moe_gate.weight", lambda v: v * float("inf")), {}, "non-finite"),
        (
            "moelora",
            _drop("layers.0.self_attn.q_proj.moe_gate.weight"),
            {},
            "layers.0.q_proj has experts but no router",
        ),
        (
            "moelora",
            lambda t: {k: v for k, v in t.items() if not any(f"q_proj.experts.{e}." in k for e in (1, 2))},
            {},
            "layers.0.q_proj lacks experts 1, 2 of 4",
        ),
        ("moelora", lambda t: t, {"routing_strategy": "dense"}, "unknown routing_strategy 'dense'"),
    ],
)
def test_bad_checkpoints_are_clear_errors(hf, tmp_path, kind, change_tensors, change_config, message):
    from mole_serve.library.catalog import read_adapter

    if kind == "mixlora":
        tensors, config = mixlora_tensors(hf, E=4, r=4, seed=1), mixlora_config(**change_config)
    else:
        tensors, config = moelora_tensors(hf, E=4, r=4, seed=2), moelora_config(**change_config)
    folder = write_folder(tmp_path / kind, change_tensors(tensors), config)
    engine_spec = tiny_spec(hf)
    with pytest.raises(AdapterFormatError, match=f"adapter '{kind}'") as error:
        read_adapter(folder, engine_spec, 64, kind)
    assert message in str(error.value)


def tiny_spec(hf):
    from mole_serve.engine.model import DecoderModel

    return DecoderModel(hf.config, hf.state_dict(), torch.device("cpu"), torch.float32).lora_spec()


def test_a_pickled_mixlora_upload_is_refused_and_convert_writes_safetensors(hf, tmp_path):
    from mole_serve.library.catalog import convert_to_safetensors, read_adapter

    folder = write_folder(tmp_path / "mix", mixlora_tensors(hf, E=4, r=4, seed=1), mixlora_config(), bin_format=True)
    out = convert_to_safetensors(folder)
    (folder / "adapter_model.bin").unlink()
    weights = read_adapter(folder, tiny_spec(hf), 64, "mix")
    assert out.name == "adapter_model.safetensors" and weights.kind == "mixlora" and weights.moe.top_k == 2


@pytest.mark.parametrize("kind", ["mixlora", "moelora"])
def test_what_train_adapter_writes_serves_as_it_trained(tokenizer, tmp_path, kind):
    from mole_serve.training.moe import balance_loss, inject_moe, save_moe

    hf = tiny_hf_model()
    engine = engine_for(hf, tokenizer)  # the base weights, before the training modules go in
    routed = inject_moe(hf, kind, tuple(ALL_TARGETS), 4, 2, 4, 8)
    g = torch.Generator().manual_seed(5)
    for name, p in hf.named_parameters():
        if p.requires_grad and name.endswith("B"):  # as after some training: nonzero updates
            p.data.normal_(0, 0.2, generator=g)
    with torch.no_grad():
        expected = hf(torch.tensor([PROMPT])).logits[0, -1]
    mask = torch.ones(len(PROMPT), dtype=torch.bool)
    assert balance_loss(routed, mask, 2, 0.01) > 0
    save_moe(hf, kind, tmp_path, tuple(ALL_TARGETS), 4, 2, 4, 8, "tiny", {})
    add_adapter(engine, kind, tmp_path)
    _, logits = step_logits(engine, PROMPT, [AdapterRef(kind)], tokens=1)
    assert (logits[0] - expected).abs().max() < 1e-4


def test_balance_loss_is_moe_peft_formula_on_concatenated_layers():
    from mole_serve.training.moe import balance_loss

    class Router:
        def __init__(self, logits):
            self.logits = logits

    g = torch.Generator().manual_seed(0)
    layers = [Router(torch.randn(6, 4, generator=g)) for _ in range(3)]
    mask = torch.tensor([True] * 5 + [False])  # the last token is padding
    logits = torch.cat([r.logits[:5] for r in layers])  # [15, 4]
    probs = torch.softmax(logits, -1)
    top = probs.topk(2, -1).indices
    f = torch.stack([torch.stack([(top[:, k] == e).float().mean() for e in range(4)]) for k in range(2)])  # [k, E]
    expected = 0.01 * 4 * sum(f[k, e] * probs[:, e].mean() for k in range(2) for e in range(4))
    assert torch.allclose(balance_loss(layers, mask, 2, 0.01), expected)


def test_over_http_a_mixture_reports_expert_usage_and_prometheus_counts_it(hf, tokenizer, tmp_path):
    import threading

    from fastapi.testclient import TestClient
    from mole_serve.api.app import create_app
    from mole_serve.config import Settings

    engine = mixture_and_lora(hf, tokenizer, tmp_path, max_loras=8)
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    with TestClient(create_app(Settings(), lambda: served(engine))) as client:
        while client.get("/health").status_code != 200:
            threading.Event().wait(0.05)
        r = client.post("/v1/chat/completions", json={**chat, "model": "mix"})
        assert r.status_code == 200, r.text
        usage = r.json()["adapters"][0]["expert_usage"]
        assert len(usage) == 4 and abs(sum(usage) - 1) < 1e-3
        r = client.post("/v1/chat/completions", json={**chat, "model": "auto", "adapters": ["mix", "a"]})
        assert r.status_code == 400 and "names it alone" in r.json()["error"]["message"]
        metrics = client.get("/metrics").text
        assert 'mole_expert_usage_total{adapter="mix",expert="0"}' in metrics


def test_a_moelora_uploads_through_the_admin_api_and_serves_by_name(hf, tokenizer, tmp_path):
    from safetensors.torch import save

    from tests.unit.test_admin_api import AUTH, admin_client, chat, examples, parts

    tensors = moelora_tensors(hf, E=4, r=4, seed=2)
    files = {
        "adapter_config.json": json.dumps(moelora_config()).encode(),
        "adapter_model.safetensors": save(tensors),
        "card.json": json.dumps({"name": "moe", "examples": examples("route experts")}).encode(),
    }
    broken = {**files, "adapter_model.safetensors": save(_drop("layers.1.mlp.down_proj.moe_gate.weight")(tensors))}
    with admin_client(
        hf, tokenizer, tmp_path / "store", max_upload_bytes=2_000_000, max_uncompressed_bytes=4_000_000
    ) as client:
        r = client.post("/admin/adapters", headers=AUTH, files=parts(broken))
        assert r.status_code == 422 and "layers.1.down_proj has experts but no router" in r.json()["error"]["message"]
        r = client.post("/admin/adapters", headers=AUTH, files=parts(files))
        assert r.status_code == 201, r.text
        r = chat(client, "moe", max_tokens=4)
        assert r.status_code == 200 and len(r.json()["adapters"][0]["expert_usage"]) == 4
        found = chat(client, "auto", max_tokens=2, composition="mixture").json().get("adapters") or []
        assert "moe" not in [a["name"] for a in found]  # a mixture's card is not retrieved unless it says so
