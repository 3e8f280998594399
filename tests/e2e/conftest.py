"""A real server (SmolLM2 + adapters_store/) started as a subprocess on a free port."""

import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

API_KEY = "test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def server(base_model_path, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MOLE_API_KEY": API_KEY, "MOLE_MAX_NUM_SEQS": "16",
           "MOLE_MAX_MODEL_LEN": "1024"}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "server", "serve", "--port", str(port)], env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            raise TimeoutError(log.read_text()[-3000:])
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
