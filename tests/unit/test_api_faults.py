"""Faults a client can cause at the HTTP layer: non-finite numbers in a request or a response,
connections held open by slow or silent clients, credentials read after the body, a 500 that breaks
a pooled connection, fields accepted and ignored (docs/limits.md, docs/api.md)."""

from __future__ import annotations

import importlib
import json
import logging
import socket
import threading
import time
from contextlib import contextmanager

import httpx
import pytest
from fastapi.testclient import TestClient
from mole_serve.api.app import create_app
from mole_serve.api.protocol import ChatCompletionRequest, CompletionRequest
from mole_serve.config import Settings

from tests.unit.helpers import engine_for, live_server, served, tiny_hf_model

CHAT = {"model": "auto", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
JSON = {"content-type": "application/json"}


@pytest.fixture
def engine(tokenizer):
    return engine_for(tiny_hf_model(), tokenizer)


@contextmanager
def client_of(engine, **settings):
    with TestClient(create_app(Settings(**settings), lambda: served(engine))) as client:
        while client.get("/health").status_code != 200:
            threading.Event().wait(0.05)
        yield client


@contextmanager
def server_of(engine, **settings):
    """A live server (uvicorn, as `mole-serve serve` configures it); yields (host, port)."""
    with live_server(create_app(Settings(**settings), lambda: served(engine))) as url:
        host, port = url.removeprefix("http://").split(":")
        yield host, int(port)


def closed_within(conn: socket.socket, seconds: float) -> bool:
    """Whether the server closes `conn` within `seconds` (whatever it sends first is read and dropped)."""
    conn.settimeout(seconds)
    try:
        while conn.recv(65536):
            pass
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    return True


def read_response(conn: socket.socket, seconds: float) -> bytes:
    """Everything the server sends until it closes the connection."""
    conn.settimeout(seconds)
    data = b""
    while chunk := conn.recv(65536):
        data += chunk
    return data


# --- item: every float a request carries is finite; no response carries a non-finite number ---


@pytest.mark.parametrize(
    "body, param",
    [
        ('{"adapters": [{"name": "a", "weight": 1e999}]}', "adapters.0.weight"),
        ('{"adapters": [{"name": "a", "weight": Infinity}]}', "adapters.0.weight"),
        ('{"temperature": NaN}', "temperature"),
        ('{"top_p": -Infinity}', "top_p"),
        ('{"composition": "merge", "merge": {"density": NaN}}', "merge.density"),
        ('{"adapters": [{"name": "a", "weight": 1e308}, {"name": "b", "weight": 1e308}]}', "adapters"),
        (
            '{"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {"maximum": 1e999}}}}',
            "response_format.json_schema.schema",
        ),
        (
            '{"tools": [{"type": "function", "function": {"name": "f", "parameters": {"minimum": NaN}}}]}',
            "tools.0.function.parameters",
        ),
    ],
)
def test_a_non_finite_number_in_a_request_is_a_400_naming_its_field(engine, body, param):
    """Valid JSON for Python's json module (1e999 is inf, and NaN / Infinity it reads too): each
    passed `weight > 0` or `temperature <= 2` before and ran, or failed as a 500."""
    with client_of(engine) as client:
        raw = json.dumps(CHAT)[:-1] + ", " + body[1:]  # the number's text as written (json.dumps would not)
        r = client.post("/v1/chat/completions", content=raw.encode(), headers=JSON)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param and r.json()["error"]["type"] == "invalid_request_error"
        if not param.startswith(("response_format", "tools")):  # the shared fields, on completions too
            raw = '{"prompt": "hi", "max_tokens": 3, ' + body[1:]
            r = client.post("/v1/completions", content=raw.encode(), headers=JSON)
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_logprobs_of_minus_infinity_are_answered_as_the_floor(engine, monkeypatch):
    """A token the model rules out has a logprob of -inf, which JSON cannot carry: a whole answer
    failed with a 500 ("Out of range float values are not JSON compliant"), a stream sent null.
    Both now carry -9999.0, as vLLM does."""
    import mole_serve.engine.runner as runner
    from mole_serve.api.protocol import LOGPROB_FLOOR

    real = runner.logprobs_of

    def ruled_out(logits, tokens, top):
        return [
            (t, float("-inf"), tuple((a, float("-inf")) for a, _ in alts)) for t, _, alts in real(logits, tokens, top)
        ]

    monkeypatch.setattr(runner, "logprobs_of", ruled_out)
    chat = {**CHAT, "temperature": 0, "logprobs": True, "top_logprobs": 2}
    completion = {"model": "auto", "prompt": "hi there", "max_tokens": 2, "logprobs": 2, "echo": True}
    with client_of(engine) as client:
        r = client.post("/v1/chat/completions", json=chat)
        assert r.status_code == 200, r.text
        content = r.json()["choices"][0]["logprobs"]["content"]
        assert content and all(t["logprob"] == LOGPROB_FLOOR for t in content)
        assert all(a["logprob"] == LOGPROB_FLOOR for t in content for a in t["top_logprobs"])
        streamed = []
        with client.stream("POST", "/v1/chat/completions", json={**chat, "stream": True}) as s:
            for line in s.iter_lines():
                if line.startswith("data: {"):
                    choice = (json.loads(line[6:])["choices"] or [{}])[0]
                    streamed += (choice.get("logprobs") or {}).get("content", [])
        assert streamed and all(t["logprob"] == LOGPROB_FLOOR for t in streamed)
        r = client.post("/v1/completions", json=completion)
        assert r.status_code == 200, r.text
        logprobs = r.json()["choices"][0]["logprobs"]
        assert logprobs["token_logprobs"][0] is None  # the first prompt token has none
        assert all(lp == LOGPROB_FLOOR for lp in logprobs["token_logprobs"][1:])
        assert all(v == LOGPROB_FLOOR for top in logprobs["top_logprobs"][1:] for v in top.values())


# --- item: read timeouts, a connection cap, credentials before the body ---


def test_a_request_head_must_arrive_in_time(engine):
    """A connection that sends nothing, and one that trickles its headers, are closed after
    header_timeout_s; before, both stayed open for ever."""
    with server_of(engine, header_timeout_s=0.5) as address:
        with socket.create_connection(address) as silent, socket.create_connection(address) as trickler:
            start = time.perf_counter()
            trickler.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")
            try:
                for _ in range(20):  # a header line every 0.1 s: more bytes do not buy more time
                    time.sleep(0.1)
                    trickler.sendall(b"x-pad: 1\r\n")
            except (BrokenPipeError, ConnectionResetError):
                pass
            assert closed_within(trickler, 3) and closed_within(silent, 3)
            assert time.perf_counter() - start < 3


@pytest.mark.parametrize("whole", [False, True])
def test_a_request_head_over_the_size_limit_is_a_431(engine, whole):
    """httptools, uvicorn's parser when installed, read a head of any size: one still arriving
    (bounded by the HTTP server) or one whole (bounded by the gate)."""
    from mole_serve.api.gate import MAX_HEAD_BYTES

    head = b"GET /health HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * MAX_HEAD_BYTES + (b"\r\n\r\n" if whole else b"")
    with server_of(engine) as address, socket.create_connection(address) as conn:
        conn.sendall(head)
        answer = read_response(conn, 5)
        assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "headers_too_large"


def test_a_v1_body_must_arrive_whole_in_time(engine):
    """A /v1 body that stalls, or trickles, is a 408 after body_timeout_s and the connection closes;
    before, it was held (and its bytes buffered) for ever."""
    body = json.dumps({**CHAT, "messages": [{"role": "user", "content": "x" * 500}]}).encode()
    head = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
    head += b"content-length: " + str(len(body)).encode() + b"\r\n\r\n"
    with server_of(engine, body_timeout_s=0.5) as address:
        for trickle in (False, True):
            with socket.create_connection(address) as conn:
                conn.sendall(head + body[:10])
                start = time.perf_counter()
                if trickle:  # 10 bytes every 0.1 s: the body would take 5 s
                    try:
                        for i in range(10, 60, 10):
                            time.sleep(0.1)
                            conn.sendall(body[i : i + 10])
                    except (BrokenPipeError, ConnectionResetError):
                        pass
                answer = read_response(conn, 3)
                assert time.perf_counter() - start < 3
                status, _, rest = answer.partition(b"\r\n")
                assert status.startswith(b"HTTP/1.1 408"), answer
                assert b"connection: close" in rest.lower()
                assert json.loads(rest.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"


def test_an_upload_that_stops_arriving_is_a_408(engine):
    with server_of(engine, admin_token="t", body_timeout_s=0.5) as address:
        with socket.create_connection(address) as conn:
            conn.sendall(
                b"POST /admin/adapters HTTP/1.1\r\nhost: x\r\nauthorization: Bearer t\r\n"
                b"content-type: multipart/form-data; boundary=b\r\ncontent-length: 100000\r\n\r\n--b\r\n"
            )
            answer = read_response(conn, 5)
            assert answer.startswith(b"HTTP/1.1 408"), answer


def test_idle_keep_alive_connections_close_after_the_setting(engine):
    with server_of(engine, keep_alive_timeout_s=1) as address:
        with socket.create_connection(address) as conn:
            conn.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
            conn.settimeout(5)
            assert conn.recv(65536).startswith(b"HTTP/1.1 200")
            start = time.perf_counter()
            assert closed_within(conn, 4) and time.perf_counter() - start < 4


def test_requests_beyond_the_connection_cap_are_refused(engine):
    with server_of(engine, max_connections=2) as (host, port):
        with socket.create_connection((host, port)), socket.create_connection((host, port)):
            time.sleep(0.2)  # both accepted by the server
            assert httpx.get(f"http://{host}:{port}/health").status_code == 503
        time.sleep(0.2)
        assert httpx.get(f"http://{host}:{port}/health").status_code == 200


def test_credentials_are_checked_before_the_body_is_read(engine):
    """A body over the limit without a key was a 413: the body was read before the key was looked at."""
    with client_of(engine, api_key="k", max_request_mb=1) as client:
        big = {**CHAT, "messages": [{"role": "user", "content": "x" * (5 << 20)}]}
        r = client.post("/v1/chat/completions", json=big)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = client.post("/v1/chat/completions", json=big, headers={"Authorization": "Bearer k"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


# --- item: a 500 leaves a pooled client's connection usable ---


def test_a_500_closes_its_connection_cleanly_and_the_client_goes_on(engine, monkeypatch):
    """The 500 went out without `Connection: close`, then the server dropped the connection, so a
    pooled client's next request on it failed."""

    def broken(*args, **kwargs):
        raise KeyError("some internal table")

    with server_of(engine) as (host, port), httpx.Client(base_url=f"http://{host}:{port}") as client:
        for _ in range(3):
            monkeypatch.setattr(engine, "make_sequence", broken)
            r = client.post("/v1/chat/completions", json=CHAT)
            assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
            assert r.headers["connection"] == "close"
            monkeypatch.undo()
            assert client.get("/health").status_code == 200
            assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
        metrics = client.get("/metrics").text
        assert 'mole_http_requests_total{route="/v1/chat/completions",status="500"} 3.0' in metrics


# --- item: small ones ---


def test_stop_over_the_limit_says_the_limit(engine):
    with client_of(engine) as client:
        r = client.post("/v1/chat/completions", json={**CHAT, "stop": ["x"] * 100})
        error = r.json()["error"]
        assert r.status_code == 400 and error["param"] == "stop" and "up to 4 stop sequences" in error["message"]
        assert client.post("/v1/chat/completions", json={**CHAT, "stop": ["a", "b", "c", "d"]}).status_code == 200


@pytest.mark.parametrize(
    "path, fields, param",
    [
        ("/v1/chat/completions", {"modalities": ["text", "audio"]}, "modalities"),
        ("/v1/chat/completions", {"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        ("/v1/chat/completions", {"store": True}, "store"),
        ("/v1/chat/completions", {"service_tier": "priority"}, "service_tier"),
        ("/v1/chat/completions", {"reasoning_effort": "low"}, "reasoning_effort"),
        ("/v1/chat/completions", {"prediction": {"type": "content", "content": "x"}}, "prediction"),
        ("/v1/chat/completions", {"functions": [{"name": "f"}]}, "functions"),
        ("/v1/chat/completions", {"metadata": {"k": "v"}}, "metadata"),
        ("/v1/chat/completions", {"web_search_options": {}}, "web_search_options"),
        ("/v1/completions", {"suffix": "the end"}, "suffix"),
    ],
)
def test_fields_this_server_does_not_implement_are_refused(engine, path, fields, param):
    base = CHAT if path.endswith("chat/completions") else {"model": "auto", "prompt": "hi", "max_tokens": 3}
    with client_of(engine) as client:
        r = client.post(path, json={**base, **fields})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
        assert "supported" in r.json()["error"]["message"]


def test_fields_that_ask_for_nothing_are_accepted(engine):
    nothing = {"presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}}
    chat_nothing = {"modalities": ["text"], "audio": None, "store": False, "service_tier": "auto", "metadata": None}
    with client_of(engine) as client:
        r = client.post("/v1/chat/completions", json={**CHAT, **nothing, **chat_nothing, "prompt_cache_key": "k"})
        assert r.status_code == 200, r.text
        r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, **nothing, "best_of": 1})
        assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    "path, model, sdk_params",
    [
        ("/v1/chat/completions", ChatCompletionRequest, "openai.types.chat.completion_create_params"),
        ("/v1/completions", CompletionRequest, "openai.types.completion_create_params"),
    ],
)
def test_every_field_of_openais_schema_is_implemented_or_refused(path, model, sdk_params):
    """The installed SDK's request fields are each a field of ours (one that refuses what it does not
    do), so none is dropped unseen; a new SDK field fails here until it is implemented or refused."""
    sdk = importlib.import_module(sdk_params).CompletionCreateParamsBase.__annotations__
    assert sorted(set(sdk) - set(model.model_fields)) == []


def test_fields_of_neither_schema_are_ignored_with_a_log_line(engine, caplog):
    with client_of(engine) as client, caplog.at_level(logging.WARNING, logger="mole_serve.api.protocol"):
        r = client.post("/v1/chat/completions", json={**CHAT, "client_trace_id": "abc", "x" * 500: 1})
        assert r.status_code == 200, r.text
    [line] = [r.getMessage() for r in caplog.records if "ignoring fields" in r.getMessage()]
    assert "client_trace_id" in line and "x" * 64 in line and "x" * 65 not in line


@pytest.mark.parametrize(
    "authorization, accepted",
    [
        ("Bearer s", True),
        ("bearer s", True),  # the scheme is case-insensitive (RFC 9110)
        ("BEARER  s", True),
        ("s", False),  # a bare secret, no scheme
        ("Basic s", False),
        ("Bearer", False),
        ("Bearer x", False),
        (None, False),
    ],
)
def test_the_api_key_and_the_admin_token_read_the_header_alike(engine, authorization, accepted):
    headers = {"Authorization": authorization} if authorization is not None else {}
    with client_of(engine, api_key="s", admin_token="s") as client:
        v1 = client.get("/v1/models", headers=headers)
        admin = client.get("/admin/adapters", headers=headers)
        assert (v1.status_code == 200) == accepted and (admin.status_code == 200) == accepted, (v1.text, admin.text)
        if not accepted:
            assert v1.status_code == 401 and v1.json()["error"]["code"] == "invalid_api_key"
            assert admin.status_code == 401 and admin.json()["error"]["code"] == "invalid_admin_token"
