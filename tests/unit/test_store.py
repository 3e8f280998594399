"""The adapter store on disk: atomic commit/replace/delete, recovery after a crash at every step,
and the upload checks that run before anything is written."""

from __future__ import annotations

import io
import json
import os
import tarfile
import zipfile

import pytest
from mole_serve.library.store import AdapterExistsError, AdapterStore, adapter_dirs, describe, read_card, valid_name
from mole_serve.library.upload import UploadError, UploadTooLargeError, collect, unpack_archive

OLD = {"adapter_config.json": b'{"r": 1}', "adapter_model.safetensors": b"old" * 1000, "card.json": b'{"v": 1}'}
NEW = {"adapter_config.json": b'{"r": 2}', "adapter_model.safetensors": b"new" * 2000, "card.json": b'{"v": 2}'}


def contents(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_names():
    for ok in ("a", "int_to_roman", "v1.2-x", "0" * 64):
        assert valid_name(ok)
    for bad in ("", "A", "-a", ".a", "_a", "a/b", "..", "a b", "0" * 65, "é", "a\n"):
        assert not valid_name(bad), bad


def test_commit_replace_delete_and_listing(tmp_path):
    store = AdapterStore(tmp_path)
    store.commit("a", OLD).finish()
    assert contents(tmp_path / "a") == OLD and store.names() == ["a"] and "a" in store
    with pytest.raises(AdapterExistsError):
        store.commit("a", NEW)
    commit = store.commit("a", NEW, replace=True)
    assert contents(tmp_path / "a") == NEW and commit.previous is not None
    commit.finish()
    assert not commit.previous.exists()
    store.write_card("a", {"name": "a", "examples": ["x"]})
    assert read_card(tmp_path / "a") == {"name": "a", "examples": ["x"]}
    (tmp_path / ".staging" / "junk").mkdir(parents=True)  # dot folders are never adapters
    (tmp_path / ".staging" / "junk" / "adapter_config.json").write_text("{}")
    assert list(adapter_dirs(tmp_path)) == ["a"]
    assert store.delete("a") and not store.delete("a") and store.names() == []
    (tmp_path / "gate").mkdir()  # not an adapter: never replaced
    (tmp_path / "gate" / "router.safetensors").write_bytes(b"x")
    with pytest.raises(AdapterExistsError):
        store.commit("gate", NEW, replace=True)
    assert [p.name for p in (tmp_path / "gate").iterdir()] == ["router.safetensors"]
    with pytest.raises(ValueError):
        store.path("../x")


def test_rollback_restores_the_previous_version(tmp_path):
    store = AdapterStore(tmp_path)
    store.commit("a", OLD).finish()
    store.commit("a", NEW, replace=True).rollback()
    assert contents(tmp_path / "a") == OLD
    store.commit("b", NEW).rollback()
    assert store.names() == ["a"]


def test_describe_reads_the_safetensors_header(tmp_path):
    import torch
    from safetensors.torch import save_file

    key = "base_model.model.model.layers.{}.self_attn.q_proj.lora_{}.weight"
    save_file(
        {
            key.format(0, "A"): torch.zeros(4, 8),
            key.format(0, "B"): torch.zeros(8, 4),
            key.format(1, "A"): torch.zeros(2, 8),
            key.format(1, "B"): torch.zeros(8, 2),
        },
        tmp_path / "adapter_model.safetensors",
    )
    info = describe(tmp_path)
    assert info["rank"] == 4 and info["targets"] == ["q_proj"] and info["num_layers"] == 2 and info["size_bytes"] > 0


FS_CALLS = ("fsync", "rename", "replace", "unlink", "rmdir", "mkdir")


def crash_at(step: int, action) -> bool:
    """Run action() in a forked child that dies (os._exit, like kill -9) right before its
    step-th filesystem call; True if it ran to the end without reaching that step."""
    pid = os.fork()
    if pid == 0:  # the child: count calls, die at `step`
        count = [0]

        def wrap(fn):
            def inner(*args, **kwargs):
                if count[0] == step:
                    os._exit(17)
                count[0] += 1
                return fn(*args, **kwargs)

            return inner

        for call in FS_CALLS:
            setattr(os, call, wrap(getattr(os, call)))
        try:
            action()
        finally:
            os._exit(0 if count[0] < step else 1)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


def card_of(files: dict[str, bytes] | None) -> object:
    return None if files is None else json.loads(files["card.json"])


@pytest.mark.parametrize("scenario", ["upload", "replace", "delete", "card"])
def test_a_crash_at_any_step_leaves_the_old_or_the_new_state(tmp_path, scenario):
    """Kill the writer before each of its filesystem calls in turn; after recover() the adapter is
    exactly the old version or exactly the new one, and nothing half-written is left."""
    actions = {
        "upload": lambda s: s.commit("a", NEW).finish(),
        "replace": lambda s: s.commit("a", NEW, replace=True).finish(),
        "delete": lambda s: s.delete("a"),
        "card": lambda s: s.write_card("a", {"v": 3}),
    }
    old = None if scenario == "upload" else OLD
    new = {"upload": NEW, "replace": NEW, "delete": None, "card": {**OLD, "card.json": b'{"v": 3}'}}[scenario]
    outcomes, step, finished = set(), 0, False
    while not finished:
        root = tmp_path / str(step)
        root.mkdir()
        store = AdapterStore(root)
        store.commit("keep", OLD).finish()  # a bystander that must survive every crash
        if old:
            store.commit("a", old).finish()
        finished = crash_at(step, lambda root=root: actions[scenario](AdapterStore(root)))
        store.recover()
        state = contents(root / "a") if (root / "a").exists() else None
        if state is not None and new is not None and card_of(state) == card_of(new):
            state = new  # the rewritten card's JSON layout differs, not its content
        assert state in (old, new), (step, state)
        assert sorted(p.name for p in root.iterdir()) == (["a", "keep"] if state else ["keep"])
        assert contents(root / "keep") == OLD
        outcomes.add("new" if state == new else "old")
        step += 1
    assert outcomes == {"old", "new"} and step > 2  # the crash points span the change


def test_concurrent_commits_of_one_name_one_wins(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    store = AdapterStore(tmp_path)

    def attempt(i: int) -> str:
        try:
            store.commit("a", {**NEW, "card.json": str(i).encode()}).finish()
            return "ok"
        except AdapterExistsError:
            return "exists"

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(attempt, range(16)))
    assert results.count("ok") == 1 and store.names() == ["a"] and set(contents(tmp_path / "a")) == set(NEW)
    assert not any((tmp_path / ".staging").iterdir())


# --- archives ---
def zip_bytes(members: dict[str, bytes], link: str | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        if link:
            info = zipfile.ZipInfo(link)
            info.external_attr = 0o120777 << 16
            zf.writestr(info, "/etc/passwd")
    return buf.getvalue()


def tar_bytes(members: dict[str, bytes], link: tuple[str, int] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        if link:
            info = tarfile.TarInfo(link[0])
            info.type, info.linkname = link[1], "/etc/passwd"
            tf.addfile(info)
    return buf.getvalue()


def test_archives_unpack_to_the_adapter_files():
    nested = {f"my_adapter/{k}": v for k, v in OLD.items()} | {"my_adapter/README.md": b"hi"}
    assert collect([("a.zip", zip_bytes(nested))], 1 << 20) == OLD
    assert collect([("a.tar.gz", tar_bytes(OLD))], 1 << 20) == OLD
    assert collect(list(OLD.items()), 1 << 20) == OLD


@pytest.mark.parametrize(
    "archive, error, words",
    [
        (("a.zip", zip_bytes({"../../evil/card.json": b"x"})), UploadError, "outside"),
        (("a.zip", zip_bytes({"/abs/card.json": b"x"})), UploadError, "outside"),
        (("a.zip", zip_bytes(OLD, link="card2.json")), UploadError, "link"),
        (("a.tar.gz", tar_bytes({"../card.json": b"x"})), UploadError, "outside"),
        (("a.tar.gz", tar_bytes(OLD, link=("x", tarfile.SYMTYPE))), UploadError, "link"),
        (("a.tar.gz", tar_bytes(OLD, link=("y", tarfile.LNKTYPE))), UploadError, "link"),
        (("a.zip", zip_bytes({"adapter_model.safetensors": bytes(5 << 20)})), UploadTooLargeError, "unpacks"),
        (("a.tar.gz", tar_bytes({"adapter_model.safetensors": bytes(5 << 20)})), UploadTooLargeError, "unpacks"),
        (("a.zip", b"PK\x03\x04 not really"), UploadError, "not a readable archive"),
        (("a.tar.gz", b"\x1f\x8b broken"), UploadError, "not a readable archive"),
        (("a.zip", zip_bytes({**OLD, "adapter_model.bin": b"pickle"})), UploadError, "pickle"),
        (("a.zip", zip_bytes({f"f{i}": b"" for i in range(100)})), UploadError, "more than"),
    ],
)
def test_bad_archives_are_refused(archive, error, words):
    with pytest.raises(error, match=words):
        collect([archive], 1 << 20)


def test_a_zip_that_lies_about_its_size_is_cut(monkeypatch):
    data = zip_bytes({"card.json": b"x" * 1000})
    real_infolist = zipfile.ZipFile.infolist

    def lying(self):
        infos = real_infolist(self)
        for i in infos:
            i.file_size = 10
        return infos

    monkeypatch.setattr(zipfile.ZipFile, "infolist", lying)
    with pytest.raises(UploadError):
        unpack_archive("a.zip", data, 1 << 20)


def test_missing_and_duplicate_files_are_refused():
    with pytest.raises(UploadError, match="missing card.json"):
        collect([(k, v) for k, v in OLD.items() if k != "card.json"], 1 << 20)
    with pytest.raises(UploadError, match="more than once"):
        collect([("a.zip", zip_bytes({**OLD, **{f"x/{k}": v for k, v in OLD.items()}}))], 1 << 20)
    with pytest.raises(UploadError, match="not both"):
        collect([("a.zip", zip_bytes(OLD)), ("card.json", b"{}")], 1 << 20)
