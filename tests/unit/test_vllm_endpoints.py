"""vLLM's own routes on a tiny random model: /v1/load_lora_adapter and /v1/unload_lora_adapter (an
adapter loaded by path is served by name, retrieved by `auto`, listed, unloaded; paths outside
MOLE_LORA_LOAD_ROOTS, symlinks out of them and folders that are no adapter refused; the admin token)
and /tokenize, /detokenize (the tokenizer's own ids, the chat template's)."""

from __future__ import annotations

import json
import shutil

import pytest
from mole_serve.api.protocol import ChatCompletionRequest
from mole_serve.api.structured import template_messages
from mole_serve.library.store import adapter_dirs

from tests.unit.helpers import make_adapter, tiny_hf_model
from tests.unit.test_admin_api import AUTH, admin_client, examples

LOAD, UNLOAD = "/v1/load_lora_adapter", "/v1/unload_lora_adapter"
QUERY = "please convert roman numerals item 3"  # close to alpha's card examples


@pytest.fixture(scope="module")
def hf():
    return tiny_hf_model()


def adapter_folder(hf, folder, seed: int, card: dict | None = None):
    make_adapter(hf, folder, seed=seed)
    if card is not None:
        (folder / "card.json").write_text(json.dumps(card))
    return folder


@pytest.fixture
def roots(hf, tmp_path):
    """roots/alpha: an adapter with a card; outside/beta: one outside the roots."""
    card = {"name": "ignored", "description": "roman numerals", "examples": examples("convert roman numerals")}
    adapter_folder(hf, tmp_path / "roots" / "alpha", seed=1, card=card)
    adapter_folder(hf, tmp_path / "outside" / "beta", seed=2, card=card)
    return tmp_path / "roots"


@pytest.fixture
def client(hf, tokenizer, tmp_path, roots):
    with admin_client(hf, tokenizer, tmp_path / "store", lora_load_roots=[roots]) as c:
        yield c


def chat(client, model: str, prompt: str = "hi"):
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 2}
    return client.post("/v1/chat/completions", json=body)


def test_a_loaded_adapter_is_served_retrieved_listed_and_unloaded(hf, client, roots, tmp_path):
    r = client.post(LOAD, headers=AUTH, json={"lora_name": "alpha", "lora_path": str(roots / "alpha")})
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'alpha' added successfully."
    assert r.headers["content-type"].startswith("text/plain")
    # copied into the store as an upload: the same tensors and config, the card named after lora_name
    stored = tmp_path / "store" / "alpha"
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (stored / name).read_bytes() == (roots / "alpha" / name).read_bytes()
    assert json.loads((stored / "card.json").read_text())["name"] == "alpha"

    r = chat(client, "alpha")
    assert r.status_code == 200 and r.json()["adapters"][0]["name"] == "alpha"
    found = chat(client, "auto", QUERY).json()["adapters"]
    assert found and found[0]["name"] == "alpha" and found[0]["score"] > 0.8
    assert "alpha" in [m["id"] for m in client.get("/v1/models").json()["data"]]

    same = {"lora_name": "alpha", "lora_path": str(roots / "alpha")}
    assert client.post(LOAD, headers=AUTH, json=same).status_code == 200  # the same files: loaded already
    other = {"lora_name": "alpha", "lora_path": str(roots / "other")}
    adapter_folder(hf, roots / "other", seed=3, card=json.loads((stored / "card.json").read_text()))
    r = client.post(LOAD, headers=AUTH, json=other)
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_name", r.text
    assert "has already been loaded" in r.json()["error"]["message"]
    assert client.post(LOAD, headers=AUTH, json={**other, "load_inplace": True}).status_code == 200
    weights = "adapter_model.safetensors"
    assert (stored / weights).read_bytes() == (roots / "other" / weights).read_bytes()

    r = client.post(UNLOAD, headers=AUTH, json={"lora_name": "alpha"})
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'alpha' removed successfully."
    assert chat(client, "alpha").status_code == 404
    assert "alpha" not in [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert not adapter_dirs(tmp_path / "store") and (roots / "alpha" / "card.json").is_file()  # the source stays
    r = client.post(UNLOAD, headers=AUTH, json={"lora_name": "alpha"})
    assert r.status_code == 404 and r.json()["error"]["message"] == "The lora adapter 'alpha' cannot be found."
    assert r.json()["error"]["param"] == "lora_name"


def test_a_folder_without_a_card_is_served_by_name_and_never_retrieved(hf, client, roots, tmp_path):
    """A PEFT adapter as trained (no card.json): its card says `auto: false`."""
    (roots / "alpha" / "card.json").unlink()
    r = client.post(LOAD, headers=AUTH, json={"lora_name": "bare", "lora_path": str(roots / "alpha")})
    assert r.status_code == 200, r.text
    assert json.loads((tmp_path / "store" / "bare" / "card.json").read_text()) == {"auto": False, "name": "bare"}
    assert chat(client, "bare").json()["adapters"][0]["name"] == "bare"
    assert chat(client, "auto", QUERY).json()["adapters"] == []


def refusal(client, path: str, status: int, code: str | None = None, **body):
    r = client.post(LOAD, headers=AUTH, json={"lora_name": "gamma", "lora_path": path, **body})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert code is None or error["code"] == code, error
    return error


def test_paths_outside_the_roots_and_folders_that_are_no_adapter_are_refused(hf, client, roots, tmp_path):
    outside = tmp_path / "outside" / "beta"
    for path in (outside, roots / ".." / "outside" / "beta", "/etc", "relative/elsewhere"):
        error = refusal(client, str(path), 403, "lora_path_not_allowed")
        assert error["param"] == "lora_path" and "MOLE_LORA_LOAD_ROOTS" in error["message"]
    (roots / "link").symlink_to(outside, target_is_directory=True)  # a link in a root out of it
    refusal(client, str(roots / "link"), 403, "lora_path_not_allowed")
    linked = roots / "linked-card"  # a folder in a root whose card is a link out of it
    shutil.copytree(roots / "alpha", linked)
    (linked / "card.json").unlink()
    (linked / "card.json").symlink_to(outside / "card.json")
    refusal(client, str(linked), 403, "lora_path_not_allowed")

    assert refusal(client, str(roots / "nowhere"), 404)["param"] == "lora_path"
    (roots / "file").write_text("x")
    assert "not an adapter folder" in refusal(client, str(roots / "file"), 400, "invalid_upload")["message"]
    pickled = roots / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text("{}")
    (pickled / "adapter_model.bin").write_bytes(b"x")
    assert "mole-serve convert" in refusal(client, str(pickled), 400)["message"]
    assert refusal(client, str(roots / "alpha"), 400, lora_name="Bad Name")["param"] == "lora_name"
    assert refusal(client, "", 400)["param"] == "lora_path"
    assert "reserved" in refusal(client, str(roots / "alpha"), 400, lora_name="auto")["message"]
    assert not adapter_dirs(tmp_path / "store")


def test_without_roots_both_routes_answer_403(hf, tokenizer, tmp_path, roots):
    with admin_client(hf, tokenizer, tmp_path / "store") as c:
        for path, body in ((LOAD, {"lora_name": "alpha", "lora_path": str(roots / "alpha")}), (UNLOAD, {})):
            r = c.post(path, headers=AUTH, json=body)  # (an invalid body too: refused before it is read)
            assert r.status_code == 403, r.text
            error = r.json()["error"]
            assert error["code"] == "lora_loading_disabled" and "MOLE_LORA_LOAD_ROOTS" in error["message"]


def test_the_admin_token_when_one_is_set_else_the_api_key(hf, tokenizer, tmp_path, roots):
    body = {"lora_name": "alpha", "lora_path": str(roots / "alpha")}
    key = {"Authorization": "Bearer key"}
    with admin_client(hf, tokenizer, tmp_path / "s1", lora_load_roots=[roots], api_key="key") as c:
        for headers in ({}, key, {"Authorization": "Bearer wrong"}):
            for path in (LOAD, UNLOAD):
                r = c.post(path, headers=headers, json=body)
                assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_admin_token", headers
        assert c.post(LOAD, headers=AUTH, json=body).status_code == 200
    with admin_client(hf, tokenizer, tmp_path / "s2", lora_load_roots=[roots], api_key="key", admin_token=None) as c:
        r = c.post(LOAD, json=body)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert c.post(LOAD, headers=key, json=body).status_code == 200
        assert c.post(UNLOAD, headers=key, json={"lora_name": "alpha"}).status_code == 200


@pytest.fixture(scope="module")
def tok_client(hf, tokenizer, tmp_path_factory):
    settings = dict(api_key="key", max_request_mb=0.01)
    with admin_client(hf, tokenizer, tmp_path_factory.mktemp("store"), **settings) as c:
        c.headers["Authorization"] = "Bearer key"
        yield c


MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is XIV?"},
    {"role": "assistant", "content": "It is"},
]


def tokenize(client, **body):
    r = client.post("/tokenize", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_tokenize_and_detokenize_round_trip_as_the_tokenizer(tok_client, tokenizer):
    text = "Convert 1994 to Roman numerals: MCMXCIV."
    body = tokenize(tok_client, prompt=text, model="auto")
    ids = tokenizer(text)["input_ids"]
    assert body == {"count": len(ids), "max_model_len": 128, "tokens": ids, "token_strs": None}
    body = tokenize(tok_client, prompt=text, add_special_tokens=False, return_token_strs=True)
    assert body["tokens"] == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert body["token_strs"] == tokenizer.convert_ids_to_tokens(body["tokens"])
    r = tok_client.post("/detokenize", json={"tokens": body["tokens"]})
    assert r.status_code == 200 and r.json() == {"prompt": text}


def test_tokenize_messages_through_the_chat_template(tok_client, tokenizer):
    def template(messages, **kwargs):
        return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)["input_ids"]

    chat = MESSAGES[:2]
    assert tokenize(tok_client, messages=chat)["tokens"] == template(chat, add_generation_prompt=True)
    assert tokenize(tok_client, messages=chat, add_generation_prompt=False)["tokens"] == template(chat)
    continued = tokenize(tok_client, messages=MESSAGES, continue_final_message=True)["tokens"]
    assert continued == template(MESSAGES, continue_final_message=True)
    assert tokenizer.decode(continued).endswith("It is")
    special = tokenize(tok_client, messages=chat, add_special_tokens=True)["tokens"]
    assert (
        special
        == tokenizer(tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True))["input_ids"]
    )
    # tools as the chat route gives them to this template (told in the system turn)
    tools = [{"type": "function", "function": {"name": "roman", "parameters": {"type": "object"}}}]
    request = ChatCompletionRequest(messages=chat, tools=tools)
    messages, told = template_messages(request, tokenizer.chat_template)
    expected = template(messages, tools=told, add_generation_prompt=True)
    assert tokenize(tok_client, messages=chat, tools=tools)["tokens"] == expected and "roman" in tokenizer.decode(
        expected
    )


@pytest.mark.parametrize(
    "path, body, status, param",
    [
        ("/tokenize", {}, 400, "prompt"),
        ("/tokenize", {"prompt": "hi", "messages": MESSAGES}, 400, "messages"),
        (
            "/tokenize",
            {"messages": MESSAGES, "continue_final_message": True, "add_generation_prompt": True},
            400,
            "continue_final_message",
        ),
        ("/tokenize", {"messages": []}, 400, "messages"),
        ("/tokenize", {"prompt": "a\ud800b"}, 400, None),
        ("/tokenize", {"prompt": "hi", "model": "nope"}, 404, "model"),
        ("/tokenize", {"prompt": "x" * 20_000}, 413, None),
        ("/detokenize", {"tokens": [1, 49152]}, 400, "tokens"),
        ("/detokenize", {"tokens": [-1]}, 400, "tokens.0"),
        ("/detokenize", {"tokens": ["1"]}, 400, "tokens.0"),
        ("/detokenize", {"tokens": [1], "model": "nope"}, 404, "model"),
    ],
)
def test_tokenizer_refusals(tok_client, path, body, status, param):
    content = json.dumps(body)  # (escaped: a lone surrogate goes as JSON may carry it, \\ud800)
    r = tok_client.post(path, content=content, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param


def test_tokenizer_routes_need_the_api_key_and_a_content_length(tok_client):
    r = tok_client.post("/tokenize", json={"prompt": "hi"}, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = tok_client.post("/detokenize", content=iter([b'{"tokens": [1]}']), headers={"content-type": "application/json"})
    assert r.status_code == 411 and r.json()["error"]["code"] == "length_required"


def test_openapi_documents_their_errors(tok_client):
    paths = tok_client.get("/openapi.json").json()["paths"]
    for path, statuses in (
        (LOAD, {"200", "400", "401", "403", "404", "413", "422", "429", "507"}),
        (UNLOAD, {"200", "403", "404"}),
        ("/tokenize", {"200", "400", "401", "404", "411", "413"}),
        ("/detokenize", {"200", "400", "404"}),
    ):
        responses = paths[path]["post"]["responses"]
        assert statuses <= set(responses), (path, sorted(responses))
        assert ("422" in responses) == (path in (LOAD, UNLOAD))  # an adapter's files; FastAPI's own 422 goes
    assert "text/plain" in paths[LOAD]["post"]["responses"]["200"]["content"]
