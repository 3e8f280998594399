"""Property test over the admin and OpenAI routes: whatever arrives, the answer is never a 5xx and
the server keeps serving. Bodies are random JSON, near-valid requests with random field values,
and multipart uploads mixing valid adapter files, mutated ones and junk."""

from __future__ import annotations

import json
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.test_admin_api import AUTH, admin_client
from tests.unit.test_admin_api import files as files  # noqa: F401  (the module fixture)
from tests.unit.test_admin_api import hf as hf  # noqa: F401
from tests.unit.test_store import tar_bytes, zip_bytes

JSON = "application/json"
FUZZ = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12)
json_values = st.recursive(
    scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3), max_leaves=8
)
names = st.sampled_from(["alpha", "auto", "base", "missing", "", "../x", "A b"]) | st.text(max_size=70)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant", "developer"]), "content": st.text(max_size=40)}
    ),
    min_size=1,
    max_size=3,
)
sampling = {  # plausible values of every field the OpenAI routes read; one of them may then go wild
    "model": st.sampled_from(["auto", "alpha", "base"]),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0.01, 1),
    "seed": st.integers(0, 2**64),
    "stop": st.lists(st.text(max_size=3), max_size=4),
    "stream": st.booleans(),
    "adapters": st.lists(
        st.sampled_from(["alpha"]) | st.fixed_dictionaries({"name": st.just("alpha"), "weight": st.floats(0.1, 2)}),
        max_size=2,
    ),
    "retrieval_top_k": st.integers(1, 4),
    "top_k": st.integers(-1, 60),
    "min_p": st.floats(0, 1),
    "frequency_penalty": st.floats(-2, 2),
    "presence_penalty": st.floats(-2, 2),
    "repetition_penalty": st.floats(0.1, 3),
    "logit_bias": st.dictionaries(st.integers(0, 60000).map(str), st.floats(-100, 100), max_size=3),
    "min_tokens": st.integers(0, 8),
    "stop_token_ids": st.lists(st.integers(0, 60000), max_size=3),
    "composition": st.sampled_from(["mixture", "select"]),
    "ignore_eos": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "n": st.just(1),
}
# max_tokens is always given and small, so a valid request generates a few tokens, not a context window
chat_bodies = st.fixed_dictionaries({"max_tokens": st.integers(1, 6), "messages": messages}, optional=sampling)
completion_bodies = st.fixed_dictionaries(
    {
        "max_tokens": st.integers(1, 6),
        "prompt": st.text(max_size=40) | st.lists(st.text(max_size=9), min_size=1, max_size=3),
    },
    optional={**sampling, "echo": st.booleans()},
)


def spoil(data, body: dict) -> dict:
    """Maybe give one field (or an unknown one) an arbitrary JSON value."""
    if data.draw(st.integers(0, 2)):
        return body
    field = data.draw(st.sampled_from(sorted(body) + ["merge", "logprobs", "n", "x"]))
    return {**body, field: data.draw(json_values)}


@pytest.fixture(scope="module")
def fuzz_client(hf, tokenizer, files, tmp_path_factory):  # noqa: F811
    with admin_client(hf, tokenizer, tmp_path_factory.mktemp("store")) as client:
        assert (
            client.post("/admin/adapters", headers=AUTH, files=[("files", kv) for kv in files.items()]).status_code
            == 201
        )
        yield client


def check(response) -> None:
    assert response.status_code < 500, response.text[:500]
    if response.status_code >= 400 and response.headers.get("content-type", "").startswith("application/json"):
        assert response.json()["error"]["message"]


@FUZZ
@given(route=st.sampled_from(["/v1/chat/completions", "/v1/completions"]), data=st.data())
def test_openai_routes_never_answer_5xx(fuzz_client, route, data):
    body = spoil(data, data.draw(chat_bodies if route.endswith("chat/completions") else completion_bodies))
    if data.draw(st.integers(0, 9)) == 0:
        body = data.draw(json_values)
    check(fuzz_client.post(route, content=json.dumps(body, allow_nan=True), headers={"content-type": JSON}))


def upload_parts(data, valid: dict[str, bytes]) -> list[tuple[str, bytes]]:
    """The valid adapter files with one thing wrong (or nothing): a file dropped, renamed, cut,
    a byte changed, its JSON replaced, junk added, or all of it packed in an archive."""
    files = dict(valid)
    which = data.draw(st.sampled_from(sorted(files)))
    change = data.draw(st.sampled_from(["none", "drop", "rename", "cut", "byte", "json", "extra", "zip", "tar"]))
    if change == "drop":
        del files[which]
    elif change == "rename":
        files[data.draw(st.text(min_size=1, max_size=20) | st.just("adapter_model.bin"))] = files.pop(which)
    elif change in ("cut", "byte"):
        i = data.draw(st.integers(0, len(files[which]) - 1))
        files[which] = files[which][:i] + (
            bytes([data.draw(st.integers(0, 255))]) + files[which][i + 1 :] if change == "byte" else b""
        )
    elif change == "json":
        files[which] = json.dumps(data.draw(json_values), allow_nan=True).encode()
    elif change == "extra":
        files[data.draw(st.text(min_size=1, max_size=20))] = data.draw(st.binary(max_size=100))
    elif change in ("zip", "tar"):
        return [(f"a.{'zip' if change == 'zip' else 'tar.gz'}", (zip_bytes if change == "zip" else tar_bytes)(files))]
    return list(files.items())


@FUZZ
@given(data=st.data())
def test_admin_routes_never_answer_5xx(fuzz_client, files, data):  # noqa: F811
    method = data.draw(st.sampled_from(["POST", "POST", "GET", "PATCH", "DELETE", "PUT"]))
    name = data.draw(names)
    query = data.draw(
        st.dictionaries(
            st.sampled_from(["offset", "limit", "replace", "x"]),
            st.sampled_from(["0", "1", "true", "false"]) | st.integers(-3, 600) | st.text(max_size=5),
            max_size=2,
        )
    )
    one = f"/admin/adapters/{quote(name, safe='')}"
    path = "/admin/adapters" if method == "POST" or method == "GET" and data.draw(st.booleans()) else one
    kwargs: dict = {"headers": AUTH}
    if method == "POST" and data.draw(st.integers(0, 4)):
        kwargs["files"] = [("files", kv) for kv in upload_parts(data, files)]
        kwargs["data"] = {"name": name} if data.draw(st.booleans()) else None
    elif method in ("POST", "PATCH"):
        examples = st.lists(st.text(min_size=1, max_size=20), min_size=4, max_size=7) | json_values
        body = data.draw(
            st.fixed_dictionaries(
                {}, optional={"description": st.text(max_size=20) | json_values, "examples": examples}
            )
            | json_values
        )
        kwargs["content"] = json.dumps(body, allow_nan=True)
        kwargs["headers"] = {**AUTH, "content-type": JSON}
    check(fuzz_client.request(method, path, params=query, **kwargs))
    check(fuzz_client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1}))  # still serving


@pytest.mark.parametrize(
    "route, body",
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "seed": 2**64}),
        ("/v1/completions", {"prompt": [], "max_tokens": 1}),
    ],
)
def test_once_found_5xx_are_4xx(fuzz_client, route, body):
    check(fuzz_client.post(route, json=body))


@pytest.fixture(scope="module")
def keyed_client(hf, tokenizer, tmp_path_factory):  # noqa: F811
    with admin_client(hf, tokenizer, tmp_path_factory.mktemp("keyed"), api_key="k") as client:
        yield client


@FUZZ
@given(
    path=st.sampled_from(["/v1/models", "/admin/adapters", "/admin/adapters/alpha"]),
    auth=st.text(st.characters(min_codepoint=32, max_codepoint=255, exclude_characters="\x7f"), max_size=24),
)
def test_any_authorization_header_is_4xx_or_accepted(keyed_client, path, auth):
    check(keyed_client.get(path, headers={"Authorization": auth.encode("latin-1")}))
