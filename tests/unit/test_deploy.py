"""mole-serve on Ray Serve (mole_serve/deploy.py): a real local Ray cluster with 2 engine replicas of the
real SmolLM2-135M (random LoRAs over it), in its own network namespace so nothing leaves loopback by construction.
deploy_scenario.py runs the cluster in a child process (`unshare -n`, lo up) and reports what it
saw; each test here asserts one part of it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray.serve", reason="the `ray` extra is not installed")
ROOT = Path(__file__).resolve().parents[2]


def _namespace_refusal() -> str | None:
    """Why a network namespace cannot be made here, or None."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "needs unshare and ip (util-linux, iproute2)"
    probe = subprocess.run(["unshare", "-n", "ip", "link", "set", "lo", "up"], capture_output=True, text=True)
    return None if probe.returncode == 0 else f"unshare -n is not permitted here: {probe.stderr.strip()}"


@pytest.fixture(scope="module")
def seen(tmp_path_factory) -> dict:
    refusal = _namespace_refusal()
    if refusal:
        pytest.skip(f"Ray listens on every interface, so its tests run in their own network namespace; {refusal}")
    out = tmp_path_factory.mktemp("ray") / "seen.json"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "disabled",
        "HF_HUB_OFFLINE": "1",
    }
    script = f"ip link set lo up && exec {sys.executable} -m tests.unit.deploy_scenario {out}"
    run = subprocess.run(
        ["unshare", "-n", "bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=480
    )
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(out.read_text())


def test_same_greedy_tokens_as_the_single_server_named_auto_and_streamed(seen):
    assert seen["texts"] == seen["expected"]  # a named adapter, then two `auto` requests
    assert seen["streamed"] == seen["expected"][0]


def test_errors_keep_the_openai_shape(seen):
    assert seen["missing"] == seen["missing_single"]
    assert seen["bad"] == seen["bad_single"]
    assert seen["openai_error"] == {"type": "NotFoundError", "code": "model_not_found"}


def test_each_adapter_lands_on_one_replica_after_warm_up(seen):
    replicas = {r for counts in seen["affinity"].values() for r in counts}
    assert len(replicas) == 2
    for name, counts in seen["affinity"].items():
        assert sorted(counts.values()) == [0, 3], (name, counts)


def test_an_upload_reaches_every_replica_and_retrieval_and_a_delete_too(seen):
    assert seen["upload_status"] == 201
    assert len(seen["replica_adapters"]) == 2
    assert all("chess" in names for names in seen["replica_adapters"].values())
    assert "chess" in seen["models"]
    assert seen["auto_after_upload"][0] == "chess"
    assert seen["named_after_upload"] in ("stop", "length")
    assert seen["delete_status"] == 200
    assert all("chess" not in names for names in seen["after_delete"].values())


def test_a_killed_replica_loses_no_request_and_ray_brings_it_back(seen):
    kill = seen["kill"]
    assert kill["results"] == [seen["expected"][0]] * 8  # sent after the kill, none had started: none lost
    assert kill["running_at_kill"] > 0  # the long answers were being generated on the killed replica
    assert kill["long_results"] == [kill["long_undisturbed"]] * 4  # run again elsewhere, in full
    assert kill["replicas_after"] == 2 and kill["new_replica"]
    assert kill["after_recovery"] == seen["expected"][0]


def test_metrics_carry_a_replica_label_per_engine(seen):
    assert sorted(seen["metrics_replicas"]) == sorted(seen["replica_adapters"])


def test_the_ingress_routes_by_the_heaviest_named_adapter_or_the_top_hit():
    from mole_serve.deploy import route_key
    from mole_serve.routing.types import AdapterRef, Selection

    assert route_key(None) == ""
    assert route_key(Selection("mixture", (AdapterRef("a", 0.2), AdapterRef("b", 0.8)))) == "b"
    assert route_key(Selection("mixture", query="q", retrieved=(("c", 0.9), ("a", 0.5)))) == "c"
    assert route_key(Selection("mixture", query="q", retrieved=())) == ""


def test_hits_retrieved_upstream_are_used_without_embedding():
    from mole_serve.config import Settings
    from mole_serve.routing.selection import AdapterSelector
    from mole_serve.routing.types import Selection

    class NoRetriever:
        def search(self, *_):
            raise AssertionError("the engine embedded a query the ingress had retrieved")

    selector = AdapterSelector(Settings(), lambda name: True, merges=None, retriever=NoRetriever())
    sel = Selection("mixture", query="q", top_k=1, retrieved=(("c", 0.9), ("a", 0.5)))
    assert selector.retrieve([sel]) == [[("c", 0.9)]]
