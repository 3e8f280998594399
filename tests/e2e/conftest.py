"""A real server (SmolLM2 + adapters_store/) started as a subprocess on a free port."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

API_KEY = "test-key"
REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(env: dict[str, str], log: Path) -> tuple[subprocess.Popen, str]:
    """`mole-serve serve` on a free port with `env` on top of the test defaults, its output appended
    to `log`; returns (process, url) once /health answers 200."""
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MOLE_MAX_NUM_SEQS": "16", "MOLE_MAX_MODEL_LEN": "1024", **env}
    with open(log, "a") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mole_serve", "serve", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    try:
        while time.time() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    return proc, url
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError(log.read_text()[-3000:])
    except BaseException:
        proc.terminate()
        proc.wait(timeout=30)
        raise


@pytest.fixture(scope="session")
def server(base_model_path, tmp_path_factory):
    proc, url = start_server({"MOLE_API_KEY": API_KEY}, tmp_path_factory.mktemp("server") / "server.log")
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
