"""What test_deploy.py checks, run in a child process inside its own network namespace: a real
local Ray cluster with 2 engine replicas of the real SmolLM2-135M, driven over HTTP by the official
openai client, compared with the single-process app on the same store. Writes its observations
as JSON to argv[1]; the test asserts on them."""

from __future__ import annotations

import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import ray
import torch
from fastapi.testclient import TestClient
from mole_serve.api.app import create_app
from mole_serve.compose import build
from mole_serve.config import Settings
from mole_serve.deploy import APP_NAME, ENGINE_NAME, build_app
from mole_serve.engine.loader import resolve_base_model
from ray import serve
from transformers import AutoModelForCausalLM

from tests.unit.helpers import make_adapter

TOPICS = {  # adapter -> the words of its card's examples (retrieval tells them apart)
    "roman": "convert the roman numeral {} to decimal",
    "weather": "what is the weather forecast for city {} tomorrow",
    "sql": "write an sql query selecting rows where id equals {}",
    "poem": "write a short poem about the number {}",
}
NEW = ("chess", "suggest a chess opening for move {} of the game")
PORT = 8765
LONG_TOKENS = 80  # a long answer, so that a replica can be killed while it generates
TOKEN = "ray-test"


def card(name: str, pattern: str) -> dict:
    return {"name": name, "description": pattern.format("N"), "examples": [pattern.format(i) for i in range(6)]}


def make_store(root: Path) -> tuple[Settings, Path]:
    """A store of 4 random LoRAs over the real SmolLM2-135M, and a 5th adapter folder to upload."""
    base = str(resolve_base_model(Settings()))
    hf = AutoModelForCausalLM.from_pretrained(base)
    for seed, (name, pattern) in enumerate(TOPICS.items()):
        make_adapter(hf, root / "store" / name, seed=10 + seed)
        (root / "store" / name / "card.json").write_text(json.dumps(card(name, pattern)))
    upload = make_adapter(hf, root / "upload" / NEW[0], seed=99)
    (upload / "card.json").write_text(json.dumps(card(*NEW)))
    settings = Settings(
        base_model=base,
        adapters_dir=root / "store",
        admin_token=TOKEN,
        max_model_len=128,
        max_num_seqs=8,
        max_prefill_tokens=64,
        max_loras=4,
        host="127.0.0.1",
        port=PORT,
    )
    return settings, upload


def chat(client: openai.OpenAI, model: str, text: str, **kw):
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": text}], **{"max_tokens": 6, "temperature": 0, **kw}
    )


def single_server(settings: Settings, asks: list[tuple[str, str]]) -> tuple[list[str], dict, dict]:
    """The answers, a 404 body and a 400 body of the one-process app over the same store."""
    with TestClient(create_app(settings, lambda: build(settings))) as c:
        while c.get("/health").status_code != 200:
            time.sleep(0.05)
        texts = [
            c.post(
                "/v1/chat/completions",
                json={"model": m, "max_tokens": 6, "temperature": 0, "messages": [{"role": "user", "content": t}]},
            ).json()["choices"][0]["message"]["content"]
            for m, t in asks
        ]
        missing = c.post("/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": "x"}]})
        bad = c.post("/v1/chat/completions", json={"model": "auto", "temperature": 9, "messages": []})
        return texts, {"status": missing.status_code, **missing.json()}, {"status": bad.status_code, **bad.json()}


def usage_by_replica(engine) -> dict[str, dict[str, int]]:
    return {rid: usage for rid, _, usage in engine.broadcast("stats").results()}


def running_replicas() -> int:
    states = serve.status().applications[APP_NAME].deployments[ENGINE_NAME].replica_states
    return states.get("RUNNING", 0)


def kill_a_replica(client: openai.OpenAI, engine, ask: tuple[str, str]) -> dict:
    """Kill the process of the replica that holds `ask`'s adapter while it generates 4 long
    non-streamed answers, then send the short request 8 times at once. No request is lost: the
    ingress resends one whose replica died before its first output, and the app runs a non-streamed
    one again when its replica died mid-way (nothing of it was sent). Then wait for Ray to bring the
    deployment back to 2 replicas."""
    model, text = ask
    long_answer = {"max_tokens": LONG_TOKENS, "extra_body": {"ignore_eos": True}}
    undisturbed = answer_or_error(client, model, text, **long_answer)
    holder = next(rid for rid, names in usage_by_replica(engine).items() if names.get(model))
    actor = next(
        a
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith("SERVE_REPLICA") and holder in a["name"]
    )
    with ThreadPoolExecutor(12) as pool:
        longs = [pool.submit(answer_or_error, client, model, text, **long_answer) for _ in range(4)]
        deadline, running = time.monotonic() + 30, 0
        while not running and time.monotonic() < deadline:
            running = next(stats.running for rid, stats, _ in engine.broadcast("stats").results() if rid == holder)
        ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
        results = list(pool.map(lambda _: answer_or_error(client, *ask), range(8)))
        long_results = [f.result() for f in longs]
    deadline, back = time.monotonic() + 60, set()
    while time.monotonic() < deadline:  # this handle may still list the dead replica for a while
        found = engine.broadcast("adapters").results(return_exceptions=True)
        back = {r[0] for r in found if not isinstance(r, BaseException)}
        if running_replicas() == 2 and len(back) == 2:
            break
        time.sleep(0.5)
    return {
        "results": results,
        "running_at_kill": running,
        "long_results": long_results,
        "long_undisturbed": undisturbed,
        "replicas_after": running_replicas(),
        "new_replica": holder not in back,
        "after_recovery": answer_or_error(client, *ask),
    }


def answer_or_error(client: openai.OpenAI, model: str, text: str, **kw) -> str:
    try:
        return chat(client, model, text, **kw).choices[0].message.content
    except openai.APIError as e:
        return f"error: {type(e).__name__}: {e}"


def main(out: Path) -> None:
    torch.set_num_threads(1)
    settings, upload_dir = make_store(out.parent)
    asks = [
        ("roman", "convert the roman numeral XIV"),
        ("auto", "what is the weather forecast for city 7 tomorrow"),
        ("auto", "write an sql query selecting rows where id equals 3"),
    ]
    expected, missing_single, bad_single = single_server(settings, asks)
    seen: dict = {"expected": expected, "missing_single": missing_single, "bad_single": bad_single}

    start = time.perf_counter()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    serve.run(build_app(settings, replicas=2, replica_cpus=1), name=APP_NAME, route_prefix="/")
    seen["startup_s"] = time.perf_counter() - start
    url = f"http://127.0.0.1:{PORT}"
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    engine = serve.get_deployment_handle(ENGINE_NAME, APP_NAME)
    try:
        seen["texts"] = [chat(client, m, t).choices[0].message.content for m, t in asks]
        streamed = chat(client, "roman", asks[0][1], stream=True)
        seen["streamed"] = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
        missing = httpx.post(
            f"{url}/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": "x"}]}
        )
        bad = httpx.post(f"{url}/v1/chat/completions", json={"model": "auto", "temperature": 9, "messages": []})
        seen["missing"] = {"status": missing.status_code, **missing.json()}
        seen["bad"] = {"status": bad.status_code, **bad.json()}
        try:
            chat(client, "nope", "x")
        except openai.NotFoundError as e:
            seen["openai_error"] = {"type": type(e).__name__, "code": e.code}

        # affinity: spaced requests (routers learn a replica's ids every 0.1 s); warm-up, then measured
        for name in TOPICS:
            chat(client, name, f"{TOPICS[name].format(1)}")
            time.sleep(0.3)
        before = usage_by_replica(engine)
        for _ in range(3):
            for name in TOPICS:
                chat(client, name, TOPICS[name].format(2))
                time.sleep(0.3)
        after = usage_by_replica(engine)
        seen["affinity"] = {
            name: {rid: after[rid].get(name, 0) - before.get(rid, {}).get(name, 0) for rid in after} for name in TOPICS
        }

        files = [("files", (f.name, f.read_bytes())) for f in sorted(upload_dir.iterdir())]
        up = httpx.post(f"{url}/admin/adapters", files=files, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120)
        seen["upload_status"] = up.status_code
        seen["replica_adapters"] = dict(engine.broadcast("adapters").results())
        seen["models"] = sorted(m.id for m in client.models.list().data)
        found = chat(client, "auto", NEW[1].format(4))
        seen["auto_after_upload"] = [a["name"] for a in (found.model_extra or {}).get("adapters", [])]
        seen["named_after_upload"] = chat(client, NEW[0], "hello").choices[0].finish_reason
        metrics = httpx.get(f"{url}/metrics").text
        seen["metrics_replicas"] = sorted(
            {
                line.split('replica="')[1].split('"')[0]
                for line in metrics.splitlines()
                if line.startswith("mole_adapter_slots_capacity")
            }
        )
        deleted = httpx.delete(f"{url}/admin/adapters/{NEW[0]}", headers={"Authorization": f"Bearer {TOKEN}"})
        seen["delete_status"] = deleted.status_code
        seen["after_delete"] = dict(engine.broadcast("adapters").results())
        seen["kill"] = kill_a_replica(client, engine, asks[0])
    finally:
        serve.shutdown()
        ray.shutdown()
    out.write_text(json.dumps(seen, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
