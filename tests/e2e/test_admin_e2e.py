"""The admin API against the real server on a copy of part of the library: an upload is served at
once and retrieved by `model: "auto"`; a kill -9 in the middle of uploads leaves a store that the
next start loads whole, with every upload that was answered 201."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from mole_serve.admin_client import ADAPTER_FILES, AdminClient, AdminError
from mole_serve.library.store import adapter_dirs

from tests.e2e.conftest import REPO, start_server

pytestmark = pytest.mark.e2e
LIBRARY = ("int_to_roman", "add_3digit", "reverse_letters")  # a small store starts quickly
SOURCE = REPO / "adapters_store" / "caesar_shift"  # uploaded under new names; not in the store
TOKEN = "admin-e2e-token"


class Server:
    """`mole-serve serve` on a store folder; start() again after kill() is a restart."""

    def __init__(self, store: Path, log: Path) -> None:
        self.store, self.log, self.proc, self.url = store, log, None, ""

    def start(self) -> None:
        self.proc, self.url = start_server({"MOLE_ADMIN_TOKEN": TOKEN, "MOLE_ADAPTERS_DIR": str(self.store)}, self.log)

    def kill(self) -> None:
        self.proc.kill()  # SIGKILL: no clean-up of any kind
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory, base_model_path):
    root = tmp_path_factory.mktemp("admin")
    for name in LIBRARY:
        shutil.copytree(REPO / "adapters_store" / name, root / "store" / name)
    srv = Server(root / "store", root / "server.log")
    srv.start()
    yield srv
    srv.stop()


def chat(url: str, model: str, prompt: str = "hi", max_tokens: int = 1) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/chat/completions",
        timeout=120,
        json={
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "temperature": 0,
        },
    )


def test_upload_is_served_at_once_and_retrieved_by_auto(server, tmp_path):
    admin = AdminClient(server.url, TOKEN)
    start = time.perf_counter()
    body = admin.upload(SOURCE, name="cipher-e2e")
    r = chat(server.url, "cipher-e2e")
    upload_to_served = time.perf_counter() - start
    assert r.status_code == 200 and r.json()["adapters"][0]["name"] == "cipher-e2e"
    assert body["card"]["name"] == "cipher-e2e" and body["rank"] == 8 and body["num_layers"] == 30
    assert {n["name"] for n in body["nearest"]} <= set(LIBRARY)
    print(f"upload to first served: {upload_to_served:.2f} s (load {body['load_s']:.3f} s)")
    assert upload_to_served < 60  # the benchmark measures it on a quiet machine; this only bounds a hang
    listed = subprocess.run(
        [sys.executable, "-m", "mole_serve", "adapters", "list", "--url", server.url, "--token", TOKEN],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert listed.returncode == 0, listed.stderr
    assert {a["name"] for a in json.loads(listed.stdout)} == {*LIBRARY, "cipher-e2e"}
    again = admin.upload(SOURCE, name="cipher-e2e")  # a retry of the same bytes: answered as that upload
    assert again["name"] == "cipher-e2e" and not again["replaced"]
    other = shutil.copytree(SOURCE, tmp_path / "other")
    card = json.loads((other / "card.json").read_text())
    (other / "card.json").write_text(json.dumps({**card, "description": "another adapter"}))
    with pytest.raises(AdminError) as refused:
        admin.upload(other, name="cipher-e2e")
    assert refused.value.status == 409


def test_auto_retrieves_the_upload_for_a_prompt_like_its_card(server):
    prompt = "Apply a Caesar shift of 1 to: k q z b"  # the card's phrasing, letters of its own
    r = chat(server.url, "auto", prompt, max_tokens=8)
    assert r.status_code == 200
    assert "cipher-e2e" in [a["name"] for a in r.json()["adapters"]], r.json()
    assert "cipher-e2e" in r.headers["x-mole-adapters"]


def test_a_kill_mid_upload_leaves_a_whole_store_that_the_next_start_loads(server):
    admin = AdminClient(server.url, TOKEN)
    answered: dict[str, int] = {}
    first = threading.Event()

    def upload(i: int) -> None:
        name = "cipher-e2e" if i % 4 == 0 else f"crash-{i}"  # replaces of a served adapter among new names
        try:
            admin.upload(SOURCE, name=name, replace=name == "cipher-e2e")
            answered[name] = 201
            first.set()
        except (AdminError, httpx.HTTPError):
            pass  # cut by the kill

    with ThreadPoolExecutor(3) as pool:
        for i in range(1, 16):
            pool.submit(upload, i)
        assert first.wait(120), "no upload finished"
        time.sleep(0.3)  # more uploads are in flight: reading, validating, committing, loading
        server.kill()
    stored = adapter_dirs(server.store)
    for name, folder in stored.items():  # before any recovery: every visible adapter is whole
        assert sorted(p.name for p in folder.iterdir()) == sorted(ADAPTER_FILES), name
    for name in (n for n in stored if n.startswith("crash-") or n == "cipher-e2e"):
        assert (stored[name] / "adapter_model.safetensors").read_bytes() == (
            SOURCE / "adapter_model.safetensors"
        ).read_bytes()
    assert set(answered) <= set(stored) and len(answered) < 13  # the kill did cut some of the 13 names

    server.start()  # a half adapter in the store would fail this start (every adapter is loaded)
    admin = AdminClient(server.url, TOKEN)
    names = {a["name"] for a in admin.list_all()}
    assert names == set(stored) and {*LIBRARY, "cipher-e2e"} <= names
    assert sorted(p.name for p in server.store.iterdir() if p.name.startswith(".")) == []  # recovered
    assert chat(server.url, "cipher-e2e").status_code == 200
    assert admin.delete("cipher-e2e")["deleted"] and chat(server.url, "cipher-e2e").status_code == 404
