"""Who may call what: every route of the OpenAPI document, walked without a token, with a
revoked, an expired and a malformed one, and with a token of each single role.

The walk reads the routes from the served document, so a new route that forgets its check
(or its ``x-roles``) fails here without anyone writing a test for it.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from cohortflow.api.app import create_app
from cohortflow.auth.identity import Role
from cohortflow.auth.tokens import TokenService
from cohortflow.settings import Settings
from tests.harness import Harness, api_settings, bearer, issue_token, serve_app

pytestmark = pytest.mark.devserver

OPEN = {"/healthz", "/metrics"}
KEY = "access-test-pseudonymisation-key-0123456"


@pytest.fixture
async def api_url(
    dev_harness: Harness, dev_settings: Settings, tmp_path: Path
) -> AsyncIterator[str]:
    settings = api_settings(dev_harness, dev_settings, tmp_path, KEY, api_rate_burst=1000)
    with serve_app(create_app(settings)) as url:
        yield url


def operations(document: dict[str, object]) -> list[tuple[str, str, dict[str, object]]]:
    """(method, path, operation) of every route the document declares."""
    paths = document["paths"]
    assert isinstance(paths, dict)
    return [
        (method.upper(), path, operation)
        for path, methods in paths.items()
        for method, operation in methods.items()
    ]


def concrete(path: str) -> str:
    """The path with every parameter filled by a value that names nothing."""
    return re.sub(r"\{[^}]+\}", "nothing_here", path)


async def test_every_route_answers_401_403_or_its_own_answer_by_role(
    api_url: str, dev_harness: Harness
) -> None:
    tokens = {role: await issue_token(dev_harness.db, f"only-{role}", role) for role in Role}
    revoked = await issue_token(dev_harness.db, "gone", *Role)
    await TokenService(dev_harness.db).revoke(revoked.split("_")[1], by="tests")
    expired = (
        await TokenService(dev_harness.db).create(
            "late",
            list(Role),
            lifetime=timedelta(hours=1),
            by="tests",
            now=datetime.now(UTC) - timedelta(hours=2),
        )
    ).secret
    refused = {
        "none": {},
        "revoked": bearer(revoked),
        "expired": bearer(expired),
        "malformed": bearer("cft_not_a_token"),
        "forged": bearer(revoked[:-4] + "AAAA"),
    }
    async with httpx.AsyncClient(base_url=api_url, timeout=30) as http:
        document = (await http.get("/openapi.json")).json()
        assert document["components"]["securitySchemes"]["token"]["scheme"] == "bearer"
        walked = operations(document)
        assert len(walked) >= 15
        for method, path, operation in walked:
            url = concrete(path)
            if path in OPEN:
                assert "x-roles" not in operation, path
                assert (await http.request(method, url)).status_code == 200
                continue
            allowed = set(operation.get("x-roles", []))  # type: ignore[attr-defined]
            assert allowed, f"{method} {path} declares no roles: is it guarded?"
            # Bearer tokens everywhere; Segment's routes also take the token as a write key.
            security = operation.get("security")  # type: ignore[attr-defined]
            assert security in ([{"token": []}], [{"writeKey": []}, {"token": []}]), path
            assert {"401", "403", "429"} <= set(operation["responses"]), path  # type: ignore[index]
            for why, headers in refused.items():
                response = await http.request(method, url, json={}, headers=headers)
                assert response.status_code == 401, (method, path, why, response.text)
                assert response.headers["WWW-Authenticate"] == "Bearer"
            for role, token in tokens.items():
                response = await http.request(method, url, json={}, headers=bearer(token))
                if role in allowed:
                    assert response.status_code not in (401, 403), (method, path, role)
                    assert response.status_code < 500, (method, path, role, response.text)
                    documented = set(operation["responses"])  # type: ignore[index]
                    assert str(response.status_code) in documented, (method, path, response)
                else:
                    assert response.status_code == 403, (method, path, role, response.text)
                    assert role.value not in allowed


async def test_a_flood_from_one_token_gets_429_with_retry_after_and_spares_others(
    dev_harness: Harness, dev_settings: Settings, tmp_path: Path
) -> None:
    settings = api_settings(
        dev_harness, dev_settings, tmp_path, KEY, api_rate_per_second=0.5, api_rate_burst=5
    )
    flooder = await issue_token(dev_harness.db, "flooder", "operator")
    other = await issue_token(dev_harness.db, "other", "operator")
    with serve_app(create_app(settings)) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            answers = [
                (await http.get("/v1/approvals", headers=bearer(flooder))).status_code
                for _ in range(8)
            ]
            limited = await http.get("/v1/approvals", headers=bearer(flooder))
            spared = await http.get("/v1/approvals", headers=bearer(other))
    assert answers == [200] * 5 + [429] * 3
    assert limited.status_code == 429
    assert int(limited.headers["Retry-After"]) >= 1
    assert spared.status_code == 200


async def test_docs_are_served_from_the_package_without_any_outside_address(api_url: str) -> None:
    async with httpx.AsyncClient(base_url=api_url, timeout=30) as http:
        page = await http.get("/docs")
        assert page.status_code == 200
        assert not re.search(r"(src|href)=\"https?://", page.text), page.text
        scripts = re.findall(r"(?:src|href)=['\"]([^'\"]+)['\"]", page.text)
        assert any(s.endswith("swagger-ui-bundle.js") for s in scripts)
        for script in scripts:
            assert (await http.get(script)).status_code == 200, script
