"""Settings: production refuses the defaults meant for one machine; development does not."""

from __future__ import annotations

from typing import Any

import pytest

from cohortflow.errors import Invalid
from cohortflow.settings import Settings

SAFE: dict[str, Any] = {
    "environment": "production",
    "pseudonymisation_key": "0123456789abcdef0123456789abcdef",
    "payload_keys": '{"k1": "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="}',
    "crm_token": "crm-token",
    "crm_url": "https://crm.example.com",
}


@pytest.fixture(autouse=True)
def no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only what a test passes counts, whatever the shell running the tests exports."""
    for name in Settings.model_fields:
        monkeypatch.delenv(f"COHORTFLOW_{name.upper()}", raising=False)


def refusal(**changes: Any) -> Invalid:
    """The error ``check_production`` raises for the safe production settings plus ``changes``."""
    settings = Settings(**(SAFE | changes))
    with pytest.raises(Invalid) as caught:
        settings.check_production()
    return caught.value


def test_safe_production_settings_pass() -> None:
    Settings(**SAFE).check_production()


@pytest.mark.parametrize(
    ("field", "variable"),
    [
        ("pseudonymisation_key", "COHORTFLOW_PSEUDONYMISATION_KEY"),
        ("payload_keys", "COHORTFLOW_PAYLOAD_KEYS"),
        ("crm_token", "COHORTFLOW_CRM_TOKEN"),
        ("crm_url", "COHORTFLOW_CRM_URL"),
    ],
)
def test_production_refuses_an_unset_setting_naming_its_variable(field: str, variable: str) -> None:
    error = refusal(**{field: None})
    assert error.message == f"{variable} must be set when COHORTFLOW_ENVIRONMENT=production"
    assert error.field == variable


@pytest.mark.parametrize(
    ("url", "changes"),
    [
        ("http://127.0.0.1:8100", {}),
        ("http://127.0.0.1:8100/", {}),
        ("http://0.0.0.0:9100", {"crm_sandbox_host": "0.0.0.0", "crm_sandbox_port": 9100}),
    ],
)
def test_production_refuses_the_sandbox_crm(url: str, changes: dict[str, Any]) -> None:
    error = refusal(crm_url=url, **changes)
    assert error.message == (
        f"COHORTFLOW_CRM_URL must not be the sandbox CRM {url} "
        "when COHORTFLOW_ENVIRONMENT=production"
    )


def test_production_names_every_problem_on_one_line() -> None:
    error = refusal(pseudonymisation_key=None, crm_token=None, crm_url=None)
    assert error.message == (
        "COHORTFLOW_PSEUDONYMISATION_KEY must be set, COHORTFLOW_CRM_TOKEN must be set and "
        "COHORTFLOW_CRM_URL must be set when COHORTFLOW_ENVIRONMENT=production"
    )
    assert error.field == "COHORTFLOW_PSEUDONYMISATION_KEY"


def test_development_accepts_every_default() -> None:
    settings = Settings()
    assert settings.environment == "development"
    settings.check_production()
    Settings(crm_url=settings.crm_sandbox_url).check_production()


def test_production_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COHORTFLOW_ENVIRONMENT", "production")
    with pytest.raises(Invalid, match="COHORTFLOW_CRM_TOKEN must be set"):
        Settings().check_production()
