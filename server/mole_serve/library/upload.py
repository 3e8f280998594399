"""An uploaded adapter, checked in memory before anything touches the store: the files from a
multipart form or one archive, its name, card and config. The tensors are checked against the
base model by the catalog (catalog.check), which knows the base.

Refusals are error kinds: UploadError a malformed upload, UploadTooLargeError too large,
InvalidAdapterError an adapter that does not fit this server. No torch here: the HTTP layer
imports this module."""

from __future__ import annotations

import io
import json
import math
import posixpath
import tarfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from mole_serve.errors import InvalidAdapter, InvalidRequest, TooLarge
from mole_serve.input_forms import INPUT_FORMS
from mole_serve.library.store import (
    ADAPTER_FILES,
    CARD_FILE,
    CONFIG_FILE,
    GATE_DIR,
    NAME_PATTERN,
    PROJECTION_DIR,
    valid_name,
)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
ARCHIVE_SUFFIXES = (".zip", ".tar.gz", ".tgz")
MAX_EXAMPLES, MAX_EXAMPLE_CHARS, MAX_DESCRIPTION_CHARS = 1000, 2000, 4000
MAX_MEMBERS = 64  # files in one archive (an adapter has 3, save_pretrained adds a README)
T = TypeVar("T")
# a model id the OpenAI routes give another meaning; the gate's and the retrieval projection's folders
RESERVED_NAMES = ("auto", GATE_DIR, PROJECTION_DIR)


def single_threaded(fn: Callable[..., T], *args) -> T:
    """fn(*args) with one torch intra-op thread in this helper thread. Beside the engine's OpenMP
    team on a 2-core CPU, a second 2-thread team makes both spin-wait for descheduled threads
    (docs/decisions.md has what that cost the decode steps)."""
    import torch

    torch.set_num_threads(1)  # an OpenMP setting of the calling OS thread: the step thread keeps its own
    return fn(*args)


class UploadError(InvalidRequest):
    code = "invalid_upload"


class UploadTooLargeError(TooLarge, UploadError):  # TooLarge first: the status table walks the MRO
    code = "upload_too_large"


class InvalidAdapterError(InvalidAdapter):
    code = "invalid_adapter"


@dataclass
class UploadedFiles:
    """An upload whose name, card and config passed; its tensors are still to be checked."""

    name: str
    files: dict[str, bytes]  # ADAPTER_FILES -> bytes, card.json rewritten with the final name
    card: dict
    config: dict


def is_archive(file_name: str) -> bool:
    return file_name.lower().endswith(ARCHIVE_SUFFIXES)


def collect(parts: list[tuple[str, bytes]], max_uncompressed: int) -> dict[str, bytes]:
    """Uploaded (file name, bytes) -> the adapter files by name. One archive, or the files."""
    archives = [p for p in parts if is_archive(p[0])]
    if archives:
        if len(parts) != 1:
            raise UploadError("send either one .zip / .tar.gz archive or the adapter files, not both")
        file_name, data = archives[0]
        parts = unpack_archive(file_name, data, max_uncompressed)
    files: dict[str, bytes] = {}
    for path, data in parts:
        base = posixpath.basename(path.replace("\\", "/"))
        if base.lower().endswith(PICKLE_SUFFIXES):
            raise UploadError(
                f"{base!r} is a pickle file, which is never loaded: send adapter_model.safetensors "
                "(PEFT's save_pretrained(safe_serialization=True))"
            )
        if base not in ADAPTER_FILES:
            continue  # README.md and the like, as save_pretrained leaves them
        if base in files:
            raise UploadError(f"{base!r} appears more than once in the upload")
        files[base] = data
    missing = [f for f in ADAPTER_FILES if f not in files]
    if missing:
        raise UploadError(f"missing {', '.join(missing)}; an adapter upload needs {', '.join(ADAPTER_FILES)}")
    return files


def _check_member_path(path: str) -> None:
    """Archive member names stay inside the archive: no absolute paths, drives or `..`."""
    norm = path.replace("\\", "/")
    if norm.startswith("/") or (len(norm) > 1 and norm[1] == ":") or ".." in norm.split("/"):
        raise UploadError(f"archive member {path!r} points outside the archive")


def unpack_archive(file_name: str, data: bytes, max_uncompressed: int) -> list[tuple[str, bytes]]:
    """Regular files of a .zip / .tar.gz, in memory: links, devices and escaping paths refused,
    the unpacked total bounded (a zip bomb stops at the limit, not after it)."""
    total = 0
    out: list[tuple[str, bytes]] = []

    def account(size: int, path: str) -> None:
        nonlocal total
        total += size
        if len(out) >= MAX_MEMBERS:
            raise UploadError(f"the archive holds more than {MAX_MEMBERS} files")
        if total > max_uncompressed:
            raise UploadTooLargeError(f"the archive unpacks to more than {max_uncompressed} bytes (at {path!r})")

    try:
        if file_name.lower().endswith(".zip"):
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                for info in zf.infolist():
                    _check_member_path(info.filename)
                    mode = info.external_attr >> 16
                    if (mode & 0o170000) == 0o120000:  # S_IFLNK: a symlink stored by `zip -y`
                        raise UploadError(f"archive member {info.filename!r} is a link; links are refused")
                    if info.is_dir():
                        continue
                    account(info.file_size, info.filename)
                    with zf.open(info) as f:  # the declared size can lie: read at most one byte past it
                        content = f.read(info.file_size + 1)
                    if len(content) > info.file_size:
                        raise UploadError(f"archive member {info.filename!r} is larger than it declares")
                    out.append((info.filename, content))
        else:
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tf:
                for member in tf:  # checked one by one: the next header is only read after this check
                    _check_member_path(member.name)
                    if member.issym() or member.islnk():
                        raise UploadError(f"archive member {member.name!r} is a link; links are refused")
                    if member.isdir():
                        continue
                    if not member.isfile():
                        raise UploadError(f"archive member {member.name!r} is not a regular file")
                    account(member.size, member.name)
                    extracted = tf.extractfile(member)
                    if extracted is None:  # only links and devices have no content; refused above
                        raise UploadError(f"archive member {member.name!r} is not a regular file")
                    out.append((member.name, extracted.read()))
    except UploadError:
        raise
    except Exception as e:  # corrupt, encrypted, truncated or oddly compressed archives alike
        raise UploadError(f"{file_name!r} is not a readable archive: {e}") from e
    return out


def check_card(card: object, name: str, min_examples: int) -> dict:
    if not isinstance(card, dict):
        raise InvalidAdapterError("card.json must be a JSON object with name, description and examples")
    examples = card.get("examples")
    if not isinstance(examples, list) or not all(isinstance(e, str) and e.strip() for e in examples):
        raise InvalidAdapterError("card.json: `examples` must be a list of non-empty example prompts")
    if len(examples) < min_examples:
        raise InvalidAdapterError(
            f"card.json has {len(examples)} examples; at least {min_examples} are needed "
            "(they are the adapter's retrieval key)"
        )
    if len(examples) > MAX_EXAMPLES or any(len(e) > MAX_EXAMPLE_CHARS for e in examples):
        raise InvalidAdapterError(f"card.json: at most {MAX_EXAMPLES} examples of {MAX_EXAMPLE_CHARS} characters")
    if not isinstance(card.get("auto", False), bool):
        raise InvalidAdapterError("card.json: `auto` (whether `auto` may retrieve the adapter) must be true or false")
    if card.get("input", "plain") not in INPUT_FORMS:
        raise InvalidAdapterError(
            f"card.json: `input` must be one of {', '.join(INPUT_FORMS)} (how the adapter "
            "reads its prompt: mole_serve/input_forms.py)"
        )
    description = card.get("description", "")
    if not isinstance(description, str) or len(description) > MAX_DESCRIPTION_CHARS:
        raise InvalidAdapterError(f"card.json: `description` must be a string of at most {MAX_DESCRIPTION_CHARS}")
    return {**card, "name": name}


def _check_config(config: object, base_names: set[str]) -> dict:
    if not isinstance(config, dict):
        raise InvalidAdapterError("adapter_config.json must be a JSON object")
    base = config.get("base_model_name_or_path")
    if base not in (None, "") and (not isinstance(base, str) or Path(base).name.lower() not in base_names):
        raise InvalidAdapterError(
            f"the adapter was trained on {base!r}; this server's base model is {sorted(base_names)[0]!r}"
        )
    alpha = config.get("lora_alpha", 1)
    alphas = alpha if isinstance(alpha, list) and alpha else [alpha]  # MELoRA: one per mini LoRA
    if not all(isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a) for a in alphas):
        raise InvalidAdapterError(f"adapter_config.json: lora_alpha {alpha!r} is not a number (or a list of them)")
    for field in ("alpha_pattern", "rank_pattern"):
        pattern = config.get(field) or {}
        if not isinstance(pattern, dict) or not all(
            isinstance(k, str) and len(k) <= 200 and isinstance(v, (int, float)) and not isinstance(v, bool)
            for k, v in pattern.items()
        ):
            raise InvalidAdapterError(f"adapter_config.json: {field} must map module patterns to numbers")
    return config


def _json(files: dict[str, bytes], file_name: str) -> object:
    try:
        return json.loads(files[file_name])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidAdapterError(f"{file_name} is not valid JSON: {e}") from e


def check_files(files: dict[str, bytes], name: str | None, base_names: set[str], min_examples: int) -> UploadedFiles:
    """Validate name, card and config; `name` (the form field) overrides the card's. base_names:
    the lower-case names an adapter's base_model_name_or_path may give (its last path part)."""
    card = _json(files, CARD_FILE)
    name = name or (card.get("name") if isinstance(card, dict) else None)
    if not isinstance(name, str) or not valid_name(name):
        raise UploadError(
            f"adapter name {name!r} is invalid: it must match {NAME_PATTERN.pattern} "
            "(give it in the `name` form field or the card)"
        )
    if name in RESERVED_NAMES or name in base_names:
        raise UploadError(f"adapter name {name!r} is reserved (a model id of this server)")
    card = check_card(card, name, min_examples)
    config = _check_config(_json(files, CONFIG_FILE), base_names)
    stored = {**files, CARD_FILE: json.dumps(card, indent=2).encode() + b"\n"}
    return UploadedFiles(name, stored, card, config)
