"""vLLM's runtime LoRA routes against the real server: a shipped adapter, copied under
MOLE_LORA_LOAD_ROOTS, is loaded over plain HTTP, called by name and retrieved by `auto` through the
official `openai` client, then unloaded."""

from __future__ import annotations

import shutil

import httpx
import openai
import pytest
from mole_serve.library.store import adapter_dirs

from tests.e2e.conftest import REPO, start_server

pytestmark = pytest.mark.e2e
SOURCE = REPO / "adapters_store" / "int_to_roman"
KEY, TOKEN = "vllm-e2e-key", "vllm-e2e-admin"
ASK = [{"role": "user", "content": "quick one: write 403 in Roman numerals"}]  # one of its card's examples


@pytest.fixture(scope="module")
def server(tmp_path_factory, base_model_path):
    root = tmp_path_factory.mktemp("vllm-routes")
    shutil.copytree(SOURCE, root / "loras" / "roman")
    env = {
        "MOLE_API_KEY": KEY,
        "MOLE_ADMIN_TOKEN": TOKEN,
        "MOLE_ADAPTERS_DIR": str(root / "store"),  # empty: the load brings the only adapter
        "MOLE_LORA_LOAD_ROOTS": str(root / "loras"),
    }
    proc, url = start_server(env, root / "server.log")
    try:
        yield url, root
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_loaded_adapter_is_called_by_name_then_unloaded(server):
    url, root = server
    admin = {"Authorization": f"Bearer {TOKEN}"}
    body = {"lora_name": "roman-e2e", "lora_path": str(root / "loras" / "roman")}
    r = httpx.post(f"{url}/v1/load_lora_adapter", headers=admin, json=body, timeout=120)
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'roman-e2e' added successfully."

    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY)
    assert "roman-e2e" in [m.id for m in client.models.list()]
    named = client.chat.completions.create(model="roman-e2e", messages=ASK, max_tokens=8, temperature=0)
    assert named.model == "roman-e2e" and named.model_extra["adapters"][0]["name"] == "roman-e2e"
    retrieved = client.chat.completions.create(model="auto", messages=ASK, max_tokens=8, temperature=0)
    assert retrieved.model_extra["adapters"][0]["name"] == "roman-e2e"

    r = httpx.post(f"{url}/v1/unload_lora_adapter", headers=admin, json={"lora_name": "roman-e2e"}, timeout=60)
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'roman-e2e' removed successfully."
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="roman-e2e", messages=ASK, max_tokens=1)
    assert not adapter_dirs(root / "store") and (root / "loras" / "roman" / "card.json").is_file()
