"""docker-compose.yml stays in step with Settings, the search attributes and the CLI."""

from __future__ import annotations

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
    expected = {"postgresql", "temporal", "temporal-ui", "temporal-setup", *COHORTFLOW_SERVICES}
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
