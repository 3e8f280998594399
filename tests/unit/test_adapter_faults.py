"""Adapter faults: what an adapter computes is checked at parse by every kind (no NaN, no Inf, no
absurd update, in the dtype the pool runs), also through the upload API; the pool's storage follows
what is resident (a large adapter gone, the stacks shrink back); one broken folder in the store
does not stop start-up (served: the others; reported: the broken one)."""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import replace

import pytest
import torch
from fastapi.testclient import TestClient
from mole_serve.api.app import create_app
from mole_serve.api.metrics import Metrics
from mole_serve.compose import build
from mole_serve.config import Settings
from mole_serve.engine.model import DecoderModel
from mole_serve.engine.request import SamplingParams
from mole_serve.library.catalog import parse_adapter
from mole_serve.library.store import adapter_dirs
from mole_serve.lora.gate import GateConfig, MoLEGate
from mole_serve.lora.kinds.base import (
    MODULE_GROUPS,
    TARGET_MODULES,
    AdapterFormatError,
    AdapterWeights,
    LoRATargetSpec,
)
from mole_serve.lora.pool import LoRAPool
from mole_serve.routing.retriever import Retriever
from mole_serve.routing.types import AdapterRef
from prometheus_client import generate_latest

from tests.unit.helpers import add_adapter, engine_for, last_logits, make_adapter, remove_adapter, tiny_hf_model
from tests.unit.test_admin_api import AUTH, TOKEN, HashEmbedder, admin_client, examples, upload, with_config

D = 8
SPEC = LoRATargetSpec(num_layers=1, shapes={m: (D, D) for m in TARGET_MODULES})
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def _place(module: str) -> str:
    return f"layers.0.{'self_attn' if module in ATTENTION else 'mlp'}.{module}"


def _pair(g: torch.Generator, r: int, d_in: int = D, d_out: int = D) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(r, d_in, generator=g) * 0.3, torch.randn(d_out, r, generator=g) * 0.3


def kind_checkpoint(kind: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """A small valid checkpoint of `kind` for SPEC: (adapter_config, tensors)."""
    g, tensors = torch.Generator().manual_seed(0), {}
    if kind == "lora":
        for m in ("q_proj", "down_proj"):
            A, B = _pair(g, 2)
            tensors[f"base_model.model.model.{_place(m)}.lora_A.weight"] = A
            tensors[f"base_model.model.model.{_place(m)}.lora_B.weight"] = B
        return {"peft_type": "LORA", "r": 2, "lora_alpha": 4}, tensors
    if kind == "melora":
        for i in range(2):
            A, B = _pair(g, 2, D // 2, D // 2)
            tensors[f"base_model.model.model.{_place('q_proj')}.lora_A.{i}.weight"] = A
            tensors[f"base_model.model.model.{_place('q_proj')}.lora_B.{i}.weight"] = B
        return {"peft_type": "MELORA", "r": [2, 2], "lora_alpha": [4, 4]}, tensors
    if kind == "mixlora":
        tensors["mixlora.layers.0.mlp.moe_gate.weight"] = torch.randn(2, D, generator=g)
        for m in ("gate_proj", "up_proj", "down_proj"):
            for e in range(2):
                A, B = _pair(g, 2)
                tensors[f"mixlora.layers.0.mlp.{m}.experts.{e}.lora_A.weight"] = A
                tensors[f"mixlora.layers.0.mlp.{m}.experts.{e}.lora_B.weight"] = B
        return {"peft_type": "MIXLORA", "num_experts": 2, "top_k": 1, "r": 2, "lora_alpha": 4}, tensors
    tensors[f"moelora.{_place('q_proj')}.moe_gate.weight"] = torch.randn(2, D, generator=g)
    for e in range(2):
        A, B = _pair(g, 2)
        tensors[f"moelora.{_place('q_proj')}.experts.{e}.lora_A.weight"] = A
        tensors[f"moelora.{_place('q_proj')}.experts.{e}.lora_B.weight"] = B
    return {"peft_type": "MOELORA", "num_experts": 2, "top_k": 1, "r": 2, "lora_alpha": 4}, tensors


def scaled(tensors: dict[str, torch.Tensor], factor: float, which: str = "lora_") -> dict[str, torch.Tensor]:
    return {k: v * factor if which in k else v for k, v in tensors.items()}


KINDS = ("lora", "melora", "mixlora", "moelora")


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_refuses_weights_whose_update_is_absurd(kind):
    config, tensors = kind_checkpoint(kind)
    assert parse_adapter("fine", config, tensors, SPEC, 64).name == "fine"
    with pytest.raises(AdapterFormatError, match=r"adapter 'huge': layers\.0\.\w+_proj.* update B A .* 1e\+03"):
        parse_adapter("huge", config, scaled(tensors, 1e30), SPEC, 64)


@pytest.mark.parametrize("kind", ("mixlora", "moelora"))
def test_a_router_that_would_overflow_its_logits_is_refused(kind):
    config, tensors = kind_checkpoint(kind)
    with pytest.raises(AdapterFormatError, match="adapter 'loud': the router at layers.0.* limit is 1e"):
        parse_adapter("loud", config, scaled(tensors, 1e30, "moe_gate"), SPEC, 64)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"lora_alpha": 1e300}, "scaling 5e+299"),  # finite in Python, inf once folded into fp32 B
        ({"alpha_pattern": {"q_proj": float("nan")}}, "scaling nan"),
        ({"alpha_pattern": {"q_proj": float("inf")}}, "scaling inf"),
        ({"alpha_pattern": {"down_proj": float("-inf")}}, "layers.0.down_proj has scaling -inf"),
        ({"lora_alpha": 10**400}, "does not fit the base model"),  # an int no float holds
        ({"lora_alpha": 4e4}, r"update B A with an entry of"),  # finite everywhere, but absurd
    ],
)
def test_scalings_that_break_the_numerics_are_refused_naming_the_module(change, message):
    config, tensors = kind_checkpoint("lora")
    with pytest.raises(AdapterFormatError, match="adapter 'odd'") as error:
        parse_adapter("odd", {**config, **change}, tensors, SPEC, 64)
    assert message in str(error.value) or pytest.fail(str(error.value))


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_refuses_a_scaling_that_is_not_finite(kind):
    config, tensors = kind_checkpoint(kind)
    alpha = [float("nan")] * 2 if kind == "melora" else float("nan")
    with pytest.raises(AdapterFormatError, match="adapter 'odd'"):
        parse_adapter("odd", {**config, "lora_alpha": alpha}, tensors, SPEC, 64)


def test_factors_are_checked_in_the_dtype_the_pool_runs():
    """A tiny A under a large B: a sane update in fp32 and bf16, but B overflows float16."""
    config, tensors = kind_checkpoint("lora")
    lopsided = {k: v * (1e-4 if "lora_A" in k else 1e5) for k, v in tensors.items()}
    for dtype in (torch.float32, torch.bfloat16):
        parse_adapter("lopsided", config, lopsided, replace(SPEC, dtype=dtype), 64)
    with pytest.raises(AdapterFormatError, match="past the largest torch.float16"):
        parse_adapter("lopsided", config, lopsided, replace(SPEC, dtype=torch.float16), 64)


def test_a_merge_is_checked_as_any_adapter_in_the_pools_dtype():
    from mole_serve.routing.merge import merge_adapters

    config, tensors = kind_checkpoint("lora")
    lopsided = {k: v * (1e-4 if "lora_A" in k else 1e5) for k, v in tensors.items()}
    sources = [parse_adapter(name, config, lopsided, SPEC, 64) for name in ("a", "b")]
    assert merge_adapters(sources, [0.5, 0.5], "linear", "merge-x").rank == 2
    with pytest.raises(ValueError, match="adapter 'merge-x': .* past the largest torch.float16"):
        merge_adapters(sources, [0.5, 0.5], "linear", "merge-x", dtype=torch.float16)


def test_the_engine_spec_carries_the_models_dtype():
    hf = tiny_hf_model()
    model = DecoderModel(hf.config, hf.state_dict(), torch.device("cpu"), torch.bfloat16)
    assert model.lora_spec().dtype == torch.bfloat16


@pytest.fixture(scope="module")
def hf():
    return tiny_hf_model()


@pytest.fixture(scope="module")
def files(hf, tmp_path_factory) -> dict[str, bytes]:
    """A valid upload (test_admin_api's): a PEFT rank-4 LoRA of the tiny model plus its card."""
    from tests.unit.test_admin_api import files as admin_files

    return admin_files.__wrapped__(hf, tmp_path_factory)


@pytest.mark.parametrize(
    "config, words",
    [
        ({"lora_alpha": 1e300}, "adapter 'alpha': layers.0.down_proj has scaling 2.5e+299"),
        ({"alpha_pattern": {"v_proj": float("nan")}}, ""),  # refused as JSON or as a scaling
        ({"lora_alpha": 10**400}, ""),
    ],
)
def test_an_upload_that_would_compute_nan_is_422_and_never_served(hf, tokenizer, tmp_path, files, config, words):
    with admin_client(hf, tokenizer, tmp_path / "store") as client:
        r = upload(client, with_config(files, **config))
        assert r.status_code == 422, r.text
        assert words in r.json()["error"]["message"]
        assert not adapter_dirs(tmp_path / "store")
        assert client.get("/admin/adapters", headers=AUTH).json()["total"] == 0


# --- storage follows what is resident ---
def lora(name: str, rank: int) -> AdapterWeights:
    g = torch.Generator().manual_seed(rank)
    A, B = _pair(g, rank)
    return AdapterWeights(name, rank=rank, modules={(0, "q_proj"): (A, B), (0, "down_proj"): _pair(g, rank)})


def rank_of(pool: LoRAPool) -> int:
    return pool.stacks[0]["qkv"].rank if pool.stacks else 0


def test_the_stacks_shrink_when_the_largest_adapter_leaves_and_keep_the_rest_exact():
    library = {"small": lora("small", 2), "big": lora("big", 8)}
    pool = LoRAPool(SPEC, 2, 8, torch.device("cpu"), torch.float32, library.__getitem__)
    pool.attach_gate(MoLEGate(GateConfig.for_base("tiny", SPEC, rank=4)))
    [slot] = pool.acquire(["small"])
    packed = {group: (s.A[slot].clone(), [B[slot].clone() for B in s.B]) for group, s in pool.stacks[0].items()}
    small_bytes, version = pool.slot_bytes, pool.version
    pool.release([slot])

    big = pool.acquire(["big"])
    assert rank_of(pool) == 8 and pool.slot_bytes == 4 * small_bytes
    pool.forget("big")  # deleted while a sequence runs on it: its slot stays until released
    assert rank_of(pool) == 8
    pool.release(big)
    assert rank_of(pool) == pool.rank == 2 and pool.slot_bytes == small_bytes and pool.version > version
    for group, (A, Bs) in packed.items():  # the small adapter moved over as it was
        stack = pool.stacks[0][group]
        assert torch.equal(stack.A[slot], A) and all(torch.equal(B[slot], b) for B, b in zip(stack.B, Bs))
    assert pool.layer_gates is not None and pool.layer_gates[0].keys.shape[1] == 3 * 2  # the gate's keys too

    pool.release(pool.acquire(["small", "big"]))
    pool.forget("small")  # the big one still holds its slot
    assert rank_of(pool) == 8
    pool.forget("big")  # nothing held: no stacks at all
    assert pool.stacks == [] and pool.rank == pool.slot_bytes == 0 and pool.layer_gates is None


def test_eviction_of_the_largest_adapter_shrinks_the_stacks():
    library = {"small": lora("small", 2), "big": lora("big", 8)}
    pool = LoRAPool(SPEC, 1, 8, torch.device("cpu"), torch.float32, library.__getitem__)
    pool.release(pool.acquire(["big"]))
    pool.release(pool.acquire(["small"]))
    assert pool.evictions == 1 and rank_of(pool) == 2


def test_block_stacks_of_a_shape_no_slot_holds_are_freed():
    config, tensors = kind_checkpoint("melora")
    library = {"blocks": parse_adapter("blocks", config, tensors, SPEC, 64)}
    pool = LoRAPool(SPEC, 2, 8, torch.device("cpu"), torch.float32, library.__getitem__)
    pool.release(pool.acquire(["blocks"]))
    assert list(pool.block_stacks) == [(2, 2)]
    pool.forget("blocks")
    assert pool.block_stacks == {} and pool.block_shape == {}


def test_the_triton_expands_address_tables_do_not_pile_up_over_resizes():
    from mole_serve.lora.backends.triton.ops import BTables
    from mole_serve.lora.stacks import new_layer_stacks

    tables = BTables()
    for rank in (2, 8, 2, 8, 2):  # the pool re-allocating its stacks, one generation at a time
        stacks = new_layer_stacks(SPEC, 3, rank, torch.float32, torch.device("cpu"))
        for stack in stacks.values():
            addresses, _ = tables.get(stack)
            assert addresses.tolist() == [B.data_ptr() for B in stack.B]
        del stacks, stack
    assert len(tables._tables) <= 2 * len(MODULE_GROUPS)  # the live generation (and the last, until a miss)


def test_a_rank_64_visit_leaves_no_trace_in_the_engine(hf, tokenizer, tmp_path):
    """One request on a rank-64 adapter: once it is deleted, the stacks are back at rank 4 and the
    rank-4 adapter's logits are what they were, bit for bit."""
    engine = engine_for(hf, tokenizer, max_loras=4)
    add_adapter(engine, "small", make_adapter(hf, tmp_path / "small", seed=5, rank=4))
    add_adapter(engine, "big", make_adapter(hf, tmp_path / "big", seed=6, rank=64))
    sampling = SamplingParams(max_tokens=1)

    def small_logits() -> torch.Tensor:
        engine.generate([[5, 6, 7, 8]], sampling, [(AdapterRef("small"),)])
        return last_logits(engine).clone()

    before, small_bytes = small_logits(), engine.pool.slot_bytes
    engine.generate([[5, 6, 7, 8]], sampling, [(AdapterRef("big"),)])
    assert engine.pool.rank == 64 and engine.pool.slot_bytes == 16 * small_bytes
    remove_adapter(engine, "big")
    assert engine.pool.rank == 4 and engine.pool.slot_bytes == small_bytes
    assert all(s.A.shape[1] == 3 * 4 for s in (layer["qkv"] for layer in engine.pool.stacks))
    assert torch.equal(small_logits(), before)


# --- one broken folder does not stop start-up ---
@pytest.fixture
def store_with_a_broken_folder(hf, tmp_path):
    root = tmp_path / "store"
    for i, name in enumerate(("good", "truncated", "nan_alpha", "bad_card")):
        make_adapter(hf, root / name, seed=70 + i)
        (root / name / "card.json").write_text(json.dumps({"name": name, "examples": examples(f"{name} task")}))
    weights = root / "truncated" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    config = root / "nan_alpha" / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "alpha_pattern": {"q_proj": float("nan")}}))
    (root / "bad_card" / "card.json").write_text('{"examples": "not a list"}')
    return root


def test_a_store_with_broken_folders_starts_serves_the_rest_and_reports_them(
    hf, tokenizer, store_with_a_broken_folder, caplog
):
    root = store_with_a_broken_folder
    model = DecoderModel(hf.config, hf.state_dict(), torch.device("cpu"), torch.float32)
    settings = Settings(adapters_dir=root, max_model_len=64, max_num_seqs=4, max_loras=4, admin_token=TOKEN)
    with caplog.at_level(logging.WARNING, logger="mole_serve.library.catalog"):
        built = build(settings, model=model, tokenizer=tokenizer, retriever=Retriever(HashEmbedder()))
    catalog = built.catalog
    assert catalog.names == ["good"]
    assert sorted(catalog.failed) == ["bad_card", "nan_alpha", "truncated"]
    assert "cannot read its weights" in catalog.failed["truncated"]
    assert "scaling nan" in catalog.failed["nan_alpha"]
    assert "examples" in catalog.failed["bad_card"]
    assert {r.getMessage().split("'")[1] for r in caplog.records} == set(catalog.failed)
    # `auto` retrieves from the registered keys only: the broken adapters are never candidates
    retriever = catalog.retriever
    assert retriever is not None and "good" in retriever and not any(n in retriever for n in catalog.failed)
    seq = built.engine.generate([[5, 6, 7]], SamplingParams(max_tokens=2), [(AdapterRef("good"),)])[0]
    assert len(seq.output_ids) == 2

    metrics = Metrics(8)
    metrics.watch_library(lambda: catalog)
    assert b"mole_adapters_failed 3.0" in generate_latest(metrics.registry)

    with TestClient(create_app(settings, lambda: built)) as client:
        while client.get("/health").status_code != 200:
            threading.Event().wait(0.02)
        listed = client.get("/admin/adapters", headers=AUTH).json()
        assert [f["name"] for f in listed["failed"]] == ["bad_card", "nan_alpha", "truncated"]
        assert "cannot read its weights" in listed["failed"][2]["error"]


def test_a_good_version_under_a_failed_name_is_served_and_no_longer_reported(hf, tokenizer, store_with_a_broken_folder):
    root = store_with_a_broken_folder
    model = DecoderModel(hf.config, hf.state_dict(), torch.device("cpu"), torch.float32)
    settings = Settings(adapters_dir=root, max_model_len=64, max_num_seqs=4, max_loras=4)
    built = build(settings, retrieval=False, model=model, tokenizer=tokenizer)
    make_adapter(hf, root / "truncated", seed=80)
    built.add_adapter("truncated", root / "truncated")
    assert "truncated" in built.catalog and "truncated" not in built.catalog.failed
    built.remove_adapter("nan_alpha")  # what DELETE does (the store folder then goes too)
    assert sorted(built.catalog.failed) == ["bad_card"]


def test_an_unusable_store_folder_still_stops_start_up(hf, tokenizer, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    model = DecoderModel(hf.config, hf.state_dict(), torch.device("cpu"), torch.float32)
    settings = Settings(adapters_dir=tmp_path / "file", max_model_len=64, max_num_seqs=4, max_loras=4)
    with pytest.raises(NotADirectoryError, match="not a folder"):
        build(settings, retrieval=False, model=model, tokenizer=tokenizer)
