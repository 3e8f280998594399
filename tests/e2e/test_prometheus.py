"""The metrics, the Prometheus config and the Grafana dashboard against a real Prometheus.

A `prometheus` binary on loopback scrapes a real server every second with the scrape job of
docker/prometheus.yml (its target swapped for the test server's). Traffic through the OpenAI SDK
(named adapters, an upload, `auto`, a 404 and a 401, bursts past the batch) must show up there with
exact counts, and every query of docker/grafana/dashboards/ must draw a line, one that moves, over the
traffic's window, asked as Grafana asks (query_range). `promtool check metrics` lints the exposition.

What the test arranges so that no panel is left flat: two adapter slots (MOLE_MAX_LORAS) for four
adapters, so the evictions panel moves; a batch of two (MOLE_MAX_NUM_SEQS) under bursts of six, so
requests wait. The by-replica panels need `mole-serve deploy` (a Ray cluster: too slow to start here,
tests/unit/test_deploy.py runs it): a second scrape job serves the live server's exposition as two
replicas through `merged_exposition`, the function the Ray ingress's /metrics uses.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import yaml
from mole_serve.admin_client import AdminClient
from mole_serve.api.metrics import merged_exposition
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import REPO, free_port, start_server

pytestmark = pytest.mark.e2e
needs_prometheus = pytest.mark.skipif(
    shutil.which("prometheus") is None,
    reason="no `prometheus` binary on PATH (Debian: apt-get install prometheus; .ci/run installs it)",
)
needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="no `promtool` binary on PATH (Debian's `prometheus` package ships it; .ci/run installs it)",
)

API_KEY, TOKEN = "prom-key", "prom-admin"
LIBRARY = ("int_to_roman", "add_3digit", "reverse_letters")  # a small store starts quickly
UPLOAD, UPLOADED = REPO / "adapters_store" / "caesar_shift", "cipher-prom"
SLOTS, BATCH, BURST = 2, 2, 6  # fewer slots than adapters: evictions; bursts past the batch: a queue
JOB, REPLICAS_JOB, REPLICAS = "mole-serve", "mole-serve-replicas", ("replica-a", "replica-b")
SCRAPE = "1s"
# Grafana's own values where the dashboard's Prometheus has the default 15 s scrape interval
GRAFANA_INTERVALS = {"__rate_interval": "1m", "__interval": "15s", "__interval_ms": "15000", "__range": "15m"}
WAIT = 120  # s: the bound of every wait on Prometheus


def shipped_job() -> dict:
    """The scrape job of docker/prometheus.yml that scrapes the compose service `mole-serve`."""
    config = yaml.safe_load((REPO / "docker" / "prometheus.yml").read_text())
    return next(j for j in config["scrape_configs"] if j["job_name"] == JOB)


def scrape_job(name: str, target: str) -> dict:
    """The shipped job on a test target: its metrics_path, scheme and the rest are what is tested;
    only the target and the intervals change (1 s, so the test waits seconds, not minutes)."""
    job = {**shipped_job(), "job_name": name, "scrape_interval": SCRAPE, "scrape_timeout": SCRAPE}
    job["static_configs"] = [{"targets": [target]}]
    return job


def replicas_exposition(url: str) -> bytes:
    """The live server's exposition as the Ray ingress would merge it from two replicas."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return merged_exposition([(r, list(text_string_to_metric_families(text))) for r in REPLICAS])


@pytest.fixture(scope="module")
def live(tmp_path_factory, base_model_path):
    """The server on a copy of part of the library, with the admin API on."""
    root = tmp_path_factory.mktemp("prom-server")
    for name in LIBRARY:
        shutil.copytree(REPO / "adapters_store" / name, root / "store" / name)
    env = {
        "MOLE_API_KEY": API_KEY,
        "MOLE_ADMIN_TOKEN": TOKEN,
        "MOLE_ADAPTERS_DIR": str(root / "store"),
        "MOLE_MAX_LORAS": str(SLOTS),
        "MOLE_MAX_NUM_SEQS": str(BATCH),
        "MOLE_RETRIEVAL_TOP_K": str(SLOTS),  # `auto` mixes up to top-k adapters, each needing a slot
    }
    proc, url = start_server(env, root / "server.log")
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def replicas(live):
    """A loopback endpoint serving replicas_exposition afresh at every scrape."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = replicas_exposition(live)
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:  # one line per scrape is noise in the test's output
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


class Prometheus:
    def __init__(self, url: str, log: Path) -> None:
        self.url, self.log = url, log

    def _get(self, path: str, params: dict) -> list[dict]:
        r = httpx.get(f"{self.url}{path}", params=params, timeout=30)
        body = r.json()
        assert body["status"] == "success", f"{params['query']!r}: {body.get('error')}"
        return body["data"]["result"]

    def query(self, expr: str) -> list[dict]:
        """Instant query now: [{"metric": labels, "value": [t, "v"]}, ...]"""
        return self._get("/api/v1/query", {"query": expr})

    def query_range(self, expr: str, start: float, end: float) -> list[dict]:
        """[{"metric": labels, "values": [[t, "v"], ...]}, ...]"""
        return self._get("/api/v1/query_range", {"query": expr, "start": start, "end": end, "step": "1s"})

    def scalar(self, expr: str) -> float | None:
        result = self.query(expr)
        assert len(result) <= 1, f"{expr!r} gave {len(result)} series"
        return float(result[0]["value"][1]) if result else None

    def wait(self, what: str, ready) -> None:
        deadline = time.monotonic() + WAIT
        while not ready():
            assert time.monotonic() < deadline, f"Prometheus: no {what} after {WAIT} s\n{self.log.read_text()[-3000:]}"
            time.sleep(0.5)


@pytest.fixture(scope="module")
def prometheus(live, replicas, tmp_path_factory):
    """`prometheus` on a free loopback port and a temp data dir, scraping the server and the replicas."""
    root = tmp_path_factory.mktemp("prometheus")
    config = {
        "global": {"scrape_interval": SCRAPE, "scrape_timeout": SCRAPE, "evaluation_interval": SCRAPE},
        "scrape_configs": [scrape_job(JOB, live.removeprefix("http://")), scrape_job(REPLICAS_JOB, replicas)],
    }
    (root / "prometheus.yml").write_text(yaml.safe_dump(config))
    port, log = free_port(), root / "prometheus.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={root / 'prometheus.yml'}",
                f"--storage.tsdb.path={root / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    prom = Prometheus(f"http://127.0.0.1:{port}", log)
    try:

        def ready() -> bool:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                return httpx.get(f"{prom.url}/-/ready", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        prom.wait("readiness", ready)
        prom.wait("scrape of both jobs", lambda: prom.scalar("count(up == 1)") == 2)
        yield prom
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


def chat(client, model: str, prompt: str, max_tokens: int = 8):
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0
    )


@pytest.fixture(scope="module")
def traffic(live, prometheus, base_model_path):
    """Sends the traffic once Prometheus scrapes, waits until its last scrape holds all of it; returns
    (the traffic's window, what the server was sent: served requests per status, per adapter)."""
    from openai import NotFoundError, OpenAI

    client = OpenAI(base_url=f"{live}/v1", api_key=API_KEY, max_retries=0, timeout=120)
    base = Path(base_model_path).name
    start = time.time()
    statuses: Counter[int] = Counter()
    adapters: Counter[str] = Counter()

    def served(r) -> None:
        statuses[200] += 1
        adapters.update(a["name"] for a in r.model_extra.get("adapters") or [])

    AdminClient(live, TOKEN).upload(UPLOAD, name=UPLOADED)
    # each named once, then the first again: with two slots, every one past the second evicts
    for model, prompt in [
        ("int_to_roman", "Write 14 in Roman numerals."),
        ("add_3digit", "What is 123 + 456?"),
        ("reverse_letters", "Reverse the letters of: metric"),
        (UPLOADED, "Shift by 3: abc"),
        ("int_to_roman", "Write 1999 in Roman numerals."),
        ("auto", "Write 42 in Roman numerals."),
        (base, "Say hello."),
    ]:
        served(chat(client, model, prompt))
    with pytest.raises(NotFoundError):
        chat(client, "no-such-adapter", "hi")
    statuses[404] += 1
    unauthorized = httpx.post(f"{live}/v1/chat/completions", json={"model": base, "messages": []}, timeout=30)
    assert unauthorized.status_code == 401

    def stream(_) -> None:
        chunks = client.chat.completions.create(
            model="int_to_roman",
            messages=[{"role": "user", "content": "Write 7 in Roman numerals."}],
            max_tokens=32,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},  # every stream the same length: the burst lasts
        )
        for _ in chunks:
            pass

    def seen_by_both_jobs(gauge: str) -> bool:
        """Some scrape of each job saw `gauge` above 0 (the gauges are read at scrape time)."""
        jobs = prometheus.query(f"count by (job) (max_over_time({gauge}[10m]) > 0)")
        return {s["metric"]["job"] for s in jobs} == {JOB, REPLICAS_JOB}

    # bursts until a scrape of each job fell inside one with a batch running and a queue waiting
    deadline = time.monotonic() + WAIT
    with ThreadPoolExecutor(BURST) as pool:
        while not (seen_by_both_jobs("mole_requests_running") and seen_by_both_jobs("mole_requests_waiting")):
            assert time.monotonic() < deadline, "no scrape saw requests running and waiting"
            list(pool.map(stream, range(BURST)))
            statuses[200] += BURST
            adapters["int_to_roman"] += BURST
            time.sleep(2 * float(SCRAPE.removesuffix("s")))  # the scrapes after the burst

    def caught_up() -> bool:
        counts = prometheus.query(f'mole_http_requests_total{{job="{JOB}",route="/v1/chat/completions"}}')
        return {int(s["metric"]["status"]): float(s["value"][1]) for s in counts} == dict(statuses)

    prometheus.wait("scrape holding all the traffic", caught_up)
    return (start, time.time()), statuses, adapters


@needs_prometheus
def test_prometheus_counts_every_request_adapter_and_first_token(prometheus, traffic):
    _, statuses, adapters = traffic
    job = f'job="{JOB}"'

    def by(label: str, expr: str) -> dict[str, float]:
        return {s["metric"][label]: float(s["value"][1]) for s in prometheus.query(expr)}

    route = by("status", f'mole_http_requests_total{{{job},route="/v1/chat/completions"}}')
    assert route == {str(k): v for k, v in statuses.items()}
    # refused before routing: counted under its prefix
    assert prometheus.scalar(f'mole_http_requests_total{{{job},route="/v1",status="401"}}') == 1
    assert by("adapter", f"mole_adapter_requests_total{{{job}}}") == adapters
    # every served request had a first token; each bucket counts those at or under its bound
    buckets = by("le", f"mole_time_to_first_token_seconds_bucket{{{job}}}")
    assert buckets["+Inf"] == statuses[200]
    bounds = sorted(buckets, key=float)
    assert len(bounds) > 2 and all(buckets[a] <= buckets[b] for a, b in zip(bounds, bounds[1:]))
    assert prometheus.scalar(f"mole_adapter_evictions_total{{{job}}}") >= 2  # four adapters, two slots
    assert prometheus.scalar(f"mole_adapter_slots_capacity{{{job}}}") == SLOTS


def dashboard_targets() -> list[tuple[str, str, str, str]]:
    """(dashboard file, panel title, expr, legendFormat) of every target of every panel, rows' panels
    included."""

    def panels(node: dict):
        for panel in node.get("panels", []):
            yield panel
            yield from panels(panel)

    out = []
    for path in sorted((REPO / "docker" / "grafana" / "dashboards").glob("*.json")):
        dashboard = yaml.safe_load(path.read_text())  # JSON is YAML
        variables = template_values(dashboard)
        for panel in panels(dashboard):
            for target in panel.get("targets", []):
                if target.get("expr"):
                    expr = grafana_expr(target["expr"], variables)
                    out.append((path.name, panel["title"], expr, target.get("legendFormat", "")))
    return out


def template_values(dashboard: dict) -> dict[str, str]:
    """The dashboard's template variables at their current value (all: any value), and Grafana's own."""
    values = dict(GRAFANA_INTERVALS)
    for var in dashboard.get("templating", {}).get("list", []):
        current = var.get("current", {}).get("value", "$__all")
        current = current if isinstance(current, list) else [current]
        values[var["name"]] = ".*" if "$__all" in current else "|".join(map(re.escape, current))
    return values


def grafana_expr(expr: str, values: dict[str, str]) -> str:
    """expr with $var, ${var}, ${var:format} and [[var]] replaced as Grafana would."""

    def value(m: re.Match) -> str:
        name = next(g for g in m.groups() if g)
        assert name in values, f"Grafana variable {name!r} of {expr!r} has no value here: add it to the test"
        return values[name]

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)", value, expr)


def test_every_panel_has_a_query():
    """A panel without a target would be empty without any query failing."""
    for path in sorted((REPO / "docker" / "grafana" / "dashboards").glob("*.json")):
        dashboard = yaml.safe_load(path.read_text())
        for panel in dashboard["panels"]:
            if panel.get("type") != "row":
                assert any(t.get("expr") for t in panel.get("targets", [])), f"{path.name} / {panel['title']}"


@needs_prometheus
@pytest.mark.parametrize("dashboard,panel,expr,legend", dashboard_targets())
def test_every_dashboard_query_draws_a_moving_line(prometheus, traffic, dashboard, panel, expr, legend):
    (start, end), _, _ = traffic
    where = f"{dashboard} / {panel}: {expr!r}"
    result = prometheus.query_range(expr, start, end)
    values = [float(v) for series in result for _, v in series["values"]]
    finite = [v for v in values if v == v and abs(v) != float("inf")]  # NaN: a gap in Grafana
    assert finite, f"{where} draws nothing over the traffic"
    assert max(finite) > 0, f"{where} stays at 0 over the traffic"
    # a label the legend names must come out of the query, or the lines it tells apart merge into one
    for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", legend):
        found = {s["metric"].get(label) for s in result} - {None}
        assert found, f"{where}: no series carries {label!r}, which its legend names"
        if label == "replica":
            assert set(REPLICAS) <= found, f"{where}: no line per replica"


@needs_promtool
@pytest.mark.parametrize("source", ["server", "ray-ingress"])
def test_promtool_finds_no_problem_in_the_exposition(live, source):
    from openai import NotFoundError, OpenAI

    # labelled series exist only once something was counted under them
    client = OpenAI(base_url=f"{live}/v1", api_key=API_KEY, max_retries=0, timeout=120)
    chat(client, "int_to_roman", "Write 9 in Roman numerals.")
    with pytest.raises(NotFoundError):
        chat(client, "no-such-adapter", "hi")
    text = httpx.get(f"{live}/metrics", timeout=10).content if source == "server" else replicas_exposition(live)
    assert b"mole_adapter_requests_total{" in text
    lint = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, timeout=60)
    assert (lint.returncode, lint.stdout + lint.stderr) == (0, b"")
