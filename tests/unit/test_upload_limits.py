"""What an operator uploads cannot stall, poison or 500 the server (issue 36): archives are read
with their limits applied as they are read (every entry counted, headers bounded, members
streamed), card.json and adapter_config.json parsed strictly, a full disk is a 507 that changes
nothing, and an adapter the server could never run (too many slots, integer weights, a card too
costly to embed) is refused at upload."""

from __future__ import annotations

import errno
import gzip
import io
import json
import tarfile
import threading
import tracemalloc
import zipfile
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from mole_serve.errors import InsufficientStorage, InvalidAdapter
from mole_serve.library import store as store_module
from mole_serve.library.store import MAX_JSON_BYTES, AdapterStore, adapter_dirs, parse_json, read_card
from mole_serve.library.upload import (
    MAX_EXAMPLE_TEXT,
    MAX_HEADER_BYTES,
    MAX_MEMBER_NAME,
    MAX_MEMBERS,
    UploadError,
    check_card,
    collect,
)
from safetensors.torch import save as save_tensors

from tests.unit.test_admin_api import AUTH, admin_client, examples, upload, with_card, with_tensors
from tests.unit.test_admin_api import files as files  # noqa: F401  (the module fixture)
from tests.unit.test_admin_api import hf as hf  # noqa: F401
from tests.unit.test_moe_kinds import mixlora_config, mixlora_tensors
from tests.unit.test_store import OLD, tar_bytes, zip_bytes

MB = 1 << 20


def plain_tar(members: dict[str, bytes], folders: int = 0) -> bytes:
    """An uncompressed tar of `folders` folder entries (one header repeated: cheap to build), then the members."""
    folder = tarfile.TarInfo("d")
    folder.type = tarfile.DIRTYPE
    raw = io.BytesIO()
    raw.write(folder.tobuf(tarfile.PAX_FORMAT) * folders)
    with tarfile.open(fileobj=raw, mode="w") as tf:  # appends the members and the end blocks
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return raw.getvalue()


def tar_of_folders(n: int, members: dict[str, bytes]) -> bytes:
    return gzip.compress(plain_tar(members, n), compresslevel=1)


def zip_of_folders(n: int, members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i in range(n):
            zf.writestr(f"d{i}/", b"")
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


# --- 1. every entry counts; headers are bounded; the loop stops early ---
@pytest.mark.parametrize("archive", ["a.tar.gz", "a.zip"])
def test_folder_entries_count_against_the_member_limit(archive):
    make = tar_of_folders if archive.endswith(".gz") else zip_of_folders
    with pytest.raises(UploadError, match=f"more than {MAX_MEMBERS} entries"):
        collect([(archive, make(MAX_MEMBERS, OLD))], MB)
    assert collect([(archive, make(MAX_MEMBERS - len(OLD), OLD))], MB) == OLD


def test_a_tar_of_many_folders_is_refused_after_a_bounded_number_of_headers(monkeypatch):
    headers = []
    real = tarfile.TarInfo.fromtarfile.__func__

    def counted(cls, tf):
        headers.append(1)
        return real(cls, tf)

    monkeypatch.setattr(tarfile.TarInfo, "fromtarfile", classmethod(counted))
    with pytest.raises(UploadError, match="entries"):
        collect([("a.tar.gz", tar_of_folders(20_000, OLD))], MB)
    assert len(headers) <= MAX_MEMBERS + 1


def test_a_zip_directory_past_the_header_limit_is_refused_before_it_is_parsed(monkeypatch):
    entries = []
    real = zipfile.ZipInfo.__init__

    def counted(self, *args, **kwargs):
        entries.append(1)
        real(self, *args, **kwargs)

    data = zip_of_folders(10_000, OLD)  # a central directory of about 500 KB
    monkeypatch.setattr(zipfile.ZipInfo, "__init__", counted)
    with pytest.raises(UploadError, match=f"headers are over {MAX_HEADER_BYTES}"):
        collect([("a.zip", data)], MB)
    assert entries == []


def test_tar_header_records_and_member_names_are_bounded():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo("card.json")
        info.pax_headers = {"comment": "x" * MAX_HEADER_BYTES}  # one pax record past the header budget
        info.size = 2
        tf.addfile(info, io.BytesIO(b"{}"))
    with pytest.raises(UploadError, match="headers are over"):
        collect([("a.tar.gz", buf.getvalue())], MB)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=tarfile.PAX_FORMAT) as tf:
        folder = tarfile.TarInfo("d")
        folder.type, folder.size = tarfile.DIRTYPE, MB  # a size no data follows: it must not widen the budget
        tf.addfile(folder)
        info = tarfile.TarInfo("card.json")
        info.pax_headers = {"comment": "x" * MAX_HEADER_BYTES}
        info.size = 2
        tf.addfile(info, io.BytesIO(b"{}"))
    with pytest.raises(UploadError, match="headers are over"):
        collect([("a.tar.gz", buf.getvalue())], 4 * MB)
    long_name = "a/" * MAX_MEMBER_NAME + "card.json"
    for archive in (tar_bytes({long_name: b"{}"}), zip_bytes({long_name: b"{}"})):
        with pytest.raises(UploadError, match=f"the limit is {MAX_MEMBER_NAME}"):
            collect([("a.zip" if archive[:2] == b"PK" else "a.tar.gz", archive)], MB)


def test_a_concatenated_gzip_is_refused():
    tar = plain_tar(OLD)
    with pytest.raises(UploadError, match="after its gzip stream"):
        collect([("a.tar.gz", gzip.compress(tar[:1024]) + gzip.compress(tar[1024:]))], MB)


# --- 10. members stream through; a skipped one is never held; uploads are capped ---
@pytest.mark.parametrize("archive", ["a.zip", "a.tar.gz"])
def test_a_large_member_that_is_not_kept_is_never_held_in_memory(archive):
    data = (zip_bytes if archive == "a.zip" else tar_bytes)({**OLD, "README.md": bytes(64 * MB)})
    tracemalloc.start()
    try:
        assert collect([(archive, data)], 128 * MB) == OLD
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * MB, peak


def test_uploads_past_the_concurrency_limit_are_429_with_retry_after(hf, tokenizer, files, tmp_path):
    entered, release = threading.Event(), threading.Event()
    with admin_client(hf, tokenizer, tmp_path / "store", max_concurrent_uploads=1) as client:
        catalog = client.app.state.catalog
        real_check = catalog.check

        def slow_check(*args):
            if not entered.is_set():
                entered.set()
                release.wait(30)
            return real_check(*args)

        catalog.check = slow_check
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(upload, client, files)
            assert entered.wait(30)
            r = upload(client, with_card(files, name="other"))
            release.set()
            assert first.result().status_code == 201
        assert r.status_code == 429 and r.headers["retry-after"] and r.json()["error"]["code"] == "too_many_uploads"
        assert upload(client, with_card(files, name="other")).status_code == 201  # the slot is free again


# --- 4. strict JSON; every failure after the commit rolls back ---
@pytest.fixture
def client(hf, tokenizer, tmp_path):  # noqa: F811
    with admin_client(hf, tokenizer, tmp_path / "store") as c:
        yield c


DEEP = "[" * 10_000 + "]" * 10_000
STRICT_JSON = {  # what -> (file, text, words of the message)
    "NaN in the card": ("card.json", '"steps": NaN', "NaN"),
    "Infinity in the card": ("card.json", '"final_loss": -Infinity', "Infinity"),
    "a float past float64": ("card.json", '"final_loss": 1e400', "range"),
    "an integer past int64": ("card.json", '"steps": 1' + "0" * 30, "range"),
    "deep card": ("card.json", f'"training": {DEEP}', "nested more than"),
    "nesting past the limit": ("card.json", '"training": ' + "[" * 20 + "]" * 20, "nested more than"),
    "NaN in the config": ("adapter_config.json", '"lora_dropout": NaN', "NaN"),
    "deep config": ("adapter_config.json", f'"loftq_config": {DEEP}', "nested more than"),
}


@pytest.mark.parametrize("case", list(STRICT_JSON))
def test_json_beyond_the_standard_is_refused_and_nothing_is_stored(client, files, tmp_path, case):
    file_name, field, words = STRICT_JSON[case]
    text = files[file_name].decode().rstrip().removesuffix("}")
    r = upload(client, {**files, file_name: f"{text}, {field}}}".encode()})
    assert r.status_code == 422, r.text
    assert words in r.json()["error"]["message"]
    assert not adapter_dirs(tmp_path / "store")
    assert client.get("/admin/adapters/alpha", headers=AUTH).status_code == 404


def test_unknown_card_fields_are_dropped_and_a_huge_card_is_refused(client, files):
    card = {**json.loads(files["card.json"]), "colour": "blue", "final_loss": 0.5}
    r = upload(client, {**files, "card.json": json.dumps(card).encode()})
    assert r.status_code == 201, r.text
    assert "colour" not in r.json()["card"] and r.json()["card"]["final_loss"] == 0.5
    stored = client.get("/admin/adapters/alpha", headers=AUTH).json()["card"]
    assert "colour" not in stored and stored["final_loss"] == 0.5
    r = upload(client, with_card(files, name="big", unused="x" * 300_000))
    assert r.status_code == 422 and f"the limit is {MAX_JSON_BYTES}" in r.json()["error"]["message"]


def test_parse_json_reads_what_the_store_writes(tmp_path):
    card = {"name": "a", "examples": ["é", "x"], "training": {"lr": 1e-4, "steps": [1, 2]}}
    assert parse_json(store_module.json_bytes(card), "card.json") == card
    with pytest.raises(ValueError):
        store_module.json_bytes({"x": float("nan")})  # the store never writes what it cannot read
    (tmp_path / "card.json").write_bytes(b"[1, 2]")
    with pytest.raises(InvalidAdapter, match="JSON object"):
        read_card(tmp_path)


def test_a_stored_card_with_nan_is_a_422_not_a_500_until_replaced(client, files, tmp_path):
    """A card written before uploads were parsed strictly (or by hand) made every GET a 500."""
    assert upload(client, files).status_code == 201
    card = tmp_path / "store" / "alpha" / "card.json"
    card.write_text(card.read_text().rstrip().removesuffix("}") + ', "final_loss": NaN}')
    for r in (
        client.get("/admin/adapters/alpha", headers=AUTH),
        client.patch("/admin/adapters/alpha", headers=AUTH, json={"description": "x"}),
    ):
        assert r.status_code == 422 and "alpha/card.json" in r.json()["error"]["message"], r.text
    assert upload(client, files, replace=True).status_code == 201
    assert client.get("/admin/adapters/alpha", headers=AUTH).status_code == 200


@pytest.mark.parametrize("failing", ["describe", "serving"])
def test_any_failure_after_the_commit_rolls_the_upload_back(client, files, tmp_path, monkeypatch, failing):
    """Before, a failure after the engine took the adapter (describing the stored files) was a 500
    with the adapter stored and served; a refusal by the serving side lost its own status."""
    from mole_serve.errors import Overloaded
    from mole_serve.library import catalog as catalog_module

    if failing == "describe":

        def broken(folder):
            raise OSError("the disk went away")

        monkeypatch.setattr(catalog_module, "describe", broken)
        status = 422
    else:
        engine = client.app.state.engine.engine

        def refuse(name, weights):
            raise Overloaded("the engine is full")

        monkeypatch.setattr(engine, "add_adapter", refuse)
        status = 429
    r = upload(client, files)
    assert r.status_code == status, r.text
    assert "alpha" not in adapter_dirs(tmp_path / "store")
    assert not client.app.state.engine.has_adapter("alpha") and "alpha" not in client.app.state.catalog


# --- 8. a full disk is a 507 that changes nothing ---
def _disk_full_after(nbytes: int):
    real = store_module.write_file_durably

    def write(path, data):
        real(path, data[:nbytes])  # part of it reaches the disk, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    return write, real


def test_a_full_disk_is_507_and_leaves_the_card_and_no_temp_file(client, files, tmp_path, monkeypatch):
    assert upload(client, files).status_code == 201
    store = tmp_path / "store"
    before = (store / "alpha" / "card.json").read_bytes()
    write, _ = _disk_full_after(10)
    monkeypatch.setattr(store_module, "write_file_durably", write)
    r = client.patch("/admin/adapters/alpha", headers=AUTH, json={"description": "new"})
    assert r.status_code == 507, r.text
    error = r.json()["error"]
    assert error["code"] == "insufficient_storage" and "space" in error["message"]
    assert (store / "alpha" / "card.json").read_bytes() == before
    assert not list((store / ".staging").glob("card-*"))
    r = upload(client, files, name="beta")
    assert r.status_code == 507 and r.json()["error"]["code"] == "insufficient_storage"
    assert list(adapter_dirs(store)) == ["alpha"] and not any((store / ".staging").iterdir())
    assert client.get("/admin/adapters/alpha", headers=AUTH).json()["card"]["description"] != "new"


def test_write_card_removes_its_temp_file_on_any_failure(tmp_path, monkeypatch):
    store = AdapterStore(tmp_path)
    store.commit("a", OLD).finish()
    write, _ = _disk_full_after(3)
    monkeypatch.setattr(store_module, "write_file_durably", write)
    with pytest.raises(InsufficientStorage, match="no space left"):
        store.write_card("a", {"v": 2})
    assert (tmp_path / "a" / "card.json").read_bytes() == OLD["card.json"]
    assert not any((tmp_path / ".staging").iterdir())


# --- 11. accepted before, refused now ---
def test_the_examples_text_is_bounded_in_total():
    examples_ = ["x" * 2000] * (MAX_EXAMPLE_TEXT // 2000 + 1)
    with pytest.raises(InvalidAdapter, match=f"the limit is {MAX_EXAMPLE_TEXT}"):
        check_card({"examples": examples_}, "a", 5)
    assert check_card({"examples": ["x" * 2000] * (MAX_EXAMPLE_TEXT // 2000)}, "a", 5)["name"] == "a"


def test_a_card_whose_examples_cost_too_much_to_embed_is_refused(client, files):
    """1,000 examples of 2,000 characters passed each example's bounds and took minutes of CPU to
    embed; what bounds that is their total (and a card that large is over MAX_JSON_BYTES too)."""
    r = upload(client, with_card(files, examples=[f"{i} " + "x" * 1990 for i in range(MAX_EXAMPLE_TEXT // 2000 + 1)]))
    assert r.status_code == 422 and "characters together" in r.json()["error"]["message"]


def test_an_adapter_needing_more_slots_than_the_server_has_is_refused(hf, tokenizer, files, tmp_path):
    def mixlora(experts: int) -> dict[str, bytes]:
        return {
            "adapter_config.json": json.dumps(mixlora_config(E=experts, base_model_name_or_path=None)).encode(),
            "adapter_model.safetensors": save_tensors(mixlora_tensors(hf, E=experts, r=4, seed=1)),
            "card.json": json.dumps({"name": "mix", "examples": examples("mix experts")}).encode(),
        }

    with admin_client(hf, tokenizer, tmp_path / "store") as client:  # the engine has 8 slots
        r = upload(client, mixlora(8))
        assert r.status_code == 422, r.text
        assert (
            "takes 9 adapter slots" in r.json()["error"]["message"] and "MOLE_MAX_LORAS" in r.json()["error"]["message"]
        )
        assert upload(client, mixlora(7)).status_code == 201


@pytest.mark.parametrize("dtype, name", [(torch.int8, "I8"), (torch.int32, "I32"), (torch.bool, "BOOL")])
def test_integer_weights_are_refused_by_dtype(client, files, dtype, name):
    def to_dtype(tensors):
        key = sorted(tensors)[0]
        tensors[key] = tensors[key].to(dtype)

    r = upload(client, with_tensors(files, to_dtype))
    assert r.status_code == 422 and f"has dtype {name}" in r.json()["error"]["message"], r.text


def test_more_tensors_than_any_adapter_of_the_base_has_are_refused(client, files):
    def pad(tensors):
        tensors.update({f"extra.{i}": torch.zeros(1) for i in range(1000)})

    r = upload(client, with_tensors(files, pad))
    assert r.status_code == 422 and "tensors; an adapter of this base model has at most" in r.json()["error"]["message"]
