"""schemathesis over /openapi.json against the live app (uvicorn on loopback, a tiny model): every
phase (examples, coverage, fuzzing, stateful) and every check, response-schema conformance among
them, once over the OpenAI routes (and vLLM's tokenizer routes) with the API key and once over the admin
routes (and vLLM's LoRA routes, which take the admin token when one is set) with the token.
`positive_data_acceptance` is swapped for a twin that also takes the refusals the schema cannot
express, each by its documented param or code (tests/unit/schemathesis_hooks.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mole_serve.api.app import create_app
from mole_serve.config import Settings

from tests.unit.helpers import engine_for, live_server, served, tiny_hf_model

REPO = Path(__file__).resolve().parents[2]
API_KEY, ADMIN_TOKEN = "schemathesis-key", "schemathesis-admin"


@pytest.fixture(scope="module")
def url(tokenizer, tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    engine = engine_for(tiny_hf_model(), tokenizer, max_model_len=256, adapters_dir=store)
    roots = [tmp_path_factory.mktemp("lora-roots")]  # empty: loads by path reach the checks, then 403 or 404
    settings = Settings(api_key=API_KEY, admin_token=ADMIN_TOKEN, adapters_dir=store, lora_load_roots=roots)
    with live_server(create_app(settings, lambda: served(engine))) as url:
        yield url


LORA = "(un)?load_lora_adapter"  # under /v1


@pytest.mark.parametrize(
    "routes, token",
    [(f"^/(v1/(?!{LORA})|health|metrics|tokenize|detokenize)", API_KEY), (f"^/(admin|v1/{LORA})", ADMIN_TOKEN)],
)
def test_schemathesis_finds_nothing(url, routes, token):
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "schemathesis.cli",
            "--no-color",
            "run",
            f"{url}/openapi.json",
            "--checks",
            "all",
            "--exclude-checks",
            "positive_data_acceptance",
            "--include-path-regex",
            routes,
            "--max-examples",
            "40",
            "--request-timeout",
            "30",
            "-H",
            f"Authorization: Bearer {token}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "SCHEMATHESIS_HOOKS": "tests.unit.schemathesis_hooks", "PYTHONPATH": str(REPO)},
    )
    failures = run.stdout[run.stdout.find("FAILURES") :] if "FAILURES" in run.stdout else run.stdout[-4000:]
    assert run.returncode == 0, failures[:8000] + run.stderr[-2000:]
    assert " passed" in run.stdout and "failures" not in run.stdout.splitlines()[-1], run.stdout[-3000:]
