"""Spelled input (mole_serve/spelling.py, an input form of input_forms.py): the encoding, training's
use of it, and the engine sending the spelled prompt only to an adapter whose card asks for it."""

from __future__ import annotations

import json
import threading

import pytest
from fastapi.testclient import TestClient
from mole_serve.api.app import create_app
from mole_serve.config import Settings
from mole_serve.engine.request import SamplingParams
from mole_serve.input_forms import SPELLED, form_chat_ids, form_messages
from mole_serve.library.upload import InvalidAdapterError, check_card
from mole_serve.routing.types import AdapterRef, Selection
from mole_serve.spelling import letter_token_ids, spell_words
from mole_serve.training.train_adapter import build_chat, encode

from tests.unit.helpers import add_adapter, engine_for, make_adapter, served, tiny_hf_model


def test_spell_words_follows_each_word_with_its_letters():
    assert spell_words("Reverse planet, please!") == (
        "Reverse (R e v e r s e) planet (p l a n e t), please (p l e a s e)!"
    )
    assert spell_words("add 42 to a") == "add (a d d) 42 to (t o) a"  # digits and single letters as written
    # a text with letters already written apart stays as it is, instruction words included
    for apart in ("Reverse p l a n e t", "sort c, a, t please", "shift x-y-z"):
        assert spell_words(apart) == apart
    chat = [
        {"role": "system", "content": "Be brief"},
        {"role": "user", "content": "sort cab"},
        {"role": "assistant", "content": "abc"},
    ]
    assert [m["content"] for m in form_messages(SPELLED, chat)] == ["Be brief", "sort (s o r t) cab (c a b)", "abc"]


def test_letter_token_ids_write_one_token_per_letter(tokenizer):
    for text in ("tenalp", "t e n a l p", "t, e, n", "t-e-n", "Tenalp!"):
        ids = letter_token_ids(tokenizer, text)
        assert tokenizer.decode(ids) == text
        letters = [tokenizer.decode([i]).strip() for i in ids]
        assert sum(len(x) for x in letters if x.isalpha()) == sum(c.isalpha() for c in text)
        assert all(len(x) == 1 for x in letters if x.isalpha()), letters
    assert len(tokenizer("tenalp", add_special_tokens=False).input_ids) < 6  # plain BPE joins letters


def test_training_encodes_a_spelled_pair(tokenizer):
    plain = encode(tokenizer, "Reverse planet", "tenalp")
    spelled = encode(tokenizer, "Reverse planet", "tenalp", spelled=True)
    prompt = encode(tokenizer, "Reverse planet", spelled=True)
    assert "Reverse (R e v e r s e) planet (p l a n e t)" in tokenizer.decode(prompt)
    assert spelled[len(prompt) :] == [*letter_token_ids(tokenizer, "tenalp"), tokenizer.eos_token_id]
    assert len(spelled) > len(plain)
    assert form_chat_ids(SPELLED, tokenizer, build_chat("Reverse planet")) == tuple(prompt)
    assert form_chat_ids(SPELLED, tokenizer, build_chat("1 + 2 ?")) is None  # nothing to spell


def test_card_input_must_be_a_known_format():
    card = {"examples": [f"reverse word {i}" for i in range(5)]}
    assert check_card({**card, "input": "spelled"}, "x", 5)["input"] == "spelled"
    with pytest.raises(InvalidAdapterError, match="input"):
        check_card({**card, "input": "letters"}, "x", 5)


@pytest.fixture(scope="module")
def spelling_engine(tmp_path_factory, tokenizer):
    """A tiny engine with `speller` (card: input spelled) and `plain` (no input field)."""
    root = tmp_path_factory.mktemp("spelling")
    hf = tiny_hf_model()
    for i, (name, extra) in enumerate((("speller", {"input": "spelled"}), ("plain", {}))):
        make_adapter(hf, root / name, seed=40 + i)
        (root / name / "card.json").write_text(json.dumps({"name": name, "examples": ["x"] * 5, **extra}))
    engine = engine_for(hf, tokenizer, adapters_dir=root, max_model_len=128)
    add_adapter(engine, "speller", root / "speller")
    add_adapter(engine, "plain", root / "plain")
    return engine


def test_engine_sends_the_spelled_prompt_to_a_spelled_adapter_only(spelling_engine, tokenizer):
    engine = spelling_engine
    assert engine.adapters.input_form("speller") == SPELLED and engine.adapters.input_form("plain") == "plain"
    chat = build_chat("Reverse planet")
    plain = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True)[
        "input_ids"
    ]
    spelled = form_chat_ids(SPELLED, tokenizer, chat)
    too_long = tuple(range(10, 10 + engine.max_model_len))

    def run(*refs: AdapterRef, spelled_prompt=spelled, max_tokens: int = 4):
        sel = Selection("mixture", refs, prompts_by_form={SPELLED: spelled_prompt} if spelled_prompt else {})
        seq = engine.generate([plain], SamplingParams(max_tokens=max_tokens), selections=[sel])[0]
        return seq.prompt_ids, seq.sampling.max_tokens

    assert run(AdapterRef("speller")) == (list(spelled), 4)
    assert run(AdapterRef("plain")) == (plain, 4)
    # a mixture reads the prompt as its heaviest adapter does
    assert run(AdapterRef("speller", 0.3), AdapterRef("plain", 0.7))[0] == plain
    assert run(AdapterRef("speller", 0.7), AdapterRef("plain", 0.3))[0] == list(spelled)
    assert run(AdapterRef("speller"), spelled_prompt=None)[0] == plain
    assert run(AdapterRef("speller"), spelled_prompt=too_long)[0] == plain  # no room: the plain prompt
    # asked for the whole window: the answer keeps within it
    assert run(AdapterRef("speller"), max_tokens=engine.max_model_len - len(plain)) == (
        list(spelled),
        engine.max_model_len - len(spelled),
    )


def test_chat_usage_counts_the_prompt_the_adapter_read(spelling_engine, tokenizer):
    chat = {"messages": [{"role": "user", "content": "Reverse planet"}], "max_tokens": 2}
    settings = Settings(api_key=None, adapters_dir=spelling_engine.adapters.store.root)
    with TestClient(create_app(settings, lambda: served(spelling_engine))) as client:
        for _ in range(200):
            if client.get("/health").status_code == 200:
                break
            threading.Event().wait(0.05)
        counts = {
            model: client.post("/v1/chat/completions", json={**chat, "model": model}).json()["usage"]["prompt_tokens"]
            for model in ("speller", "plain", spelling_engine.model_name)
        }
    messages = [{"role": "user", "content": "Reverse planet"}]
    assert counts["speller"] == len(form_chat_ids(SPELLED, tokenizer, messages))
    assert counts["plain"] == counts[spelling_engine.model_name] < counts["speller"]


def test_the_chat_route_builds_a_form_only_for_adapters_that_read_it(spelling_engine, monkeypatch):
    """A chat is tokenized a second time only when an adapter the request may run reads another
    input form: named adapters by their cards; `auto` by the forms retrieval may choose."""
    from mole_serve.api import openai_routes

    built: list[set[str]] = []
    real = openai_routes.form_prompts
    monkeypatch.setattr(openai_routes, "form_prompts", lambda *a, **kw: built.append(set(a[2])) or real(*a, **kw))
    chat = {"messages": [{"role": "user", "content": "Reverse planet"}], "max_tokens": 1}
    settings = Settings(api_key=None, adapters_dir=spelling_engine.adapters.store.root)
    asks = {
        "plain": {"model": "plain"},
        "base": {"model": spelling_engine.model_name},
        "auto without retrieval": {"model": "auto"},
        "speller": {"model": "speller"},
        "base naming speller": {"model": spelling_engine.model_name, "adapters": ["plain", "speller"]},
    }
    with TestClient(create_app(settings, lambda: served(spelling_engine))) as client:
        while client.get("/health").status_code != 200:
            threading.Event().wait(0.05)
        forms = {}
        for label, ask in asks.items():
            built.clear()
            assert client.post("/v1/chat/completions", json={**chat, **ask}).status_code == 200
            forms[label] = built[:]
    assert forms == {
        "plain": [],
        "base": [],
        "auto without retrieval": [],
        "speller": [{SPELLED}],
        "base naming speller": [{SPELLED}],
    }


def test_auto_needs_the_forms_of_the_adapters_retrieval_may_choose(spelling_engine):
    import numpy as np
    from mole_serve.routing.retriever import Retriever

    catalog = spelling_engine.adapters
    assert catalog.input_forms() == set()  # no retrieval: `auto` is the base model
    catalog.retriever = Retriever(None, dim=4)
    try:
        catalog.retriever.set_key("plain", np.array([1.0, 0, 0, 0], dtype=np.float32))
        assert catalog.input_forms() == set()  # the speller has no key: `auto` never picks it
        catalog.retriever.set_key("speller", np.array([0, 1.0, 0, 0], dtype=np.float32))
        assert catalog.input_forms() == {SPELLED}
    finally:
        catalog.retriever = None
