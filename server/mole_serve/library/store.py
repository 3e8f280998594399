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

import errno
import json
import math
import os
import re
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from mole_serve.errors import AdapterNotFound, AlreadyExists, InsufficientStorage, InvalidAdapter

NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
CONFIG_FILE, WEIGHTS_FILE, CARD_FILE = "adapter_config.json", "adapter_model.safetensors", "card.json"
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE, CARD_FILE)
PICKLED_WEIGHTS = "adapter_model.bin"  # the authors' format for MixLoRA and MELoRA; read from local folders only
STAGING, REPLACED, DELETED = ".staging", ".replaced", ".deleted"
GATE_DIR, GATE_WEIGHTS, GATE_CONFIG = "gate", "gate.safetensors", "gate_config.json"
PROJECTION_DIR = "retriever"  # the trained retrieval projection (routing/retriever.py names its files)
MAX_JSON_BYTES = 256 << 10  # a card.json or adapter_config.json (what train-adapter writes is a few KB)
MAX_JSON_DEPTH = 16  # their nesting (PEFT's configs nest three deep)
JSON_INT_LIMIT = 1 << 63  # integers a JSON file may give, in absolute value (int64)
OUT_OF_SPACE = (errno.ENOSPC, errno.EDQUOT)


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


def _refuse_constant(constant: str) -> NoReturn:
    raise ValueError(f"{constant} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of a float's range")
    return value


def _bounded_int(text: str) -> int:
    value = int(text)
    if abs(value) >= JSON_INT_LIMIT:
        raise ValueError(f"{text[:20]}... is out of an int64's range")
    return value


def _depth(value: object) -> int:
    """Nesting depth of parsed JSON (a scalar: 0), without recursion, stopping past MAX_JSON_DEPTH."""
    deepest, stack = 0, [(value, 1)]
    while stack and deepest <= MAX_JSON_DEPTH:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is not None:
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


def parse_json(data: bytes, what: str) -> object:
    """A card.json or adapter_config.json, strictly: JSON as its standard has it (no NaN or
    Infinity, numbers a float64 or int64 holds; Python's json reads more, and then cannot write
    it back, so every answer showing it would be a 500), at most MAX_JSON_BYTES, nested at most
    MAX_JSON_DEPTH deep (the HTTP layer's encoder recurses). InvalidAdapter naming `what` else."""
    if len(data) > MAX_JSON_BYTES:
        raise InvalidAdapter(f"{what} is {len(data)} bytes; the limit is {MAX_JSON_BYTES}")
    try:
        value = json.loads(data, parse_constant=_refuse_constant, parse_float=_finite_float, parse_int=_bounded_int)
    except RecursionError as e:  # the C parser's own guard, far past MAX_JSON_DEPTH
        raise InvalidAdapter(f"{what} is nested more than {MAX_JSON_DEPTH} deep") from e
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors, as are the hooks' refusals
        raise InvalidAdapter(f"{what} is not valid JSON: {e}") from e
    if _depth(value) > MAX_JSON_DEPTH:
        raise InvalidAdapter(f"{what} is nested more than {MAX_JSON_DEPTH} deep")
    return value


def json_bytes(value: object) -> bytes:
    """How the store writes a card: what parse_json reads back."""
    return json.dumps(value, indent=2, allow_nan=False).encode() + b"\n"


def read_card(folder: Path) -> dict:
    """card.json of an adapter folder ({} when it has none), parsed strictly (parse_json)."""
    path = Path(folder) / CARD_FILE
    if not path.is_file():
        return {}
    what = f"{Path(folder).name}/{CARD_FILE}"
    card = parse_json(path.read_bytes(), what)
    if not isinstance(card, dict):
        raise InvalidAdapter(f"{what} must be a JSON object")
    return card


@contextmanager
def space_checked(root: Path, what: str) -> Iterator[None]:
    """A write into the store whose disk fills (ENOSPC, EDQUOT) is InsufficientStorage (507): the
    caller's request was fine; the writer has already removed what it half wrote."""
    try:
        yield
    except OSError as e:
        if e.errno not in OUT_OF_SPACE:
            raise
        raise InsufficientStorage(
            f"no space left on the adapter store's disk ({root}) to write {what}: {e.strerror}; nothing was "
            "changed. Free some space (or delete unused adapters) and retry."
        ) from e


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
        with space_checked(self.root, f"adapter {name!r}"):
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
        """Replace card.json of an existing adapter atomically (temp file, fsync, rename); a failed
        write leaves the old card and no temp file."""
        folder = self.path(name)
        data = json_bytes(card)
        with self._lock, space_checked(self.root, f"the card of {name!r}"):
            if name not in self:
                raise FileNotFoundError(f"adapter {name!r} does not exist")
            staging = self.root / STAGING
            staging.mkdir(exist_ok=True)
            tmp = staging / f"card-{uuid.uuid4().hex}.json"  # same filesystem; recover() clears a crash's leftovers
            try:
                write_file_durably(tmp, data)
                os.replace(tmp, folder / CARD_FILE)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
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
