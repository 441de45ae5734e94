"""Structure of the shipped dashboards, provisioning and docker-compose.yml (no Docker engine
exists on CI machines, so compose is checked as a file, plus `docker-compose config` when the
test command has installed it)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DASHBOARDS = REPO / "dashboards"
DASHBOARD = DASHBOARDS / "grafana" / "dashboards" / "otel-train.json"
COMPOSE = REPO / "docker-compose.yml"
SELECTOR = 'run=~"$run",stage=~"$stage",rank=~"$rank"'

# What each panel the issue asks for must chart (metric names as the exporter spells them).
REQUIRED_METRICS = {
    "loss": "train_loss",
    "learning rate": "train_learning_rate",
    "grad norm": "train_grad_norm",
    "tokens/s summed over ranks": "sum by (run) (perf_tokens_per_second",
    "samples/s": "perf_samples_per_second",
    "MFU": "perf_mfu",
    "step time p50": "histogram_quantile(0.5, sum by (le, run, rank) (rate(perf_step_time",
    "step time p95": "histogram_quantile(0.95, sum by (le, run, rank) (rate(perf_step_time",
    "GPU memory per rank": "hw_gpu_memory_usage_bytes",
    "GPU utilisation per rank": "hw_gpu_utilization",
    "ETA": "perf_eta_seconds",
    "eval loss": "eval_loss",
    "eval perplexity": "eval_perplexity",
}


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _exprs(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def test_dashboard_has_fixed_uid_variables_and_every_required_panel() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "otel-train-training"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert set(variables) == {"run", "stage", "rank"}
    for variable in variables.values():
        assert variable["multi"] and variable["includeAll"] and variable["allValue"] == ".*"
    exprs = _exprs(dashboard)
    for what, needle in REQUIRED_METRICS.items():
        assert any(needle in expr for expr in exprs), f"no panel charts {what} ({needle})"
    for expr in exprs:
        assert SELECTOR in expr, f"panel query ignores the run/stage/rank variables: {expr}"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_every_panel_uses_the_provisioned_datasource_uid() -> None:
    datasources = _yaml(DASHBOARDS / "grafana/provisioning/datasources/prometheus.yml")
    (datasource,) = datasources["datasources"]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://127.0.0.1:9090"
    dashboard = json.loads(DASHBOARD.read_text())
    uids = {p["datasource"]["uid"] for p in dashboard["panels"]}
    uids |= {t["datasource"]["uid"] for p in dashboard["panels"] for t in p["targets"]}
    uids |= {v["datasource"]["uid"] for v in dashboard["templating"]["list"]}
    assert uids == {datasource["uid"]}


def test_compose_services_images_healthchecks_and_mounts() -> None:
    compose = _yaml(COMPOSE)
    services = compose["services"]
    assert set(services) == {"prometheus", "grafana", "otel-collector"}
    for name, service in services.items():
        image = service["image"]
        assert re.fullmatch(r"[\w./-]+:v?\d+\.\d+\.\d+", image), f"{name}: unpinned {image}"
        assert service["healthcheck"]["test"], f"{name} has no health check"
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (REPO / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in compose["volumes"], f"{name}: undeclared volume {source}"
    # Trainers bind 127.0.0.1: only a Prometheus on the host's network can scrape them, and
    # Grafana reaches that Prometheus the same way; both listen on loopback only.
    for name in ("prometheus", "grafana"):
        assert services[name]["network_mode"] == "host", name
        assert "ports" not in services[name], f"{name}: host network publishes nothing"
    assert "--web.listen-address=127.0.0.1:9090" in services["prometheus"]["command"]
    grafana = services["grafana"]
    assert grafana["environment"]["GF_SERVER_HTTP_ADDR"] == "127.0.0.1"
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == "/var/lib/grafana/dashboards/" + DASHBOARD.name


def test_grafana_provisioning_points_at_the_mounted_dashboards() -> None:
    compose = _yaml(COMPOSE)
    mounts = dict(v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"])
    assert mounts["./dashboards/grafana/provisioning"] == "/etc/grafana/provisioning"
    providers = _yaml(DASHBOARDS / "grafana/provisioning/dashboards/otel-train.yml")
    (provider,) = providers["providers"]
    assert mounts["./dashboards/grafana/dashboards"] == provider["options"]["path"]


def test_prometheus_and_collector_configs_are_wired() -> None:
    prometheus = _yaml(DASHBOARDS / "prometheus/prometheus.yml")
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    (pattern,) = jobs["otel-train"]["file_sd_configs"][0]["files"]
    targets = [
        target
        for path in (DASHBOARDS / "prometheus").glob(pattern)
        for group in _yaml(path)
        for target in group["targets"]
    ]
    # What `otel-train demo` (one process, 127.0.0.1:9464) serves: no target is down.
    assert targets == ["127.0.0.1:9464"]
    assert jobs["otel-collector"]["static_configs"][0]["targets"] == ["127.0.0.1:8889"]
    published = _yaml(COMPOSE)["services"]["otel-collector"]["ports"]
    assert "127.0.0.1:8889:8889" in " ".join(published)
    collector = _yaml(DASHBOARDS / "otel-collector/config.yaml")
    pipeline = collector["service"]["pipelines"]["metrics"]
    assert pipeline["receivers"] == ["otlp"] and pipeline["exporters"] == ["prometheus"]
    assert collector["exporters"]["prometheus"]["endpoint"].endswith(":8889")
    assert collector["exporters"]["prometheus"]["resource_to_telemetry_conversion"]["enabled"]


@pytest.mark.integration
@pytest.mark.skipif(
    shutil.which("docker-compose") is None,
    reason="docker-compose (Debian, v1.29) missing; ./scripts/test installs it",
)
def test_docker_compose_validates_the_file_without_an_engine() -> None:
    check = subprocess.run(
        ["docker-compose", "-f", str(COMPOSE), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert check.returncode == 0, check.stdout + check.stderr
