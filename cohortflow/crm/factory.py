"""The connector a deployment configures: ``sandbox`` (our own dialect) or ``hubspot``."""

from __future__ import annotations

from collections.abc import Sequence

from cohortflow.crm._http import RequestGate
from cohortflow.crm.connector import CrmConnector
from cohortflow.settings import Settings


def make_connector(
    kind: str,
    url: str,
    token: str | None,
    timeout: float,
    *,
    paths: str = "2026-03",
    id_property: str = "cohortflow_key",
    sender_email: str = "",
    user_id: str = "",
    daily_reset_timezone: str = "UTC",
    read_properties: Sequence[str] = (),
    sequence_unenroll_path: str | None = None,
    request_gate: RequestGate | None = None,
) -> CrmConnector:
    """A connector of ``kind`` for the CRM at ``url``. The keyword options are HubSpot's
    (:class:`~cohortflow.crm.hubspot.HubSpotConnector`); the sandbox's own dialect needs none
    and ignores them, so a caller may pass its settings whatever the kind."""
    if kind == "hubspot":
        from cohortflow.crm.hubspot import HubSpotConnector

        return HubSpotConnector(
            url,
            token=token,
            timeout=timeout,
            paths=paths,
            id_property=id_property,
            sender_email=sender_email,
            user_id=user_id,
            daily_reset_timezone=daily_reset_timezone,
            read_properties=read_properties,
            sequence_unenroll_path=sequence_unenroll_path or None,
            request_gate=request_gate,
        )
    if kind == "sandbox":
        from cohortflow.crm.sandbox_connector import SandboxConnector

        return SandboxConnector(url, token=token, timeout=timeout, request_gate=request_gate)
    raise ValueError(f"unknown CRM kind {kind!r}: sandbox or hubspot")


def configured_connector(
    settings: Settings, request_gate: RequestGate | None = None
) -> CrmConnector:
    """The connector ``settings`` configure (kind, URL, token and HubSpot's options)."""
    token = settings.crm_token.get_secret_value() if settings.crm_token else None
    return make_connector(
        settings.crm_kind,
        settings.resolved_crm_url,
        token,
        settings.crm_timeout_seconds,
        paths=settings.crm_api_paths,
        id_property=settings.crm_id_property,
        sender_email=settings.crm_sender_email,
        user_id=settings.crm_user_id,
        daily_reset_timezone=settings.crm_daily_reset_timezone,
        sequence_unenroll_path=settings.crm_sequence_unenroll_path,
        request_gate=request_gate,
    )
