"""Kind `melora`: the authors' folder layout against transformers with W + blockdiag(s_i B_i A_i)
merged in, the native block form against the dense one, and MELoRA inside every composition."""

from __future__ import annotations

import json

import pytest
import torch
from mole_serve.engine.request import SamplingParams
from mole_serve.library.catalog import convert_to_safetensors, read_adapter
from mole_serve.lora.kinds import melora
from mole_serve.lora.kinds.base import AdapterFormatError
from mole_serve.routing.types import AdapterRef, MergeSpec, Selection
from safetensors.torch import save_file

from tests.unit.helpers import ALL_TARGETS, add_adapter, engine_for, last_logits, make_adapter, tiny_hf_model

PROMPT = [5, 6, 7, 8, 9, 10, 11, 12, 13]


def melora_tensors(hf, n: int, r: int, seed: int, targets=ALL_TARGETS) -> dict[str, torch.Tensor]:
    """Random mini LoRAs (B nonzero, unlike a fresh init) named as the authors' peft fork saves them."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in hf.named_modules():
        if name.split(".")[-1] in targets and isinstance(module, torch.nn.Linear):
            d_out, d_in = module.weight.shape
            for i in range(n):
                prefix = f"base_model.model.{name}"
                tensors[f"{prefix}.lora_A.{i}.weight"] = torch.randn(r, d_in // n, generator=g) * 0.2
                tensors[f"{prefix}.lora_B.{i}.weight"] = torch.randn(d_out // n, r, generator=g) * 0.2
    return tensors


def write_melora(folder, tensors, n: int, r: int, alpha: float = 4.0, bin_format: bool = False, **config):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "MELORA",
                "r": [r] * n,
                "lora_alpha": [alpha] * n,
                "target_modules": list(ALL_TARGETS),
                "lora_dropout": 0.05,
                "mode": "melora",
                "bias": "none",
                **config,
            }
        )
    )
    if bin_format:
        torch.save(tensors, folder / "adapter_model.bin")
    else:
        save_file(tensors, folder / "adapter_model.safetensors")
    return folder


def merged_model(tensors, n: int, r: int, alpha: float, seed_model: int = 0):
    """transformers with W += blockdiag(alpha/r * B_i A_i): the authors' forward, merged."""
    hf = tiny_hf_model(seed=seed_model)
    params = dict(hf.named_parameters())
    for key in tensors:
        if ".lora_A.0." not in key:
            continue
        prefix = key.split(".lora_A.")[0]
        target = prefix.removeprefix("base_model.model.") + ".weight"
        blocks = [
            alpha / r * tensors[f"{prefix}.lora_B.{i}.weight"] @ tensors[f"{prefix}.lora_A.{i}.weight"]
            for i in range(n)
        ]
        with torch.no_grad():
            params[target] += torch.block_diag(*blocks)
    return hf


@pytest.fixture(scope="module")
def hf():
    return tiny_hf_model()


@pytest.mark.parametrize("bin_format", [False, True])
def test_authors_folder_equals_transformers_with_the_blockdiag_merged(hf, tokenizer, tmp_path, bin_format):
    n, r, alpha = 4, 2, 4.0
    tensors = melora_tensors(hf, n, r, seed=1)
    folder = write_melora(tmp_path / "m", tensors, n, r, alpha, bin_format=bin_format)
    engine = engine_for(hf, tokenizer)
    add_adapter(engine, "m", folder)
    ref = merged_model(tensors, n, r, alpha)
    seq = engine.generate([PROMPT], SamplingParams(max_tokens=8, ignore_eos=True), [(AdapterRef("m"),)])[0]
    with torch.no_grad():
        expected = ref.generate(
            torch.tensor([PROMPT]), max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, len(PROMPT) :].tolist()
        base = (
            tiny_hf_model()
            .generate(torch.tensor([PROMPT]), max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)[
                0, len(PROMPT) :
            ]
            .tolist()
        )
    assert seq.output_ids == expected and expected != base  # prefill and decode, and the adapter matters
    engine.add_request(PROMPT, SamplingParams(max_tokens=1), [AdapterRef("m")])
    engine.step()
    with torch.no_grad():
        logits = ref(torch.tensor([PROMPT])).logits[0, -1]
    assert (last_logits(engine)[0] - logits).abs().max() < 1e-4


def test_native_blocks_equal_the_dense_form(hf):
    n, r = 4, 3
    weights = melora.parse(
        "m",
        {"peft_type": "MELORA", "r": [r] * n, "lora_alpha": [6] * n},
        melora_tensors(hf, n, r, seed=2),
        engine_spec(hf),
        max_rank=64,
    )
    assert weights.rank == n * r and weights.blocks is not None
    for (layer, module), (A, B) in weights.modules.items():
        x = torch.randn(5, A.shape[1])
        native = melora.reference_delta(weights, layer, module, x)
        assert torch.allclose(native, x @ A.t() @ B.t(), atol=1e-5), (layer, module)


def engine_spec(hf):
    from mole_serve.engine.model import DecoderModel

    return DecoderModel(hf.config, hf.state_dict(), torch.device("cpu"), torch.float32).lora_spec()


def dense_twin(weights, folder):
    """The MELoRA's dense equivalent as a plain PEFT LoRA folder (rank R, alpha R: scaling 1)."""
    folder.mkdir()
    tensors = {}
    for (layer, module), (A, B) in weights.modules.items():
        part = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
        prefix = f"base_model.model.model.layers.{layer}.{part}.{module}"
        tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"] = A.contiguous(), B.contiguous()
    save_file(tensors, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": weights.rank, "lora_alpha": weights.rank})
    )
    return folder


def test_melora_in_every_composition_equals_its_dense_twin(hf, tokenizer, tmp_path):
    """By name, in a weighted set, as a gated candidate and inside a TIES merge (delta W is a plain
    matrix), mixed in one batch with plain LoRAs: each request's tokens as its dense twin gives them."""
    from mole_serve.lora.gate import GateConfig, MoLEGate

    n, r = 4, 2
    folder = write_melora(tmp_path / "m", melora_tensors(hf, n, r, seed=3), n, r)
    twin = dense_twin(read_adapter(folder, engine_spec(hf), 64, "m"), tmp_path / "twin")
    plain = {f"p{i}": make_adapter(hf, tmp_path / f"p{i}", seed=40 + i, rank=n * r) for i in range(2)}
    torch.manual_seed(0)
    gate = MoLEGate(GateConfig("tiny", 2, 64, 64 + 32 + 32, rank=4))

    def run(name_of_m: str):
        engine = engine_for(hf, tokenizer)
        add_adapter(engine, name_of_m, folder if name_of_m == "m" else twin)
        for name, p in plain.items():
            add_adapter(engine, name, p)
        engine.pool.attach_gate(gate)
        sets = [(AdapterRef(name_of_m),), (AdapterRef(name_of_m, 0.6), AdapterRef("p0", 0.4)), (AdapterRef("p1"),)]
        selections = [Selection("mixture", s) for s in sets] + [
            Selection("gate", (AdapterRef(name_of_m), AdapterRef("p0"), AdapterRef("p1"))),
            Selection("merge", (AdapterRef(name_of_m), AdapterRef("p0")), merge=MergeSpec("ties", density=0.5)),
        ]
        prompts = [PROMPT, PROMPT[:5], [21, 22, 23], [31, 32, 33, 34], [41, 42]]
        seqs = engine.generate(prompts, SamplingParams(max_tokens=6, ignore_eos=True), selections=selections)
        return [s.output_ids for s in seqs]

    assert run("m") == run("twin")


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(n=3), "cannot split evenly"),
        (dict(r=20), "over the limit"),
        (dict(drop="lora_B.1."), "lacks lora_B.1"),
        (dict(alpha=[4.0]), "entries for 4 mini LoRAs"),
    ],
)
def test_bad_melora_folders_are_refused_naming_adapter_and_module(hf, tokenizer, tmp_path, change, message):
    n, r = change.get("n", 4), change.get("r", 2)
    tensors = melora_tensors(hf, n if n != 3 else 4, r, seed=4)
    if n == 3:  # a config of 3 mini LoRAs over features 64 and 32
        tensors = {k: v for k, v in tensors.items() if not k.split(".")[-2] == "3"}
    if "drop" in change:
        tensors = {k: v for k, v in tensors.items() if change["drop"] not in k}
    folder = write_melora(tmp_path / "bad", tensors, n, r)
    if "alpha" in change:
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": change["alpha"]}))
    engine = engine_for(hf, tokenizer, max_lora_rank=16)
    with pytest.raises(AdapterFormatError, match=message) as err:
        add_adapter(engine, "bad", folder)
    assert "'bad'" in str(err.value)


def test_convert_writes_the_safetensors_twin_of_a_bin_folder(hf, tmp_path):
    tensors = melora_tensors(hf, 4, 1, seed=5)
    folder = write_melora(tmp_path / "m", tensors, 4, 1, bin_format=True)
    out = convert_to_safetensors(folder)
    from safetensors.torch import load_file

    assert out.name == "adapter_model.safetensors" and load_file(out).keys() == tensors.keys()


def test_a_melora_upload_is_served_and_a_bad_one_is_a_422(hf, tokenizer, tmp_path):
    from safetensors.torch import save

    from tests.unit.test_admin_api import AUTH, admin_client, chat, examples, upload

    tensors = melora_tensors(hf, 4, 2, seed=6)
    folder = write_melora(tmp_path / "m", tensors, 4, 2)
    card = {"name": "mini", "examples": examples("shrink the letters")}
    files = {
        "adapter_config.json": (folder / "adapter_config.json").read_bytes(),
        "adapter_model.safetensors": (folder / "adapter_model.safetensors").read_bytes(),
        "card.json": json.dumps(card).encode(),
    }
    with admin_client(hf, tokenizer, tmp_path / "store") as client:
        r = upload(client, files)
        assert r.status_code == 201 and r.json()["rank"] == 8, r.text  # 4 mini LoRAs of rank 2
        assert chat(client, "mini").status_code == 200
        uneven = {k: v for k, v in tensors.items() if "lora_A.2." not in k}
        r = upload(client, {**files, "adapter_model.safetensors": save(uneven)}, name="broken")
        assert r.status_code == 422 and "lacks lora_A.2" in r.json()["error"]["message"]
        assert (
            chat(client, "mini").status_code == 200 and "broken" not in client.get("/admin/adapters", headers=AUTH).text
        )


def test_a_trained_melora_serves_as_it_trained(tokenizer, tmp_path):
    """train-adapter --kind melora writes the authors' layout; the server's logits equal the
    training module's own forward (an independent implementation: einsum over the blocks)."""
    from mole_serve.training.train_adapter import TrainOptions, train_adapter

    from tests.unit.test_training import tiny_llama

    opts = TrainOptions(
        kind="melora",
        rank=1,
        blocks=4,
        steps=12,
        batch=4,
        lr=1e-2,
        warmup=2,
        stop_loss=0.0,
        n_eval=4,
        n_card_examples=5,
    )
    trained = tiny_llama(tokenizer)
    card = train_adapter(
        "odd_or_even", tmp_path / "odd_or_even", opts, model=trained, tokenizer=tokenizer, base_model_name="tiny-llama"
    )
    assert card["kind"] == "melora" and card["final_loss"] < card["first_loss"]
    config = json.loads((tmp_path / "odd_or_even" / "adapter_config.json").read_text())
    assert config["peft_type"] == "MELORA" and config["r"] == [1] * 4
    engine = engine_for(tiny_llama(tokenizer), tokenizer)
    add_adapter(engine, "m", tmp_path / "odd_or_even")
    engine.add_request(PROMPT, SamplingParams(max_tokens=1), [AdapterRef("m")])
    engine.step()
    with torch.no_grad():
        expected = trained(torch.tensor([PROMPT])).logits[0, -1]
    assert (last_logits(engine)[0] - expected).abs().max() < 1e-4
    # 1 per-mini rank over 4 blocks: the parameters of a rank-1 LoRA, an update of rank 4
    per_module = sum(d_in + d_out for d_in, d_out in engine.model.lora_spec().shapes.values())
    assert card["trainable_params"] == per_module * engine.model.num_layers


def test_native_blocks_equal_the_dense_path_in_a_mixed_batch(hf, tokenizer, tmp_path):
    """Lone MELoRAs (two block shapes, one at weight 0.5) run natively beside a MELoRA in a
    weighted set, plain LoRAs and the base model, with chunked prefill joining decode: each
    request's tokens as with the dense blockdiag path everywhere."""
    folders = {
        "m4": write_melora(tmp_path / "m4", melora_tensors(hf, 4, 2, seed=7), 4, 2),
        "m8": write_melora(tmp_path / "m8", melora_tensors(hf, 8, 1, seed=8), 8, 1),
        "p": make_adapter(hf, tmp_path / "p", seed=50),
    }
    sets = [
        (AdapterRef("m4"),),
        (AdapterRef("m8", 0.5),),
        (AdapterRef("m4", 0.7), AdapterRef("p", 0.3)),
        (AdapterRef("p"),),
        (),
        (AdapterRef("m8"),),
    ]
    prompts = [PROMPT, [21, 22, 23, 24], [31, 32, 33], PROMPT[:6], [41, 42, 43], [51] * 10]

    def run(native: bool):
        engine = engine_for(hf, tokenizer, lora_native_blocks=native, max_prefill_tokens=16)
        for name, folder in folders.items():
            add_adapter(engine, name, folder)
        seqs = engine.generate(prompts, SamplingParams(max_tokens=8, ignore_eos=True), sets)
        return engine, [s.output_ids for s in seqs]

    native, tokens = run(True)
    assert set(native.pool.block_shape.values()) == {(4, 2), (8, 1)}
    assert tokens == run(False)[1]
