"""An uploaded adapter, checked in memory before anything touches the store: the files from a
multipart form or one archive, its name, card and config. The tensors are checked against the
base model by the catalog (catalog.check), which knows the base.

Refusals are error kinds: UploadError a malformed upload, UploadTooLargeError too large,
InvalidAdapterError an adapter that does not fit this server. No torch here: the HTTP layer
imports this module.

Every check runs in a worker thread beside the engine's step thread, and every one does bounded
work, whatever the upload holds. That is what keeps a live stream going: a worker thread running
pure Python holds the GIL for up to the interpreter's switch interval each time the step thread
asks for it back, and a decode step gives the GIL away at every torch op, so a long Python loop
in a worker (a million archive entries, one by one) stretches every step by orders of magnitude.
Bounded means:

- an archive is read entry by entry (folders included) and refused at its MAX_MEMBERS + 1st, before
  the next header is read; its metadata (a zip's central directory, which zipfile reads in one
  call; a tar's header blocks, pax and GNU long-name records) stops at MAX_HEADER_BYTES before it
  is read, so no header makes the loop long or the memory large;
- member data is inflated by zlib, which releases the GIL, READ_CHUNK bytes per call: a few
  thousand Python turns at most for MOLE_MAX_UNCOMPRESSED_BYTES. Only the adapter files are kept
  (a README is skipped, or inflated and dropped), each no larger than it declares;
- card.json and adapter_config.json are parsed by the C parser, at most MAX_JSON_BYTES each
  (store.parse_json); the card's examples, which are embedded, at most MAX_EXAMPLE_TEXT characters;
- the safetensors header is read before any tensor is built: float tensors only, no more of them
  than an adapter of the base can have (check_weights_header). Building that many is the longest
  Python loop an upload can ask for, and it grows with MOLE_MAX_LORAS and MOLE_MAX_LORA_RANK.

So no step holds the GIL for long, and a process (which would isolate the GIL for good) is not
needed; it would cost a start and a copy of the upload each time. bench/faults.py measures the
longest pause of a live stream while the worst uploads are posted (bench/results/faults.md).
"""

from __future__ import annotations

import io
import json
import math
import posixpath
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TypeVar

from mole_serve.errors import InvalidAdapter, InvalidRequest, TooLarge
from mole_serve.input_forms import INPUT_FORMS
from mole_serve.library.store import (
    ADAPTER_FILES,
    CARD_FILE,
    CONFIG_FILE,
    GATE_DIR,
    NAME_PATTERN,
    PROJECTION_DIR,
    WEIGHTS_FILE,
    json_bytes,
    parse_json,
    valid_name,
)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
ARCHIVE_SUFFIXES = (".zip", ".tar.gz", ".tgz")
MAX_EXAMPLES, MAX_EXAMPLE_CHARS, MAX_DESCRIPTION_CHARS = 1000, 2000, 4000
# Characters of all a card's examples together: each is embedded for the retrieval key, which costs
# CPU in proportion (docs/operations.md#upload-limits); train-adapter's cards hold about 2,000.
MAX_EXAMPLE_TEXT = 20_000
# What a card keeps: the fields the server reads, then those `mole-serve train-adapter` records
# (docs/adapters.md). Any other field is dropped, not refused: cards written by other tools still
# upload, and the store holds (and every GET shows) only what is documented.
CARD_FIELDS = ("name", "description", "examples", "auto", "input")
TRAINING_FIELDS = (
    "task",
    "family",
    "kind",
    "base_model",
    "system_prompt",
    "training",
    "steps",
    "wall_time_s",
    "first_loss",
    "final_loss",
    "trainable_params",
    "n_eval",
    "base_accuracy",
    "adapter_accuracy",
    "per_task_accuracy",
)
MAX_MEMBERS = 64  # entries of one archive, folders included (an adapter has 3 files, save_pretrained adds a README)
MAX_MEMBER_NAME = 1024  # characters of an archive member's path
MAX_HEADER_BYTES = 256 << 10  # an archive's metadata: a zip's central directory, a tar's header blocks
READ_CHUNK = 256 << 10  # bytes inflated per call
# adapter_model.safetensors dtypes a kind can fold into float32 weights (int8 and friends are quantized
# formats with scales stored elsewhere: they would load as wrong numbers)
WEIGHT_DTYPES = ("F16", "BF16", "F32", "F64")
TENSOR_HEADER_BYTES = 512  # safetensors header bytes per tensor, at most (a PEFT entry takes about 130)
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


def is_adapter_file(path: str) -> bool:
    """Whether an uploaded file, by its path, is one of ADAPTER_FILES (others, a README, are
    ignored); a pickle file is refused by its name."""
    base = posixpath.basename(path.replace("\\", "/"))
    if base.lower().endswith(PICKLE_SUFFIXES):
        raise UploadError(
            f"{base!r} is a pickle file, which is never loaded: send adapter_model.safetensors "
            "(PEFT's save_pretrained(safe_serialization=True))"
        )
    return base in ADAPTER_FILES


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
        if not is_adapter_file(path):
            continue  # README.md and the like, as save_pretrained leaves them
        base = posixpath.basename(path.replace("\\", "/"))
        if base in files:
            raise UploadError(f"{base!r} appears more than once in the upload")
        files[base] = data
    missing = [f for f in ADAPTER_FILES if f not in files]
    if missing:
        raise UploadError(f"missing {', '.join(missing)}; an adapter upload needs {', '.join(ADAPTER_FILES)}")
    return files


class _Unpacking:
    """What unpacking one archive has taken so far, against the limits; every entry is counted
    before anything else is read of it or after it."""

    def __init__(self, max_uncompressed: int) -> None:
        self.max_uncompressed = max_uncompressed
        self.members = 0
        self.unpacked = 0  # bytes, as the entries declare them

    def count(self, path: str, size: int) -> None:
        self.members += 1
        if self.members > MAX_MEMBERS:
            raise UploadError(f"the archive holds more than {MAX_MEMBERS} entries (folders count too)")
        if size < 0:  # tar's base-256 sizes can be negative
            raise UploadError(f"archive member {path!r} declares a negative size")
        if len(path) > MAX_MEMBER_NAME:
            raise UploadError(f"an archive member's path is {len(path)} characters; the limit is {MAX_MEMBER_NAME}")
        norm = path.replace("\\", "/")
        if norm.startswith("/") or (len(norm) > 1 and norm[1] == ":") or ".." in norm.split("/"):
            raise UploadError(f"archive member {path!r} points outside the archive")
        self.unpacked += size
        if self.unpacked > self.max_uncompressed:
            raise UploadTooLargeError(f"the archive unpacks to more than {self.max_uncompressed} bytes (at {path!r})")


def _headers_too_large() -> UploadError:
    return UploadError(f"the archive's headers are over {MAX_HEADER_BYTES} bytes")


class _CappedReads(io.BytesIO):
    """A .zip in memory whose single reads stop at MAX_HEADER_BYTES: zipfile reads the central
    directory in one read before it parses any entry, so a directory of a million entries is
    refused before the loop over them. Its other reads are smaller: the end record's search, a
    member's local header, READ_CHUNK of compressed data."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self._length = len(data)

    def read(self, size: int | None = -1) -> bytes:
        left = self._length - self.tell()
        if min(left, size if size is not None and size >= 0 else left) > MAX_HEADER_BYTES:
            raise _headers_too_large()
        return super().read(size)


class _TarStream(io.RawIOBase):
    """The tar inside a .tar.gz, inflated as tarfile reads it (tarfile's plain "r:" mode on top)
    and metered: it hands out at most `allowance` bytes in all. The unpacking loop grants
    MAX_HEADER_BYTES at the start and each regular file's size once that is counted, so no header (a
    pax record claiming gigabytes, a chain of long-name records) makes tarfile read or inflate past
    the limits. One gzip stream: what follows it (a concatenated .gz) is refused. It only moves
    forward (tarfile seeks past a member's padding, and past the data of one not read)."""

    def __init__(self, data: bytes) -> None:
        super().__init__()
        self._input = memoryview(data)
        self._fed = 0  # input bytes handed to zlib
        self._inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)  # the gzip wrapper: header and CRC checked
        self._position = 0
        self.allowance = MAX_HEADER_BYTES

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence != io.SEEK_SET or offset < self._position:
            raise io.UnsupportedOperation("a .tar.gz is read front to back")
        while self._position < offset and self.read(min(offset - self._position, READ_CHUNK)):
            pass
        return self._position

    def read(self, size: int = -1) -> bytes:
        if not 0 <= size <= self.allowance:
            raise _headers_too_large()
        parts, wanted = [], size
        while wanted and not self._inflater.eof:
            pending: bytes | memoryview = self._inflater.unconsumed_tail
            if not pending:
                if self._fed == len(self._input):
                    break
                pending = self._input[self._fed : self._fed + READ_CHUNK]
                self._fed += len(pending)
            part = self._inflater.decompress(pending, wanted)
            parts.append(part)
            wanted -= len(part)
        if self._inflater.eof and (self._inflater.unused_data or self._fed < len(self._input)):
            raise UploadError("the archive goes on after its gzip stream ends: send one .tar.gz (tar czf)")
        out = b"".join(parts)
        self.allowance -= len(out)
        self._position += len(out)
        return out


def _read_member(f: IO[bytes]) -> bytes:
    """A member's bytes, READ_CHUNK at a time (its reader stops at its declared size)."""
    out = io.BytesIO()
    with f:
        while chunk := f.read(READ_CHUNK):
            out.write(chunk)
    return out.getvalue()


def _unpack_zip(data: bytes, unpacking: _Unpacking) -> list[tuple[str, bytes]]:
    out = []
    with zipfile.ZipFile(_CappedReads(data)) as zf:
        for info in zf.infolist():
            unpacking.count(info.filename, info.file_size)
            if (info.external_attr >> 16 & 0o170000) == 0o120000:  # S_IFLNK: a symlink stored by `zip -y`
                raise UploadError(f"archive member {info.filename!r} is a link; links are refused")
            if not info.is_dir() and is_adapter_file(info.filename):
                # zipfile reads no more than the member declares, and checks its CRC at the end
                out.append((info.filename, _read_member(zf.open(info))))
    return out


def _unpack_tar(data: bytes, unpacking: _Unpacking) -> list[tuple[str, bytes]]:
    out = []
    stream = _TarStream(data)
    with tarfile.open(fileobj=stream, mode="r:") as tf:
        for member in tf:  # the next header is read only once this member passed
            unpacking.count(member.name, member.size)
            if member.issym() or member.islnk():
                raise UploadError(f"archive member {member.name!r} is a link; links are refused")
            if not (member.isdir() or member.isfile()) or member.issparse():
                raise UploadError(f"archive member {member.name!r} is not a regular file")
            if not member.isfile():
                continue  # a folder: tarfile reads no data after its header, whatever size it declares
            stream.allowance += member.size  # its data, now counted
            if is_adapter_file(member.name):
                extracted = tf.extractfile(member)
                if extracted is None:  # only links and devices have no content; refused above
                    raise UploadError(f"archive member {member.name!r} is not a regular file")
                out.append((member.name, _read_member(extracted)))
    return out


def unpack_archive(file_name: str, data: bytes, max_uncompressed: int) -> list[tuple[str, bytes]]:
    """The adapter files of a .zip / .tar.gz, in memory, with the limits applied as it is read
    (module docstring): links, devices and escaping paths refused, the unpacked total bounded
    (a zip bomb stops at the limit, not after it)."""
    unpacking = _Unpacking(max_uncompressed)
    try:
        if file_name.lower().endswith(".zip"):
            return _unpack_zip(data, unpacking)
        return _unpack_tar(data, unpacking)
    except UploadError:
        raise
    except Exception as e:  # corrupt, encrypted, truncated or oddly compressed archives alike
        raise UploadError(f"{file_name!r} is not a readable archive: {e}") from e


def check_weights_header(data: bytes, max_tensors: int) -> None:
    """adapter_model.safetensors' header, read before any tensor is built: at most `max_tensors`
    tensors, each of a float dtype (WEIGHT_DTYPES)."""
    if len(data) < 8:
        raise InvalidAdapterError(f"{WEIGHTS_FILE} cannot be read: it has no header")
    (size,) = struct.unpack("<Q", data[:8])
    if size > TENSOR_HEADER_BYTES * (max_tensors + 1) or 8 + size > len(data):
        raise InvalidAdapterError(f"{WEIGHTS_FILE} cannot be read: its header claims {size} bytes")
    try:
        header = json.loads(data[8 : 8 + size])
    except ValueError as e:
        raise InvalidAdapterError(f"{WEIGHTS_FILE} cannot be read: its header is not JSON: {e}") from e
    if not isinstance(header, dict):
        raise InvalidAdapterError(f"{WEIGHTS_FILE} cannot be read: its header is not a JSON object")
    tensors = {key: info for key, info in header.items() if key != "__metadata__"}
    if len(tensors) > max_tensors:
        raise InvalidAdapterError(
            f"{WEIGHTS_FILE} holds {len(tensors)} tensors; an adapter of this base model has at most {max_tensors}"
        )
    for key, info in tensors.items():
        dtype = info.get("dtype") if isinstance(info, dict) else None
        if dtype not in WEIGHT_DTYPES:
            raise InvalidAdapterError(
                f"{WEIGHTS_FILE}: tensor {key!r} has dtype {dtype}; adapter weights must be floating point "
                f"({', '.join(WEIGHT_DTYPES)}), not a quantized or integer format"
            )


def check_card(card: object, name: str, min_examples: int) -> dict:
    """The card as stored: its fields checked, unknown ones dropped (CARD_FIELDS), `name` set."""
    if not isinstance(card, dict):
        raise InvalidAdapterError("card.json must be a JSON object with name, description and examples")
    if not isinstance(card.get("auto", False), bool):
        raise InvalidAdapterError("card.json: `auto` (whether `auto` may retrieve the adapter) must be true or false")
    examples = card.get("examples")
    if examples is None and card.get("auto") is False:
        examples = []  # served by name only: no retrieval key to embed
    elif not isinstance(examples, list) or not all(isinstance(e, str) and e.strip() for e in examples):
        raise InvalidAdapterError(
            "card.json: `examples` must be a list of non-empty example prompts (or the card says `auto: false`: "
            "an adapter served by name only)"
        )
    elif len(examples) < min_examples:
        raise InvalidAdapterError(
            f"card.json has {len(examples)} examples; at least {min_examples} are needed "
            "(they are the adapter's retrieval key)"
        )
    if len(examples) > MAX_EXAMPLES or any(len(e) > MAX_EXAMPLE_CHARS for e in examples):
        raise InvalidAdapterError(f"card.json: at most {MAX_EXAMPLES} examples of {MAX_EXAMPLE_CHARS} characters")
    text = sum(map(len, examples))
    if text > MAX_EXAMPLE_TEXT:
        raise InvalidAdapterError(
            f"card.json: the examples hold {text} characters together; the limit is {MAX_EXAMPLE_TEXT} "
            "(each is embedded for the retrieval key)"
        )
    if card.get("input", "plain") not in INPUT_FORMS:
        raise InvalidAdapterError(
            f"card.json: `input` must be one of {', '.join(INPUT_FORMS)} (how the adapter "
            "reads its prompt: mole_serve/input_forms.py)"
        )
    description = card.get("description", "")
    if not isinstance(description, str) or len(description) > MAX_DESCRIPTION_CHARS:
        raise InvalidAdapterError(f"card.json: `description` must be a string of at most {MAX_DESCRIPTION_CHARS}")
    kept = {field: value for field, value in card.items() if field in CARD_FIELDS or field in TRAINING_FIELDS}
    return {**kept, "name": name}


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


def check_files(files: dict[str, bytes], name: str | None, base_names: set[str], min_examples: int) -> UploadedFiles:
    """Validate name, card and config; `name` (the form field) overrides the card's. base_names:
    the lower-case names an adapter's base_model_name_or_path may give (its last path part)."""
    card = parse_json(files[CARD_FILE], CARD_FILE)
    name = name or (card.get("name") if isinstance(card, dict) else None)
    if not isinstance(name, str) or not valid_name(name):
        raise UploadError(
            f"adapter name {name!r} is invalid: it must match {NAME_PATTERN.pattern} "
            "(give it in the `name` form field or the card)"
        )
    if name in RESERVED_NAMES or name in base_names:
        raise UploadError(f"adapter name {name!r} is reserved (a model id of this server)")
    card = check_card(card, name, min_examples)
    config = _check_config(parse_json(files[CONFIG_FILE], CONFIG_FILE), base_names)
    stored = {**files, CARD_FILE: json_bytes(card)}
    return UploadedFiles(name, stored, card, config)
