"""Bind what every log line of a campaign activity carries: workflow id and customer key."""

from __future__ import annotations

import structlog


def bind(workflow_id: str, customer_key: str) -> None:
    """Every log line of this activity carries the workflow id and the (pseudonymous) key."""
    structlog.contextvars.bind_contextvars(workflow_id=workflow_id, customer_key=customer_key)
