"""The catalog: the one owner of "adapter X exists" (as SGLang's LoRARegistry is).

An adapter exists when its name is registered here: a folder (in the store, or any folder given
by the Python API) whose files parsed into weights of a known kind. The catalog keeps the
retrieval key in step with the registry, and runs the admin API's changes as transactions over
the store, the registry and the serving side (an engine's pool; later every replica), undoing
what was done when a later part fails.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import weakref
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from safetensors.torch import load, load_file

from mole_serve.errors import AdapterNotFound, MoleError
from mole_serve.input_forms import PLAIN
from mole_serve.library.store import (
    CONFIG_FILE,
    PICKLED_WEIGHTS,
    WEIGHTS_FILE,
    AdapterStore,
    Commit,
    adapter_dirs,
    describe,
    read_card,
)
from mole_serve.library.upload import (
    InvalidAdapterError,
    UploadedFiles,
    check_card,
    check_files,
    check_weights_header,
    single_threaded,
)
from mole_serve.lora.kinds import RUNS_ALONE, kind_for
from mole_serve.lora.kinds.base import AdapterFormatError, AdapterWeights, LoRATargetSpec
from mole_serve.lora.pool import LoRAPool

if TYPE_CHECKING:
    from mole_serve.routing.retriever import Retriever

NEAREST_K = 3
log = logging.getLogger(__name__)


class Serving(Protocol):
    """What the catalog needs of the side that serves adapters (engine/client.py implements it):
    each call runs between two engine steps, after the catalog registered the change."""

    def add_adapter(self, name: str, weights: AdapterWeights) -> Awaitable[float]: ...  # seconds the loop was held

    def remove_adapter(self, name: str) -> Awaitable[None]: ...


@dataclass
class CheckedAdapter(UploadedFiles):
    weights: AdapterWeights
    key: np.ndarray | None = None  # its card's retrieval key [dim]; None without retrieval


@dataclass
class Uploaded:
    name: str
    card: dict
    replaced: bool
    load_s: float  # how long the engine's step loop was held to take it in
    nearest: list[dict]  # the adapters with the closest retrieval keys (possible duplicates)
    info: dict  # size, rank, targets of the stored files (store.describe)


def parse_adapter(name: str, config: object, tensors: dict, spec: LoRATargetSpec, max_rank: int) -> AdapterWeights:
    """Config + tensors -> weights through the adapter's kind; every failure names the adapter."""
    if not isinstance(config, dict):
        raise AdapterFormatError(f"adapter {name!r}: adapter_config.json must be a JSON object")
    try:
        return kind_for(name, config).parse(name, config, tensors, spec, max_rank)
    except AdapterFormatError:
        raise
    # odd config values meeting the tensor math (ArithmeticError: an integer lora_alpha too large for a float)
    except (TypeError, ValueError, KeyError, RuntimeError, ArithmeticError) as e:
        raise AdapterFormatError(f"adapter {name!r} does not fit the base model: {e}") from e


def retrievable(card: dict, weights: AdapterWeights) -> bool:
    """Whether `auto` may retrieve the adapter: the card's `auto` field; by default every kind but
    the mixtures of LoRA experts (they run alone, so a request would get only them)."""
    return bool(card.get("auto", weights.kind not in RUNS_ALONE))


def read_tensors(folder: Path, name: str) -> dict:
    """adapter_model.safetensors, else the authors' adapter_model.bin (MoE-PEFT, the MELoRA fork)
    through torch.load(weights_only=True): tensors only, never arbitrary pickled objects. Only
    folders on this machine get here; uploads are safetensors only."""
    folder = Path(folder)
    try:
        if (folder / WEIGHTS_FILE).is_file():
            return load_file(folder / WEIGHTS_FILE)
        if (folder / PICKLED_WEIGHTS).is_file():
            tensors = torch.load(folder / PICKLED_WEIGHTS, map_location="cpu", weights_only=True)
            if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
                raise ValueError("it does not hold a flat dict of tensors")
            return tensors
    except Exception as e:  # safetensors and torch raise their own error types for corrupt files
        raise AdapterFormatError(f"adapter {name!r}: cannot read its weights: {e}") from e
    raise AdapterFormatError(f"adapter {name!r}: {folder} has neither {WEIGHTS_FILE} nor {PICKLED_WEIGHTS}")


def read_adapter(folder: Path, spec: LoRATargetSpec, max_rank: int, name: str) -> AdapterWeights:
    """An adapter folder from disk, parsed by its kind."""
    config_path = Path(folder) / CONFIG_FILE
    if not config_path.is_file():
        raise AdapterFormatError(f"adapter {name!r}: {config_path} is missing")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise AdapterFormatError(f"adapter {name!r}: {CONFIG_FILE} is not valid JSON: {e}") from e
    return parse_adapter(name, config, read_tensors(folder, name), spec, max_rank)


def stored_card(folder: Path, name: str) -> dict:
    """card.json of a stored adapter ({} when it has none), as far as serving reads it: an object,
    its `examples` (the retrieval key) a list of texts."""
    try:
        card = read_card(folder)
    except ValueError as e:
        raise AdapterFormatError(f"adapter {name!r}: card.json is not valid JSON: {e}") from e
    if not isinstance(card, dict):
        raise AdapterFormatError(f"adapter {name!r}: card.json must be a JSON object")
    examples = card.get("examples")
    if examples is not None and not (isinstance(examples, list) and all(isinstance(x, str) for x in examples)):
        raise AdapterFormatError(f"adapter {name!r}: the card's `examples` must be a list of texts")
    return card


def convert_to_safetensors(folder: Path) -> Path:
    """Write the safetensors twin of a folder's adapter_model.bin beside it (`mole-serve convert`)."""
    from safetensors.torch import save_file

    tensors = read_tensors(folder, Path(folder).name)
    out = Path(folder) / WEIGHTS_FILE
    save_file({k: t.contiguous() for k, t in tensors.items()}, out)
    return out


class Catalog:
    def __init__(
        self,
        store: AdapterStore,
        spec: LoRATargetSpec,
        max_rank: int,
        max_loras: int,
        base_names: set[str],
        min_examples: int = 5,
        retriever: Retriever | None = None,
    ) -> None:
        self.store, self.spec, self.max_rank = store, spec, max_rank
        self.max_loras = max_loras  # the engine's adapter slots: an upload needing more is refused
        self.base_names = base_names  # lower-case ids an adapter's base_model_name_or_path may give
        self.min_examples = min_examples
        self.retriever = retriever  # None: no retrieval keys, `auto` is the base model
        # why the store's trained gate is not served (trained for another base model; /v1/models says it)
        self.gate_refused: str | None = None
        self._folders: dict[str, Path] = {}
        self._forms: dict[str, str] = {}  # adapter -> the input form its card declares, when not plain
        self._failed: dict[str, str] = {}  # stored adapters that did not validate at start-up -> why
        self._lock = threading.Lock()  # the HTTP thread reads while the step thread registers
        # One admin change per name at a time (two racing uploads: one 201, one 409); a lock lives
        # while some change holds or awaits it.
        self._changing: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    # --- the registry ---
    def __contains__(self, name: object) -> bool:
        return name in self._folders

    @property
    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._folders)

    @property
    def failed(self) -> dict[str, str]:
        """Adapters of the store that add_store could not serve, name -> why (GET /admin/adapters,
        mole_adapters_failed). A name leaves when a good version is registered or it is removed."""
        with self._lock:
            return dict(self._failed)

    def folder(self, name: str) -> Path:
        folder = self._folders.get(name)
        if folder is None:
            raise AdapterNotFound(f"unknown adapter {name!r}", "adapters")
        return folder

    def input_form(self, name: str) -> str:
        """The input form the adapter's card declares (input_forms.py); plain by default."""
        return self._forms.get(name, PLAIN)

    def input_forms(self) -> set[str]:
        """The forms other than plain that some adapter `auto` may retrieve reads (none without retrieval)."""
        retriever = self.retriever
        if retriever is None:
            return set()
        with self._lock:
            forms = dict(self._forms)
        return {form for name, form in forms.items() if name in retriever}

    def _note_input(self, name: str, card: dict) -> None:
        form = card.get("input", PLAIN)
        with self._lock:
            if form == PLAIN:
                self._forms.pop(name, None)
            else:
                self._forms[name] = form

    def load(self, name: str) -> AdapterWeights:
        """The weights of a registered adapter, read from its folder (the pool's loader)."""
        return read_adapter(self.folder(name), self.spec, self.max_rank, name)

    def add(
        self, name: str, folder: Path, weights: AdapterWeights | None = None, key: np.ndarray | None = None
    ) -> AdapterWeights:
        """Validate an adapter folder now (errors surface here, not mid-step) and register it, with
        its card's retrieval key. An upload passes the weights and key it computed off the step
        thread from the same files."""
        weights = weights or read_adapter(folder, self.spec, self.max_rank, name)
        card = read_card(folder)
        with self._lock:
            self._folders[name] = Path(folder)
            self._failed.pop(name, None)
        self._note_input(name, card)
        if self.retriever is not None:
            if not retrievable(card, weights):
                self.retriever.remove(name)
            elif key is not None:
                self.retriever.set_key(name, key)
            elif examples := card.get("examples"):
                self.retriever.set_card(name, examples)
        return weights

    def remove(self, name: str) -> None:
        """New requests stop finding it at once (by name and by retrieval)."""
        if self.retriever is not None:
            self.retriever.remove(name)
        with self._lock:
            self._folders.pop(name, None)
            self._forms.pop(name, None)
            self._failed.pop(name, None)

    def add_store(self) -> list[AdapterWeights]:
        """Register every adapter of the store that validates, their cards embedded in one batch.
        A folder that does not (truncated weights, a bad config or card, numerics out of bounds) is
        logged and kept in `failed` with the reason: one bad folder must not stop the others from
        serving. Raises only when the store folder itself cannot be read."""
        root = self.store.root
        if root.exists() and not root.is_dir():
            raise NotADirectoryError(f"the adapter store {root} is not a folder (MOLE_ADAPTERS_DIR)")
        folders = adapter_dirs(root)
        weights: list[AdapterWeights] = []
        cards: dict[str, dict] = {}
        failed: dict[str, str] = {}
        for name, path in folders.items():
            try:
                w = read_adapter(path, self.spec, self.max_rank, name)
                cards[name] = stored_card(path, name)
            except Exception as e:  # whatever a folder holds, the server starts with the others
                log.warning("adapter %r (%s) is not served: %s", name, path, e)
                failed[name] = str(e)
                continue
            weights.append(w)
        with self._lock:
            self._folders.update({w.name: folders[w.name] for w in weights})
            self._failed.update(failed)
        for name, card in cards.items():
            self._note_input(name, card)
        if self.retriever is not None:
            self.retriever.set_cards(
                {
                    w.name: cards[w.name]["examples"]
                    for w in weights
                    if cards[w.name].get("examples") and retrievable(cards[w.name], w)
                }
            )
        return weights

    def nearest(self, name: str) -> list[dict]:
        """The adapters whose retrieval keys are closest to `name`'s; [] without retrieval."""
        if self.retriever is None or name not in self.retriever:
            return []
        return [{"name": n, "score": round(s, 4)} for n, s in self.retriever.nearest(name, NEAREST_K)]

    # --- uploads (the admin API) ---
    def check(self, files: dict[str, bytes], name: str | None) -> CheckedAdapter:
        """An upload's files checked in memory, tensors included, and its retrieval key computed;
        nothing is written. Runs off the step thread (it embeds)."""
        uploaded = check_files(files, name, self.base_names, self.min_examples)
        check_weights_header(files[WEIGHTS_FILE], self.max_tensors)
        try:
            tensors = load(files[WEIGHTS_FILE])
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise InvalidAdapterError(f"{WEIGHTS_FILE} cannot be read: {e}") from e
        weights = parse_adapter(uploaded.name, uploaded.config, tensors, self.spec, self.max_rank)
        slots = LoRAPool.footprint(weights)
        if slots > self.max_loras:
            raise InvalidAdapterError(
                f"the adapter `{uploaded.name}` takes {slots} adapter slots (its own and one per expert); this "
                f"server has {self.max_loras} (MOLE_MAX_LORAS), so no request could run it"
            )
        examples = uploaded.card.get("examples")  # (none: an adapter served by name only)
        key = self.retriever.card_key(examples) if self.retriever is not None and examples else None
        return CheckedAdapter(**vars(uploaded), weights=weights, key=key)

    @property
    def max_tensors(self) -> int:
        """The most tensors an adapter this server can run holds: per adapted module of each layer, a
        shared pair, a router and a pair per expert (at most max_loras - 1 experts), or a MELoRA's
        pair per mini LoRA (at most max_rank of them)."""
        per_module = max(3 + 2 * (self.max_loras - 1), 2 * self.max_rank)
        return self.spec.num_layers * len(self.spec.shapes) * per_module

    async def upload(self, checked: CheckedAdapter, replace: bool, serving: Serving) -> Uploaded:
        """Commit to the store, then serve it; if serving fails, the store and the engine go back
        to the previous version (or to none). The same files again (a client retrying an upload
        whose answer it lost) are answered as that upload, not refused as a duplicate."""
        name = checked.name
        async with self._change(name):
            if not replace and name in self and await asyncio.to_thread(self.store.holds, name, checked.files):
                info = await asyncio.to_thread(describe, self.store.path(name))
                return Uploaded(name, checked.card, False, 0.0, self.nearest(name), info)
            commit: Commit = await asyncio.to_thread(self.store.commit, name, checked.files, replace)
            folder = self.store.path(name)
            try:  # everything up to the answer: whatever fails (or a cancelled request) undoes the commit
                await asyncio.to_thread(self.add, name, folder, checked.weights, checked.key)
                load_s = await serving.add_adapter(name, checked.weights)
                info = await asyncio.to_thread(describe, folder)
                nearest = self.nearest(name)
            except BaseException as e:
                await asyncio.to_thread(commit.rollback)
                await self._restore(name, commit.previous is not None, serving)
                if isinstance(e, MoleError) or not isinstance(e, Exception):
                    raise  # a refusal of its own kind (its own status), or a cancellation
                raise InvalidAdapterError(f"the adapter `{name}` could not be loaded: {e}") from e  # an I/O failure
            await asyncio.to_thread(commit.finish)
        return Uploaded(name, checked.card, commit.previous is not None, load_s, nearest, info)

    async def _restore(self, name: str, had_previous: bool, serving: Serving) -> None:
        """After a failed upload: the previous version registered and served again, or none."""
        if had_previous:
            weights = await asyncio.to_thread(self.add, name, self.store.path(name))
            await serving.add_adapter(name, weights)
        else:
            self.remove(name)
            await serving.remove_adapter(name)

    async def delete(self, name: str, serving: Serving) -> None:
        """Unregistered first: new requests stop selecting it at once, running ones keep their slot."""
        async with self._change(name):
            self.store.existing(name)
            self.remove(name)
            await serving.remove_adapter(name)
            await asyncio.to_thread(self.store.delete, name)

    async def update_card(self, name: str, changes: dict) -> tuple[dict, list[dict]]:
        """Replace card fields; new examples re-key retrieval. -> (the card, its nearest adapters)."""
        async with self._change(name):
            stored = await asyncio.to_thread(read_card, self.store.existing(name))
            card = check_card({**stored, **changes}, name, self.min_examples)
            key = None
            if self.retriever is not None and "examples" in changes and name in self.retriever:
                # the new key before the write: a failure of either leaves the card and the key as they were
                key = await asyncio.to_thread(single_threaded, self.retriever.card_key, card["examples"])
            await asyncio.to_thread(self.store.write_card, name, card)
            self._note_input(name, card)
            if key is not None and self.retriever is not None:
                self.retriever.set_key(name, key)
        return card, self.nearest(name)

    def _change(self, name: str) -> asyncio.Lock:
        lock = self._changing.get(name)
        if lock is None:
            lock = self._changing[name] = asyncio.Lock()
        return lock
