"""docker-compose.yml stays in step with Settings, the search attributes and the CLI."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from cohortflow.settings import Settings
from cohortflow.temporal_client import search_attribute_types

REPO = Path(__file__).resolve().parents[1]
COMPOSE: dict[str, Any] = yaml.safe_load((REPO / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
COHORTFLOW_SERVICES = (
    "migrate",
    "train-churn",
    "train-propensity",
    "worker",
    "api",
    "consumer",
    "crm-sandbox",
)
# Variable -> the required ${NAME:?} reference it must be read from.
SECRETS = {
    "COHORTFLOW_PSEUDONYMISATION_KEY": "COHORTFLOW_PSEUDONYMISATION_KEY",
    "COHORTFLOW_PAYLOAD_KEYS": "COHORTFLOW_PAYLOAD_KEYS",
    "COHORTFLOW_CRM_URL": "COHORTFLOW_CRM_URL",
    "COHORTFLOW_CRM_TOKEN": "COHORTFLOW_CRM_TOKEN",
    "POSTGRES_PASSWORD": "POSTGRES_PASSWORD",
    "POSTGRES_PWD": "POSTGRES_PASSWORD",
}


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        return dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def command(service: dict[str, Any]) -> list[str]:
    cmd = service["command"]
    return cmd.split() if isinstance(cmd, str) else [str(part) for part in cmd]


def interpolate(value: str, dotenv: dict[str, str]) -> str:
    """``value`` with each ``${NAME:?message}`` and ``${NAME:-default}`` replaced as compose
    would from ``dotenv``."""
    value = re.sub(r"\$\{(\w+):\?[^}]*\}", lambda m: dotenv[m.group(1)], value)
    return re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: dotenv.get(m.group(1)) or m.group(2), value)


def published(service: dict[str, Any]) -> list[tuple[int, int]]:
    pairs = []
    for mapping in service.get("ports", []):
        host, _, container = str(mapping).rpartition(":")
        pairs.append((int(host), int(container)))
    return pairs


def test_every_service_has_an_image_or_a_build() -> None:
    expected = {"postgresql", "temporal", "temporal-ui", "temporal-setup", "prometheus", "grafana"}
    expected |= set(COHORTFLOW_SERVICES)
    assert expected <= set(SERVICES)
    for name, service in SERVICES.items():
        assert "image" in service or "build" in service, name


def test_cohortflow_variables_are_settings_fields() -> None:
    seen = set()
    for name, service in SERVICES.items():
        for key in environment(service):
            if key.startswith("COHORTFLOW_"):
                field = key.removeprefix("COHORTFLOW_").lower()
                assert field in Settings.model_fields, f"{name}: {key} is not a Settings field"
                seen.add(field)
    assert {"temporal_address", "database_url", "pseudonymisation_key", "crm_url"} <= seen


def test_cohortflow_services_parse_their_environment_into_settings() -> None:
    for name in COHORTFLOW_SERVICES:
        env = {
            # A default (``${NAME:-default}``) is what the file itself sets.
            key.removeprefix("COHORTFLOW_").lower(): re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)
            for key, value in environment(SERVICES[name]).items()
        }
        settings = Settings.model_validate(env)
        assert settings.temporal_address == "temporal:7233", name
        assert settings.resolved_database_url.startswith("postgresql+asyncpg://"), name
        assert settings.log_format == "json", name


def test_secrets_come_from_the_environment_not_the_file() -> None:
    for name, service in SERVICES.items():
        env = environment(service)
        for key, source in SECRETS.items():
            if key in env:
                assert env[key].startswith(f"${{{source}:?"), (
                    f"{name}: {key} is not ${{{source}:?}}"
                )
        if "COHORTFLOW_DATABASE_URL" in env:
            assert ":${POSTGRES_PASSWORD:?" in env["COHORTFLOW_DATABASE_URL"], name
    for name in COHORTFLOW_SERVICES:
        # One key for all: each container would otherwise mint its own key file.
        assert "COHORTFLOW_PSEUDONYMISATION_KEY" in environment(SERVICES[name]), name
        assert "COHORTFLOW_PAYLOAD_KEYS" in environment(SERVICES[name]), name


def test_production_services_pass_the_production_check_once_dotenv_is_filled() -> None:
    dotenv = {
        "POSTGRES_PASSWORD": "pw",
        "COHORTFLOW_PSEUDONYMISATION_KEY": "0123456789abcdef0123456789abcdef",
        "COHORTFLOW_PAYLOAD_KEYS": '{"k1": "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="}',
        "COHORTFLOW_CRM_URL": "https://crm.example.com",
        "COHORTFLOW_CRM_TOKEN": "crm-token",
    }
    for name in ("worker", "api"):
        env = {
            key.removeprefix("COHORTFLOW_").lower(): interpolate(value, dotenv)
            for key, value in environment(SERVICES[name]).items()
        }
        settings = Settings.model_validate(env)
        assert settings.environment == "production", name
        assert settings.resolved_crm_url == "https://crm.example.com", name
        settings.check_production()


def test_the_sandbox_crm_runs_only_under_its_profile() -> None:
    assert SERVICES["crm-sandbox"]["profiles"] == ["sandbox"]
    for name, service in SERVICES.items():
        if "profiles" not in service:
            assert "crm-sandbox" not in service.get("depends_on", {}), name


@pytest.mark.parametrize(
    ("service", "field"), [("api", "api_port"), ("crm-sandbox", "crm_sandbox_port")]
)
def test_published_ports_match_settings_defaults(service: str, field: str) -> None:
    default = Settings.model_fields[field].default
    assert published(SERVICES[service]) == [(default, default)]
    assert environment(SERVICES[service]).get(f"COHORTFLOW_{field.upper()}", str(default)) == str(
        default
    )


def test_setup_registers_every_search_attribute_with_its_type() -> None:
    script = " ".join(command(SERVICES["temporal-setup"]))
    registered = dict(re.findall(r"--name (\w+) --type (\w+)", script))
    assert registered == search_attribute_types()


def test_app_services_wait_for_migrations_and_search_attributes() -> None:
    for name in ("worker", "api"):
        depends = SERVICES[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully"
        assert depends["temporal-setup"]["condition"] == "service_completed_successfully"


def test_the_worker_starts_with_a_champion_of_every_model() -> None:
    depends = SERVICES["worker"]["depends_on"]
    for model in ("churn", "propensity"):
        job = SERVICES[f"train-{model}"]
        assert command(job)[1:] == ["model", "train", "--model", model, "--if-missing"]
        assert depends[f"train-{model}"]["condition"] == "service_completed_successfully"
        assert job["restart"] == "no"


@pytest.mark.parametrize("service", COHORTFLOW_SERVICES)
def test_command_exists_in_the_cli(service: str, tmp_path: Path) -> None:
    argv = command(SERVICES[service])
    assert argv[0] == "cohortflow"
    done = subprocess.run(
        [sys.executable, "-m", "cohortflow", *argv[1:], "--help"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr


def test_the_consumer_reads_a_jetstream_nats_that_keeps_its_stream_on_a_volume() -> None:
    nats = SERVICES["nats"]
    assert "--jetstream" in nats["command"]
    store = nats["command"][nats["command"].index("--store_dir") + 1]
    assert [v for v in nats["volumes"] if v.endswith(f":{store}")], nats["volumes"]
    assert "nats-data" in COMPOSE["volumes"]
    consumer = SERVICES["consumer"]
    assert environment(consumer)["COHORTFLOW_NATS_URL"] == "nats://nats:4222"
    assert consumer["depends_on"]["nats"]["condition"] == "service_healthy"
    assert consumer["depends_on"]["migrate"]["condition"] == "service_completed_successfully"


DEPLOY = REPO / "deploy"
DASHBOARD: dict[str, Any] = json.loads((DEPLOY / "grafana" / "cohortflow.json").read_text())
PROMQL_WORDS = {"sum", "max", "min", "avg", "rate", "increase", "histogram_quantile"}


def queried_metrics(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (a histogram's series by its own name)."""
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", expr)  # label matchers, ranges
    expr = re.sub(r"\b(?:by|without)\s*\([^)]*\)", "", expr)  # grouping labels
    words = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", expr)) - PROMQL_WORDS
    return {re.sub(r"_(?:bucket|sum|count)$", "", word) for word in words}


def dashboard_metrics() -> set[str]:
    """Every metric a panel of the Grafana dashboard queries."""
    return {
        name
        for panel in DASHBOARD["panels"]
        for target in panel["targets"]
        for name in queried_metrics(target["expr"])
    }


def test_queried_metrics_reads_names_not_functions_or_labels() -> None:
    expr = 'histogram_quantile(0.99, sum by (le, task_queue) (rate(a_b_bucket{state="x"}[5m])))'
    assert queried_metrics(expr) == {"a_b"}
    assert queried_metrics("sum(rate(c[5m])) * 60 + d") == {"c", "d"}


def test_every_cohortflow_metric_on_the_dashboard_is_one_the_code_exports() -> None:
    names = dashboard_metrics()
    assert all(n.startswith(("cohortflow_", "temporal_")) for n in names), names
    ours = {n for n in names if n.startswith("cohortflow_")}
    # The list: campaigns, fallbacks, approvals, CRM, scoring, outbox, cohorts.
    assert len(ours) >= 15
    sources = "".join(
        p.read_text(encoding="utf-8")
        for folder in ("cohortflow", "workflows", "activities")
        for p in (REPO / folder).rglob("*.py")
    )
    assert {n for n in ours if f'"{n}"' not in sources} == set()


def test_every_panel_reads_the_provisioned_prometheus() -> None:
    datasource = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )["datasources"][0]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    assert published(SERVICES["prometheus"]) == [(9090, 9090)]
    for panel in DASHBOARD["panels"]:
        for target in [panel, *panel["targets"]]:
            assert target["datasource"] == {"type": "prometheus", "uid": datasource["uid"]}


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """Bind mounts of ``service``: path in the container -> file in this repository."""
    found = {}
    for volume in service.get("volumes", []):
        source, target, *_ = str(volume).split(":")
        if source.startswith("./"):
            assert (REPO / source).exists(), source
            found[target] = source
    return found


def test_grafana_is_provisioned_with_the_dashboard() -> None:
    grafana = SERVICES["grafana"]
    mounted = mounts(grafana)
    assert mounted["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"
    provider = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "dashboards" / "cohortflow.yml").read_text()
    )["providers"][0]
    folder = provider["options"]["path"]
    assert mounted[f"{folder}/cohortflow.json"] == "./deploy/grafana/cohortflow.json"
    assert environment(grafana)["GF_SECURITY_ADMIN_PASSWORD"].startswith(
        "${GRAFANA_ADMIN_PASSWORD:?"
    )
    assert "prometheus" in grafana["depends_on"]


def test_prometheus_scrapes_every_metrics_endpoint_the_stack_serves() -> None:
    prometheus = SERVICES["prometheus"]
    assert mounts(prometheus)["/etc/prometheus/prometheus.yml"] == "./deploy/prometheus.yml"
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    targets = {
        job["job_name"]: (job.get("metrics_path", "/metrics"), target)
        for job in config["scrape_configs"]
        for static in job["static_configs"]
        for target in static["targets"]
    }
    worker = environment(SERVICES["worker"])["COHORTFLOW_WORKER_METRICS_PORT"]
    consumer = environment(SERVICES["consumer"])["COHORTFLOW_CONSUME_METRICS_PORT"]
    api = environment(SERVICES["api"])["COHORTFLOW_API_PORT"]
    assert targets == {
        "cohortflow-worker": ("/metrics", f"worker:{worker}"),
        "cohortflow-api": ("/metrics", f"api:{api}"),
        "cohortflow-consumer": ("/metrics", f"consumer:{consumer}"),
    }
    # Served on every interface of the container, where Prometheus can reach them.
    for name in ("worker", "api", "consumer"):
        assert environment(SERVICES[name])["COHORTFLOW_API_HOST"] == "0.0.0.0", name
