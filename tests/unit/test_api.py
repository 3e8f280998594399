"""HTTP layer on a tiny random model: protocol parsing, error mapping, readiness, queue limits."""

import asyncio
import threading

import pytest
from fastapi.testclient import TestClient
from mole_serve.api.app import create_app
from mole_serve.api.protocol import ChatCompletionRequest, CompletionRequest
from mole_serve.config import Settings
from mole_serve.engine.async_engine import AsyncEngine, QueueFullError
from mole_serve.engine.request import SamplingParams
from mole_serve.errors import ReplicaLost

from tests.unit.helpers import engine_for, live_server, served, tiny_hf_model

CHAT = {"model": "auto", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


def test_protocol_parsing():
    req = ChatCompletionRequest.model_validate(
        {
            "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
            "stop": "x",
            "adapters": ["a", {"name": "b", "weight": 2}],
            "user": "ignored",
            "unknown_field": 1,
        }
    )
    assert req.model == "auto" and req.messages[0].text() == "ab" and req.stop_list() == ("x",)
    assert [(c.name, c.weight) for c in req.adapter_choices()] == [("a", 1.0), ("b", 2.0)]
    assert req.token_limit() is None
    assert ChatCompletionRequest.model_validate({**CHAT, "max_completion_tokens": 7}).token_limit() == 7
    assert CompletionRequest.model_validate({"prompt": ["p", "q"]}).prompts() == ["p", "q"]
    assert CompletionRequest.model_validate({"prompt": "p"}).token_limit() == 16


@pytest.fixture(scope="module")
def tiny_engine(tokenizer):
    return lambda **kw: engine_for(tiny_hf_model(), tokenizer, **kw)


def test_error_kinds_map_through_one_table():
    from mole_serve.api.errors import APIError
    from mole_serve.errors import AdapterNotFound, EngineFailure, InvalidRequest, MoleError, Overloaded
    from mole_serve.library.store import AdapterExistsError
    from mole_serve.library.upload import InvalidAdapterError, UploadError, UploadTooLargeError

    cases = [
        (InvalidRequest("x", "top_k"), 400),
        (AdapterNotFound("x"), 404),
        (AdapterExistsError("x"), 409),
        (UploadError("x"), 400),
        (UploadTooLargeError("x"), 413),
        (InvalidAdapterError("x"), 422),
        (Overloaded("x"), 429),
        (ReplicaLost("x"), 503),
        (EngineFailure("x"), 500),
        (MoleError("x"), 500),
    ]
    for error, status in cases:
        mapped = APIError.of(error)
        assert mapped.status == status and mapped.message == "x", error
    assert APIError.of(InvalidRequest("x", "top_k")).body()["error"]["param"] == "top_k"
    assert APIError.of(Overloaded("x")).headers == {"Retry-After": "1"}


def test_a_key_error_from_a_bug_is_a_500_not_a_404(tiny_engine, monkeypatch):
    engine = tiny_engine()

    def broken(*args, **kwargs):
        raise KeyError("some internal table")

    monkeypatch.setattr(engine, "make_sequence", broken)
    with TestClient(create_app(Settings(), lambda: served(engine)), raise_server_exceptions=False) as client:
        while client.get("/health").status_code != 200:
            threading.Event().wait(0.05)
        r = client.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"


def test_not_ready_is_503_then_ready(tiny_engine):
    release = threading.Event()

    def slow_load():
        release.wait(30)
        return served(tiny_engine())

    with TestClient(create_app(Settings(), slow_load)) as client:
        assert client.get("/health").status_code == 503
        r = client.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
        release.set()
        for _ in range(200):
            if client.get("/health").status_code == 200:
                break
            threading.Event().wait(0.05)
        r = client.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_error_mapping(tiny_engine):
    settings = Settings(api_key="k", max_model_len=128)
    with TestClient(create_app(settings, lambda: served(tiny_engine(max_model_len=128)))) as client:
        while client.get("/health").status_code != 200:
            threading.Event().wait(0.05)
        auth = {"Authorization": "Bearer k"}
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 401
        assert client.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer x"}).status_code == 401
        cases = [
            ({**CHAT, "model": "missing"}, 404, "model_not_found"),
            ({**CHAT, "max_tokens": 500}, 400, "context_length_exceeded"),
            ({**CHAT, "stop": ["a", "b", "c", "d", "e"]}, 400, None),
            ({**CHAT, "composition": "gate"}, 400, None),  # no trained gate on this server
            ({**CHAT, "model": "missing", "adapters": ["nope"]}, 404, "model_not_found"),
            ({**CHAT, "adapters": ["nope"]}, 404, "adapter_not_found"),
            ({**CHAT, "merge": {"strategy": "svd"}}, 400, None),
            ({**CHAT, "retrieval_top_k": 99}, 400, None),
            ({"model": "auto"}, 400, None),
        ]
        for body, status, code in cases:
            r = client.post("/v1/chat/completions", json=body, headers=auth)
            assert r.status_code == status, (body, r.text)
            assert r.json()["error"]["code"] == code and r.json()["error"]["message"]
        r = client.get("/v1/nowhere", headers=auth)
        assert r.status_code == 404 and "error" in r.json()
        r = client.get("/v1/chat/completions", headers=auth)
        assert r.status_code == 405 and r.headers["allow"] == "POST" and "error" in r.json()
        assert client.get("/health").status_code == 200  # still serving


def test_a_405_allows_every_method_of_its_path(tiny_engine):
    engine = tiny_engine()
    with TestClient(create_app(Settings(admin_token="t"), lambda: served(engine))) as client:
        r = client.request("OPTIONS", "/admin/adapters/x", headers={"Authorization": "Bearer t"})
        assert r.status_code == 405 and r.headers["allow"] == "DELETE, GET, PATCH"
        assert client.put("/admin/adapters", headers={"Authorization": "Bearer t"}).headers["allow"] == "GET, POST"


def test_queue_full_is_refused_at_submission(tiny_engine):
    async def main():
        aeng = AsyncEngine(tiny_engine(max_num_seqs=1), max_waiting=1)
        aeng.start()
        try:
            params = SamplingParams(max_tokens=50, ignore_eos=True)
            streams = [aeng.generate([5, 6, 7], params) for _ in range(2)]  # one running, one waiting
            with pytest.raises(QueueFullError):
                aeng.generate([5, 6, 7], params)
            for s in streams:  # never read: closing still frees their places
                await s.aclose()
            assert aeng.num_pending == 0
            aeng.generate([5, 6, 7], params).close()
            for _ in range(100):
                if not aeng.engine.has_unfinished():
                    break
                await asyncio.sleep(0.02)
            assert not aeng.engine.has_unfinished() and aeng.engine.scheduler.blocks.num_used == 0
        finally:
            aeng.shutdown()

    asyncio.run(main())


def test_a_lagging_reader_gets_every_queued_output_at_once(tiny_engine):
    async def main():
        aeng = AsyncEngine(tiny_engine())
        aeng.start()
        try:
            stream = aeng.generate([5, 6, 7], SamplingParams(max_tokens=6, ignore_eos=True))
            while stream.queue.qsize() < 6:  # the reader lags: every token is queued
                await asyncio.sleep(0.01)
            outs = await stream.next_outputs()
            assert [o.num_output_tokens for o in outs] == [1, 2, 3, 4, 5, 6] and outs[-1].finished
            assert stream.finished and aeng.num_pending == 0
        finally:
            aeng.shutdown()

    asyncio.run(main())


def test_queue_full_is_429_with_retry_after(tiny_engine):
    settings = Settings(max_num_seqs=1, max_waiting=1)
    with TestClient(create_app(settings, lambda: served(tiny_engine(max_num_seqs=1, max_waiting=1)))) as client:
        while client.get("/health").status_code != 200:
            threading.Event().wait(0.05)
        aeng = client.app.state.engine
        long = SamplingParams(max_tokens=100, ignore_eos=True)
        # Two requests fill the running batch and the waiting queue; close them from the app's loop.
        streams = client.portal.call(lambda: _submit(aeng, long, 2))
        r = client.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "rate_limit_error"
        client.portal.call(lambda: _close(streams))
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 200


async def _submit(aeng, params, n):
    return [aeng.generate([5, 6, 7], params) for _ in range(n)]


async def _close(streams):
    for s in streams:
        await s.aclose()


def test_adapter_metric_labels_are_bounded():
    from mole_serve.api.metrics import Metrics

    metrics = Metrics(adapter_label_limit=2)
    for name in ["a", "b", "c", "a", "d"]:
        metrics.count_adapter(name)
    samples = {
        s.labels["adapter"]: s.value for s in metrics.adapter_requests.collect()[0].samples if s.name.endswith("_total")
    }
    assert samples == {"a": 2.0, "b": 1.0, "other": 2.0}


def test_lone_surrogates_are_a_400_and_the_connection_stays_usable(tiny_engine):
    """Valid JSON, invalid Unicode: in a message, a prompt, the model field; never a 500."""
    with TestClient(create_app(Settings(), lambda: served(tiny_engine()))) as client:
        while client.get("/health").status_code != 200:
            threading.Event().wait(0.05)
        bad = [
            ("/v1/chat/completions", '{"model": "auto", "messages": [{"role": "user", "content": "\\ud800 x"}]}'),
            ("/v1/chat/completions", '{"model": "\\udfff", "messages": [{"role": "user", "content": "hi"}]}'),
            ("/v1/completions", '{"model": "auto", "prompt": ["ok", "\\ud83d"]}'),
        ]
        for path, body in bad:
            r = client.post(path, content=body.encode(), headers={"content-type": "application/json"})
            assert r.status_code == 400 and "surrogate" in r.json()["error"]["message"], r.text
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 200


def test_models_retrieve_each_listed_id(tiny_engine):
    with TestClient(create_app(Settings(), lambda: served(tiny_engine()))) as client:
        while client.get("/health").status_code != 200:
            threading.Event().wait(0.05)
        listed = client.get("/v1/models").json()["data"]
        for card in listed:
            r = client.get(f"/v1/models/{card['id']}")
            assert r.status_code == 200 and r.json()["id"] == card["id"] and r.json()["parent"] == card["parent"]
        r = client.get("/v1/models/nope")
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_a_body_over_the_limit_is_a_413_before_it_is_parsed(tiny_engine):
    with TestClient(create_app(Settings(max_request_mb=0.01), lambda: served(tiny_engine()))) as client:
        while client.get("/health").status_code != 200:
            threading.Event().wait(0.05)
        big = {**CHAT, "messages": [{"role": "user", "content": "x" * 20_000}]}
        r = client.post("/v1/chat/completions", json=big)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

        def chunks():  # no Content-Length: counted as it arrives
            yield b'{"model": "auto", "messages": [{"role": "user", "content": "'
            for _ in range(30):
                yield b"y" * 1000
            yield b'"}]}'

        r = client.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 200


def test_a_prompt_too_long_by_its_characters_is_refused_before_tokenizing(tiny_engine, monkeypatch):
    engine = tiny_engine(max_model_len=128)
    real = engine.tokenizer.apply_chat_template

    def guarded(messages, **kwargs):
        assert sum(len(m["content"]) for m in messages) < 100_000, "a hopeless prompt reached the tokenizer"
        return real(messages, **kwargs)

    monkeypatch.setattr(engine.tokenizer, "apply_chat_template", guarded)
    with TestClient(create_app(Settings(), lambda: served(engine))) as client:
        while client.get("/health").status_code != 200:
            threading.Event().wait(0.05)
        long = {**CHAT, "messages": [{"role": "user", "content": "word " * 200_000}]}
        r = client.post("/v1/chat/completions", json=long)
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        r = client.post("/v1/completions", json={"model": "auto", "prompt": ["ok", "word " * 200_000]})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 200


def test_a_departed_non_streaming_client_frees_its_place(tiny_engine, monkeypatch):
    """A real server on loopback: the client sends a long non-streaming request and closes its
    socket; the request ends within a few steps instead of generating to max_tokens."""
    import socket
    import time

    engine = tiny_engine(max_model_len=256)
    step = engine.step

    def slow_step():  # 20 ms a step: 200 tokens would take 4 s
        time.sleep(0.02)
        return step()

    monkeypatch.setattr(engine, "step", slow_step)
    with live_server(create_app(Settings(), lambda: served(engine))) as url:
        deadline = time.perf_counter() + 60
        body = (
            b'{"model": "auto", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 200, "ignore_eos": true}'
        )
        with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as conn:
            conn.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
            )
            while not engine.has_unfinished():
                assert time.perf_counter() < deadline, "the request never reached the engine"
                time.sleep(0.01)
        gone = time.perf_counter()
        while engine.has_unfinished() and time.perf_counter() - gone < 2.0:
            time.sleep(0.02)
        assert not engine.has_unfinished(), "the request ran on after its client left"


class DiesAfter:
    """A request's outputs that break off after `n` of them, as a Ray replica's do when its process
    dies (deploy.RemoteStream raises ReplicaLost then)."""

    def __init__(self, stream, n: int) -> None:
        self.stream, self.n = stream, n

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.n == 0:
            self.stream.close()
            raise ReplicaLost("the engine replica failed mid-request")
        self.n -= 1
        return await self.stream.__anext__()

    def close(self) -> None:
        self.stream.close()


def ttft_count(client) -> float:
    line = next(
        line
        for line in client.get("/metrics").text.splitlines()
        if line.startswith("mole_time_to_first_token_seconds_count")
    )
    return float(line.split()[-1])


@pytest.mark.parametrize("deaths", [1, 2, 3])
def test_a_non_streamed_request_whose_replica_dies_mid_way_runs_again(tiny_engine, deaths):
    """Nothing of a non-streamed answer was sent when its replica died: the request runs again from
    the start (RESENDS times), and the answer is the undisturbed one; after that it is a 503."""
    from mole_serve.api.serving import RESENDS

    body = {**CHAT, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    with TestClient(create_app(Settings(), lambda: served(tiny_engine()))) as client:
        while client.get("/health").status_code != 200:
            threading.Event().wait(0.05)
        undisturbed = client.post("/v1/chat/completions", json=body).json()
        engine = client.app.state.engine
        generate, calls = engine.generate, []

        def dying_generate(*args, **kwargs):
            calls.append(1)
            stream = generate(*args, **kwargs)
            return DiesAfter(stream, 3) if len(calls) <= deaths else stream

        engine.generate = dying_generate
        ttft_before = ttft_count(client)
        r = client.post("/v1/chat/completions", json=body)
        assert len(calls) == min(deaths, RESENDS) + 1
        assert ttft_count(client) == ttft_before + 1  # one request, one first token, whatever the resends
        if deaths <= RESENDS:
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"] == undisturbed["choices"][0]["message"]
            assert r.json()["usage"] == undisturbed["usage"]
        else:
            assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"
        engine.generate = generate
        assert client.post("/v1/chat/completions", json=body).status_code == 200


def test_a_stream_whose_replica_dies_ends_with_an_error_event(tiny_engine):
    """A started stream cannot run again: after the text already sent comes an event in the OpenAI
    error shape (the openai client raises it), and no [DONE]."""
    import json

    with TestClient(create_app(Settings(), lambda: served(tiny_engine()))) as client:
        while client.get("/health").status_code != 200:
            threading.Event().wait(0.05)
        engine = client.app.state.engine
        generate = engine.generate
        engine.generate = lambda *args, **kwargs: DiesAfter(generate(*args, **kwargs), 3)
        r = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 8, "ignore_eos": True, "stream": True})
        events = [line.removeprefix("data: ") for line in r.text.splitlines() if line.startswith("data: ")]
        assert r.status_code == 200 and "[DONE]" not in events
        assert json.loads(events[-1])["error"]["type"] == "server_error"
        assert any(json.loads(e).get("choices") for e in events[:-1])  # what was generated before went out


def test_validation_is_strict_where_openai_is_and_names_the_field(tiny_engine):
    with TestClient(create_app(Settings(), lambda: served(tiny_engine()))) as client:
        while client.get("/health").status_code != 200:
            threading.Event().wait(0.05)
        image = [{"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": "x"}}]
        cases = [
            ({**CHAT, "stream": "yes"}, "stream", None),
            ({**CHAT, "messages": [{"role": "user", "content": image}]}, "messages.0.content", None),
            ({**CHAT, "adapters": [{"name": "a", "weight": 0}]}, "adapters.0.weight", None),
            ({**CHAT, "logprobs": 0}, "logprobs", None),
            ({**CHAT, "model": "nope"}, "model", "model_not_found"),
        ]
        for body, param, code in cases:
            r = client.post("/v1/chat/completions", json=body)
            error = r.json()["error"]
            assert r.status_code == (404 if code else 400) and error["param"] == param, (body, error)
            assert error["type"] == "invalid_request_error" and error["code"] == code, error
        assert "image_url" in client.post("/v1/chat/completions", json=cases[1][0]).json()["error"]["message"]
        assert client.post("/v1/completions", json={"prompt": "a", "echo": "no"}).status_code == 400


def test_openapi_documents_the_errors_and_media_types_the_server_sends(tiny_engine):
    from mole_serve.api.protocol import ErrorResponse

    with TestClient(create_app(Settings(), lambda: served(tiny_engine()))) as client:
        while client.get("/health").status_code != 200:
            threading.Event().wait(0.05)
        schema = client.get("/openapi.json").json()
        chat = schema["paths"]["/v1/chat/completions"]["post"]["responses"]
        assert "422" not in chat and chat["400"]["content"]["application/json"]["schema"]["$ref"].endswith(
            "/ErrorResponse"
        )
        r = client.post("/v1/chat/completions", json={**CHAT, "stream": "yes"})  # a validation failure
        assert r.status_code == 400 and ErrorResponse.model_validate(r.json())
        metrics = schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
        assert list(metrics) == ["text/plain"] and client.get("/metrics").headers["content-type"].startswith(
            "text/plain"
        )
        admin = schema["paths"]["/admin/adapters"]["post"]["responses"]
        assert {"401", "409", "413", "422"} <= set(admin)
        patch = schema["paths"]["/admin/adapters/{name}"]["patch"]["requestBody"]["content"]["application/json"]
        assert set(patch["schema"]["properties"]) == {"description", "examples"}
