"""/admin/adapters on a tiny random model: auth, upload -> served, every refusal, replace, delete
while streaming, card updates, persistence across an app restart, racing uploads."""

from __future__ import annotations

import hashlib
import json
import tarfile
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from mole_serve.api.app import create_app
from mole_serve.config import Settings
from mole_serve.library.store import AdapterStore, adapter_dirs
from mole_serve.routing.retriever import Retriever
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from tests.unit.helpers import add_adapter, engine_for, make_adapter, remove_adapter, served, tiny_hf_model
from tests.unit.test_store import tar_bytes, zip_bytes

TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LIMITS = dict(max_upload_bytes=400_000, max_uncompressed_bytes=600_000, max_lora_rank=8)


class HashEmbedder:
    """Bag of hashed words: texts sharing words get close vectors (a stand-in for MiniLM)."""

    dim = 64

    def encode(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), np.float32)
        for i, text in enumerate(texts):
            for word in text.lower().split():
                out[i, int(hashlib.md5(word.encode()).hexdigest(), 16) % self.dim] += 1
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def examples(topic: str, n: int = 6) -> list[str]:
    return [f"please {topic} item {i}" for i in range(n)]


@pytest.fixture(scope="module")
def hf():
    return tiny_hf_model()


@pytest.fixture(scope="module")
def files(hf, tmp_path_factory) -> dict[str, bytes]:
    """A valid upload: a PEFT rank-4 LoRA of the tiny model plus its card."""
    folder = make_adapter(hf, tmp_path_factory.mktemp("peft") / "a", seed=1)
    card = {"name": "alpha", "description": "roman numerals", "examples": examples("convert roman numerals")}
    return {
        "adapter_config.json": (folder / "adapter_config.json").read_bytes(),
        "adapter_model.safetensors": (folder / "adapter_model.safetensors").read_bytes(),
        "card.json": json.dumps(card).encode(),
    }


def parts(files: dict[str, bytes]) -> list:
    return [("files", (name, data)) for name, data in files.items()]


def with_card(files: dict[str, bytes], **card) -> dict[str, bytes]:
    return {**files, "card.json": json.dumps({**json.loads(files["card.json"]), **card}).encode()}


def with_config(files: dict[str, bytes], **config) -> dict[str, bytes]:
    return {**files, "adapter_config.json": json.dumps({**json.loads(files["adapter_config.json"]), **config}).encode()}


def with_tensors(files: dict[str, bytes], change) -> dict[str, bytes]:
    tensors = load_tensors(files["adapter_model.safetensors"])
    change(tensors)
    return {**files, "adapter_model.safetensors": save_tensors(tensors)}


@contextmanager
def admin_client(hf, tokenizer, store_dir, engine_settings: dict | None = None, **settings):
    """An app over the store at `store_dir`, loading what it holds as `mole-serve serve` does."""
    settings = Settings(**{"admin_token": TOKEN, "adapters_dir": store_dir, **LIMITS, **settings})

    def load():
        AdapterStore(store_dir).recover()
        engine = engine_for(
            hf,
            tokenizer,
            retriever=Retriever(HashEmbedder()),
            adapters_dir=store_dir,
            max_lora_rank=settings.max_lora_rank,
            **(engine_settings or {}),
        )
        for name, path in adapter_dirs(store_dir).items():
            add_adapter(engine, name, path)
        return served(engine)

    with TestClient(create_app(settings, load)) as client:
        while client.get("/health").status_code != 200:
            threading.Event().wait(0.02)
        yield client


@pytest.fixture
def client(hf, tokenizer, tmp_path):
    with admin_client(hf, tokenizer, tmp_path / "store") as c:
        yield c


def upload(client, files, name=None, replace=False, archive=None):
    if archive:
        files = {archive: (zip_bytes if archive.endswith(".zip") else tar_bytes)(files)}
    return client.post(
        "/admin/adapters",
        params={"replace": "true"} if replace else None,
        headers=AUTH,
        files=parts(files),
        data={"name": name} if name else None,
    )


def chat(client, model, **extra):
    return client.post(
        "/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **extra},
    )


def test_auth(hf, tokenizer, tmp_path):
    with admin_client(hf, tokenizer, tmp_path, admin_token=None) as c:
        r = c.get("/admin/adapters", headers=AUTH)
        assert r.status_code == 403 and "MOLE_ADMIN_TOKEN" in r.json()["error"]["message"]
    with admin_client(hf, tokenizer, tmp_path) as c:
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": f"Basic {TOKEN}"},
            {"Authorization": TOKEN},
        ):
            r = c.post("/admin/adapters", headers=headers, content=b"x" * 10)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_admin_token", headers
        assert c.get("/admin/nowhere", headers=AUTH).status_code == 404
        assert c.get("/admin/adapters", headers=AUTH).json()["data"] == []


def test_upload_is_served_listed_updated_and_deleted(client, files, tmp_path):
    r = upload(client, files)
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["name"] == "alpha" and body["card"]["examples"] == examples("convert roman numerals")
    assert body["rank"] == 4 and len(body["targets"]) == 7 and body["load_s"] > 0 and body["nearest"] == []
    assert sorted(p.name for p in (tmp_path / "store" / "alpha").iterdir()) == sorted(files)
    r = chat(client, "alpha")
    assert r.status_code == 200 and r.json()["adapters"][0]["name"] == "alpha"

    r = upload(client, files)  # a retry of the same bytes (its answer lost): answered as that upload
    assert r.status_code == 201 and r.json()["name"] == "alpha" and not r.json()["replaced"]
    r = upload(client, with_card(files, description="other"))
    assert r.status_code == 409 and r.json()["error"]["code"] == "adapter_exists"
    r = upload(client, with_card(files, description="v2"), replace=True)
    assert r.status_code == 201 and r.json()["replaced"] and r.json()["card"]["description"] == "v2"
    # the form field names it; the key of a card about the same thing is alpha's nearest neighbour
    r = upload(
        client, with_card(files, examples=examples("convert roman numerals quickly")), name="beta", archive="b.zip"
    )
    assert r.status_code == 201 and r.json()["card"]["name"] == "beta"
    assert r.json()["nearest"][0]["name"] == "alpha" and r.json()["nearest"][0]["score"] > 0.8

    page = client.get("/admin/adapters", params={"limit": 1}, headers=AUTH).json()
    assert page["total"] == 2 and [a["name"] for a in page["data"]] == ["alpha"] and page["next_offset"] == 1
    assert client.get("/admin/adapters", params={"limit": 0}, headers=AUTH).status_code == 400
    info = client.get("/admin/adapters/alpha", headers=AUTH).json()
    assert info["loaded"] and info["rank"] == 4 and info["config"]["r"] == 4 and info["size_bytes"] > 10_000
    assert set(info) >= {"card", "config", "targets", "num_layers"} and info["usage"] == 1  # the chat above

    retriever = client.app.state.catalog.retriever
    before = retriever.key("alpha")
    r = client.patch("/admin/adapters/alpha", headers=AUTH, json={"examples": examples("sort letters")})
    assert r.status_code == 200 and r.json()["card"]["description"] == "v2"
    assert not np.allclose(before, retriever.key("alpha"))  # the key follows the new examples
    assert (
        json.loads((tmp_path / "store" / "alpha" / "card.json").read_text())["examples"][0] == "please sort "
        "letters item 0"
    )
    for body, status in (({"examples": ["a"]}, 422), ({"colour": "x"}, 400), ({"examples": "x"}, 400)):
        assert client.patch("/admin/adapters/alpha", headers=AUTH, json=body).status_code == status
    assert client.patch("/admin/adapters/alpha", headers=AUTH, content=b"{").status_code == 400
    assert client.patch("/admin/adapters/nope", headers=AUTH, json={}).status_code == 404

    r = client.delete("/admin/adapters/alpha", headers=AUTH)
    assert r.status_code == 200 and r.json()["deleted"]
    assert chat(client, "alpha").status_code == 404 and "alpha" not in retriever.names
    assert client.get("/admin/adapters/alpha", headers=AUTH).status_code == 404
    assert client.delete("/admin/adapters/alpha", headers=AUTH).status_code == 404
    assert list(adapter_dirs(tmp_path / "store")) == ["beta"]


def test_curl_style_fields_name_the_files(client, files):
    """`curl -F card.json=@my_card.json ...`: the field names the file, whatever it is called locally."""
    r = client.post(
        "/admin/adapters", headers=AUTH, files={k: (f"local-{i}.bin.txt", v) for i, (k, v) in enumerate(files.items())}
    )
    assert r.status_code == 201, r.text


def test_uploads_survive_a_restart(hf, tokenizer, files, tmp_path):
    with admin_client(hf, tokenizer, tmp_path / "store") as c:
        assert upload(c, files, archive="a.tar.gz").status_code == 201
    with admin_client(hf, tokenizer, tmp_path / "store") as c:
        assert [a["name"] for a in c.get("/admin/adapters", headers=AUTH).json()["data"]] == ["alpha"]
        assert chat(c, "alpha").status_code == 200


def _pad_rank(tensors: dict, rank: int) -> None:
    for key, t in tensors.items():  # A [r, d_in] gets zero rows, B [d_out, r] zero columns
        pad = (0, 0, 0, rank - t.shape[0]) if "lora_A" in key else (0, rank - t.shape[1])
        tensors[key] = torch.nn.functional.pad(t, pad)


def _first(tensors: dict, fn) -> None:
    key = sorted(tensors)[0]
    tensors[key] = fn(tensors[key])


def _nan(t):
    t = t.clone()
    t[0, 0] = float("nan")
    return t


BAD_UPLOADS = {  # what -> (change to the valid upload, status, words of the message)
    "pickle weights": (lambda f: {**f, "adapter_model.bin": b"\x80\x04pickle"}, 400, "pickle"),
    "missing card": (lambda f: {k: v for k, v in f.items() if k != "card.json"}, 400, "missing card.json"),
    "bad name": (lambda f: with_card(f, name="Bad Name"), 400, "invalid"),
    "reserved name": (lambda f: with_card(f, name="auto"), 400, "reserved"),
    "the gate's folder": (lambda f: with_card(f, name="gate"), 400, "reserved"),
    "the retrieval projection's folder": (lambda f: with_card(f, name="retriever"), 400, "reserved"),
    "few examples": (lambda f: with_card(f, examples=examples("x", 4)), 422, "at least 5"),
    "examples not text": (lambda f: with_card(f, examples=[1, 2, 3, 4, 5]), 422, "examples"),
    "card not json": (lambda f: {**f, "card.json": b"{nope"}, 422, "card.json is not valid JSON"),
    "config not json": (lambda f: {**f, "adapter_config.json": b"\xff"}, 422, "adapter_config.json is not valid"),
    "config not object": (lambda f: {**f, "adapter_config.json": b"[]"}, 422, "JSON object"),
    "other base model": (
        lambda f: with_config(f, base_model_name_or_path="meta-llama/Llama-2-7b-hf"),
        422,
        "trained on",
    ),
    "alpha not a number": (lambda f: with_config(f, lora_alpha="8"), 422, "lora_alpha"),
    "dora": (lambda f: with_config(f, use_dora=True), 422, "DoRA"),
    "weights not safetensors": (lambda f: {**f, "adapter_model.safetensors": b"\x80\x04junk"}, 422, "cannot be read"),
    "wrong shape": (
        lambda f: with_tensors(f, lambda t: _first(t, lambda x: torch.zeros(x.shape[0], 7))),
        422,
        "the base model needs",
    ),
    "unknown target": (
        lambda f: with_tensors(
            f, lambda t: t.update({"base_model.model.model.layers.0.mlp.fc9.lora_A.weight": torch.zeros(4, 64)})
        ),
        422,
        "unknown target",
    ),
    "layer past the base": (
        lambda f: with_tensors(
            f,
            lambda t: t.update(
                {
                    "base_model.model.model.layers.9.mlp.up_proj.lora_A.weight": torch.zeros(4, 64),
                    "base_model.model.model.layers.9.mlp.up_proj.lora_B.weight": torch.zeros(128, 4),
                }
            ),
        ),
        422,
        "layer 9",
    ),
    "rank over max": (lambda f: with_tensors(f, lambda t: _pad_rank(t, 16)), 422, "over the limit 8"),
    "non-finite": (lambda f: with_tensors(f, lambda t: _first(t, _nan)), 422, "non-finite"),
    "too large": (lambda f: {**f, "README.md": bytes(500_000)}, 413, "limit is 400000"),
    "zip slip": (lambda f: {"a.zip": zip_bytes({**f, "../../x/card.json": b"{}"})}, 400, "outside"),
    "absolute path": (lambda f: {"a.tar.gz": tar_bytes({"/etc/card.json": b"{}"})}, 400, "outside"),
    "link": (lambda f: {"a.tar.gz": tar_bytes(f, link=("card.json", tarfile.SYMTYPE))}, 400, "link"),
    "zip bomb": (lambda f: {"a.zip": zip_bytes({**f, "README.md": bytes(5 << 20)})}, 413, "unpacks to more"),
    "broken archive": (lambda f: {"a.zip": b"PK\x03\x04garbage"}, 400, "not a readable archive"),
}


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
def test_bad_uploads_are_refused_before_anything_is_written(client, files, tmp_path, case):
    change, status, words = BAD_UPLOADS[case]
    r = upload(client, change(files))
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert words in error["message"] and error["type"] == "invalid_request_error", error
    store = tmp_path / "store"
    assert not store.exists() or not adapter_dirs(store) and not any((store / ".staging").glob("*"))


def test_malformed_requests_are_400(client):
    for kwargs in (
        {"json": {"name": "x"}},
        {"content": b"--x\r\n", "headers": {"content-type": "multipart/form-data"}},
        {"content": b"junk", "headers": {"content-type": "multipart/form-data; boundary=zz"}},
        {"files": {"f": ("x.txt", b"")}, "params": {"replace": "maybe"}},
    ):
        headers = {**AUTH, **kwargs.pop("headers", {})}
        r = client.post("/admin/adapters", headers=headers, **kwargs)
        assert r.status_code == 400 and r.json()["error"]["message"], (kwargs, r.text)


def test_racing_uploads_of_one_name_one_wins(hf, tokenizer, files, tmp_path):
    with admin_client(hf, tokenizer, tmp_path / "store", max_concurrent_uploads=4) as client:
        with ThreadPoolExecutor(4) as pool:
            statuses = sorted(
                pool.map(lambda i: upload(client, with_card(files, description=str(i))).status_code, range(4))
            )
        assert statuses == [201, 409, 409, 409]
        assert client.get("/admin/adapters", headers=AUTH).json()["total"] == 1


def test_delete_lets_running_requests_finish(client, files):
    assert upload(client, files).status_code == 201
    body = {"model": "alpha", "prompt": "hi", "max_tokens": 60, "ignore_eos": True, "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")  # running on alpha now
        assert client.delete("/admin/adapters/alpha", headers=AUTH).status_code == 200
        assert chat(client, "alpha").status_code == 404  # new requests can't select it any more
        events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert events[-1]["choices"][0]["finish_reason"] == "length"


def test_openapi_schema_lists_the_admin_routes(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert {"post", "get"} <= set(paths["/admin/adapters"]) and {"get", "patch", "delete"} <= set(
        paths["/admin/adapters/{name}"]
    )


def test_a_request_waiting_on_a_deleted_adapter_ends_and_the_engine_goes_on(hf, tokenizer, files, tmp_path):
    from mole_serve.engine.request import SamplingParams
    from mole_serve.routing.types import AdapterRef

    folder = AdapterStore(tmp_path)
    folder.commit("alpha", files).finish()
    engine = engine_for(hf, tokenizer, max_num_seqs=1)  # a batch of one: the second request waits
    add_adapter(engine, "alpha", tmp_path / "alpha")
    running = engine.add_request([5, 6, 7], SamplingParams(max_tokens=8, ignore_eos=True))
    engine.step()
    waiting = engine.add_request([5, 6, 7], SamplingParams(max_tokens=2), [AdapterRef("alpha", 1.0)])
    engine.step()
    remove_adapter(engine, "alpha")  # what DELETE /admin/adapters/alpha does between two steps
    for _ in range(20):
        engine.step()
    assert running.is_finished and waiting.is_finished and not engine.has_unfinished()


def test_an_upload_the_engine_cannot_take_is_rolled_back(client, files, tmp_path, monkeypatch):
    """The catalog's transaction: a failure after the store commit puts back the previous version
    (replace) or nothing (new name), on disk and in the engine."""
    assert upload(client, files).status_code == 201
    engine = client.app.state.engine.engine
    v1 = (tmp_path / "store" / "alpha" / "card.json").read_bytes()
    real_add = engine.add_adapter

    # alpha's upload fails, its rollback (the previous version again) goes through, gamma's upload fails
    outcomes = iter([OSError("disk went away"), None, OSError("disk went away")])

    def add_failing_once(name, weights):
        if (error := next(outcomes)) is not None:
            raise error
        return real_add(name, weights)

    monkeypatch.setattr(engine, "add_adapter", add_failing_once)
    r = upload(client, with_card(files, description="v2"), replace=True)
    assert r.status_code == 422 and "could not be loaded" in r.json()["error"]["message"]
    assert (tmp_path / "store" / "alpha" / "card.json").read_bytes() == v1
    assert chat(client, "alpha").status_code == 200
    r = upload(client, files, name="gamma")
    assert r.status_code == 422 and "gamma" not in adapter_dirs(tmp_path / "store")
    assert chat(client, "gamma").status_code == 404 and not client.app.state.engine.has_adapter("gamma")
