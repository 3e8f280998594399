"""adapters_store/ on disk: one folder per adapter (PEFT files + card.json), changed atomically.
Every layout name of the store lives here.

Layout under the store root:
    <name>/                 a complete adapter (the only entries adapter_dirs lists)
    gate/                   the trained MoLE router (library/artifacts.py)
    retriever/              the trained retrieval projection (routing/retriever.py)
    .staging/<uuid>/        an upload being written; renamed to <name>/ once fsynced
    .replaced/<name>@<id>/  the previous version during a replace; dropped once the new one serves
    .deleted/<name>@<id>/   on its way out (rmtree); whatever is left here is removed at start-up

Every change is a rename within one filesystem, so a crash leaves each name either absent or a
complete folder; recover() at start-up settles a replace cut in half (old restored if the new one
never arrived) and clears the rest. One writer process per store.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mole_serve.errors import AdapterNotFound, AlreadyExists

NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
CONFIG_FILE, WEIGHTS_FILE, CARD_FILE = "adapter_config.json", "adapter_model.safetensors", "card.json"
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE, CARD_FILE)
PICKLED_WEIGHTS = "adapter_model.bin"  # the authors' format for MixLoRA and MELoRA; read from local folders only
STAGING, REPLACED, DELETED = ".staging", ".replaced", ".deleted"
GATE_DIR, GATE_WEIGHTS, GATE_CONFIG = "gate", "gate.safetensors", "gate_config.json"
PROJECTION_DIR = "retriever"  # the trained retrieval projection (routing/retriever.py names its files)


class AdapterExistsError(AlreadyExists):
    code = "adapter_exists"


def valid_name(name: str) -> bool:
    return NAME_PATTERN.fullmatch(name) is not None


def adapter_dirs(root: Path) -> dict[str, Path]:
    """name -> folder of every adapter in the store (a folder with adapter_config.json)."""
    root = Path(root)
    if not root.is_dir():
        return {}
    return {p.name: p for p in sorted(root.iterdir()) if not p.name.startswith(".") and (p / CONFIG_FILE).is_file()}


def read_card(folder: Path) -> dict:
    """card.json of an adapter folder ({} when it has none)."""
    path = Path(folder) / CARD_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def replace_folder(out: Path, write: Callable[[Path], None]) -> None:
    """`write` fills a temp folder beside `out`, which then takes out's place: a crash mid-write
    leaves the old folder (a trained gate or projection) as it was."""
    out = Path(out)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        write(tmp)
        for path in tmp.iterdir():
            path.chmod(0o644)
        tmp.chmod(0o755)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def describe(folder: Path) -> dict:
    """Size, rank and targets of an adapter folder, from the safetensors header (no tensor read).
    The rank is a module's total over its lora_A blocks: a MELoRA's n mini ranks add up."""
    from safetensors import safe_open

    folder = Path(folder)
    weights = folder / WEIGHTS_FILE
    targets: set[str] = set()
    layers: set[int] = set()
    ranks: dict[str, int] = {}  # module -> its total rank
    with safe_open(weights, framework="pt") as f:
        for key in f.keys():
            parts = key.split(".")
            if "lora_A" in parts:  # ...layers.<i>.<self_attn|mlp>.<module>.lora_A[.default|.<block>].weight
                i = parts.index("lora_A")
                targets.add(parts[i - 1])
                if "layers" in parts:
                    layers.add(int(parts[parts.index("layers") + 1]))
                module = ".".join(parts[:i])
                ranks[module] = ranks.get(module, 0) + f.get_slice(key).get_shape()[0]
    return {
        "size_bytes": sum(p.stat().st_size for p in folder.iterdir() if p.is_file()),
        "rank": max(ranks.values(), default=0),
        "targets": sorted(targets),
        "num_layers": len(layers),
    }


@dataclass
class Commit:
    """A new version in place; the replaced one (if any) kept until finish() or rollback()."""

    store: AdapterStore
    name: str
    previous: Path | None

    def finish(self) -> None:
        if self.previous is not None:
            self.store._discard(self.previous)

    def rollback(self) -> None:
        """Back to the state before the commit: the new folder goes, the previous one returns."""
        with self.store._lock:
            self.store._discard(self.store.path(self.name))
            if self.previous is not None:
                os.rename(self.previous, self.store.path(self.name))
                fsync_dir(self.store.root)


class AdapterStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._lock = threading.Lock()  # the check-then-rename sequences of one process

    def path(self, name: str) -> Path:
        if not valid_name(name):
            raise ValueError(f"invalid adapter name {name!r}")
        return self.root / name

    def existing(self, name: str) -> Path:
        """The folder of adapter `name`; AdapterNotFound when the store has none."""
        if name not in self:
            raise AdapterNotFound(f"The adapter `{name}` does not exist.", "name")
        return self.path(name)

    def __contains__(self, name: str) -> bool:
        return valid_name(name) and (self.root / name / CONFIG_FILE).is_file()

    def names(self) -> list[str]:
        return list(adapter_dirs(self.root))

    def recover(self) -> None:
        """Settle what a crash left (call at start-up, before listing): a replace cut between its
        two renames gets its old version back; staged and deleted leftovers go."""
        replaced = self.root / REPLACED
        if replaced.is_dir():
            for old in sorted(replaced.iterdir()):
                name = old.name.split("@")[0]
                if name not in self:
                    os.rename(old, self.root / name)
        for sub in (REPLACED, STAGING, DELETED):
            shutil.rmtree(self.root / sub, ignore_errors=True)
        if self.root.is_dir():
            fsync_dir(self.root)

    def commit(self, name: str, files: dict[str, bytes], replace: bool = False) -> Commit:
        """Write `files` (file name -> bytes) as adapter `name`: staged, fsynced, renamed into place.
        An existing name raises AdapterExistsError unless `replace`."""
        target = self.path(name)
        staging = self._stage(files)
        try:
            with self._lock:
                previous = None
                if target.exists():
                    if not replace or name not in self:  # never replace what is not an adapter (gate/)
                        raise AdapterExistsError(f"adapter {name!r} already exists")
                    previous = self._tmp_path(REPLACED, name)
                    os.rename(target, previous)
                try:
                    os.rename(staging, target)  # a non-empty folder there (another process) fails
                except OSError as e:
                    if previous is not None:
                        os.rename(previous, target)
                    raise AdapterExistsError(f"adapter {name!r} already exists") from e
                fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return Commit(self, name, previous)

    def holds(self, name: str, files: dict[str, bytes]) -> bool:
        """Whether adapter `name` is exactly these files (an upload retried after its commit)."""
        folder = self.path(name)
        with self._lock:
            return name in self and all(
                (folder / f).is_file() and (folder / f).read_bytes() == data for f, data in files.items()
            )

    def delete(self, name: str) -> bool:
        """Remove adapter `name` (one rename makes it invisible); False if it did not exist."""
        with self._lock:
            if name not in self:
                return False
            self._discard(self.path(name))
        return True

    def write_card(self, name: str, card: dict) -> None:
        """Replace card.json of an existing adapter atomically (temp file, fsync, rename)."""
        folder = self.path(name)
        with self._lock:
            if name not in self:
                raise FileNotFoundError(f"adapter {name!r} does not exist")
            staging = self.root / STAGING
            staging.mkdir(exist_ok=True)
            tmp = staging / f"card-{uuid.uuid4().hex}.json"  # same filesystem; recover() clears leftovers
            write_file_durably(tmp, json.dumps(card, indent=2).encode() + b"\n")
            os.replace(tmp, folder / CARD_FILE)
            fsync_dir(folder)

    # --- internals ---
    def _tmp_path(self, kind: str, name: str) -> Path:
        parent = self.root / kind
        parent.mkdir(parents=True, exist_ok=True)
        return parent / f"{name}@{uuid.uuid4().hex}"

    def _stage(self, files: dict[str, bytes]) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        staging = self.root / STAGING / uuid.uuid4().hex
        staging.mkdir(parents=True)
        try:
            for file_name, data in files.items():
                if file_name not in ADAPTER_FILES:
                    raise ValueError(f"unexpected adapter file {file_name!r}")
                write_file_durably(staging / file_name, data)
            fsync_dir(staging)
            fsync_dir(staging.parent)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return staging

    def _discard(self, folder: Path) -> None:
        """Rename out of sight (atomic), then remove at leisure; leftovers go at the next recover()."""
        doomed = self._tmp_path(DELETED, folder.name.split("@")[0])
        os.rename(folder, doomed)
        fsync_dir(folder.parent)
        shutil.rmtree(doomed, ignore_errors=True)
