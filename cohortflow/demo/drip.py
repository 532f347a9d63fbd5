"""The drip half of the demo: new signups through ``examples/onboarding_drip.yaml``.

Everything goes through the running HTTP API, as a product's backend would send it with a
Segment SDK (``/v1/batch``): ``identify`` events create the customers (with e-mail and time
zone), ``POST /v1/consent`` records their choice, and later ``purchase`` events reach the
campaigns waiting for them.
Message ids are derived from the signup id, so a rerun is a duplicate, not a second event.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import httpx
from temporalio.client import Client

from cohortflow.campaigns import visibility
from cohortflow.demo.launching import Launch, save_version
from cohortflow.demo.options import (
    CHANNEL,
    DRIP_SPEC,
    PURPOSE,
    DemoOptions,
    example_spec,
    seeded,
    timezone_for,
)
from cohortflow.pseudonymisation import Pseudonymiser
from cohortflow.settings import Settings
from cohortflow.spec import load_spec_file
from cohortflow.storage import customers
from cohortflow.storage.db import Database
from workflows.campaign.contract import SA

Progress = Callable[[str], None]
SIGNED_UP = "signed_up"


_RATE_LIMITED_TRIES = 30


def signup_ids(n: int) -> list[str]:
    """The source ids of the demo's signups."""
    return [f"signup-{i:05d}" for i in range(1, n + 1)]


def buyers(ids: Sequence[str], options: DemoOptions) -> list[str]:
    """The seeded share of signups who buy while the drip waits for their first purchase."""
    return [i for i in ids if seeded("purchase", i, options.purchase_share)]


def purchase_amount(source_id: str) -> float:
    """A plausible first order, the same on every run."""
    return float(20 + int.from_bytes(source_id.encode()[-2:], "big") % 80)


async def post_json(api: httpx.AsyncClient, path: str, body: dict[str, Any]) -> httpx.Response:
    """POST ``body``; a 429 (the token's rate limit) is waited out as ``Retry-After`` says."""
    for _ in range(_RATE_LIMITED_TRIES):
        response = await api.post(path, json=body)
        if response.status_code != 429:
            break
        await asyncio.sleep(float(response.headers.get("Retry-After", "1")))
    response.raise_for_status()
    return response


SEGMENT_BATCH_EVENTS = 500  # well inside Segment's 500 KB a batch for these events


async def post_events(api: httpx.AsyncClient, events: list[dict[str, Any]]) -> dict[str, int]:
    """Send events as a Segment SDK would (``/v1/batch``); returns the summed counts.

    Signals Temporal could not take at once stay owed and the API's relay delivers them, so
    a slow Temporal is not a failure here.
    """
    totals = {"accepted": 0, "duplicates": 0, "rejected": 0, "signalled": 0}
    for start in range(0, len(events), SEGMENT_BATCH_EVENTS):
        batch = {
            "batch": events[start : start + SEGMENT_BATCH_EVENTS],
            "sentAt": datetime.now(UTC).isoformat(),
        }
        body = (await post_json(api, "/v1/batch", batch)).json()
        for name in totals:
            totals[name] += int(body.get(name) or 0)
    if totals["rejected"]:
        raise RuntimeError(f"the API rejected {totals['rejected']} demo events")
    return totals


async def prepare_drip(
    settings: Settings,
    db: Database,
    api: httpx.AsyncClient,
    options: DemoOptions,
    progress: Progress,
) -> Launch:
    """Sign the signups up through the API and store the drip's spec version."""
    ids = signup_ids(options.signups)
    pseudonymiser = Pseudonymiser.from_settings(settings)
    keys = [pseudonymiser.customer_key(i) for i in ids]
    async with db.transaction() as session:
        known = {k for k in keys if await customers.get_customer(session, k) is not None}
    now = datetime.now(UTC).isoformat()
    progress(f"signing up {len(ids)} new customers through {api.base_url}/v1/batch")
    signups: list[dict[str, Any]] = []
    for i in ids:
        traits = {"email": f"{i}@example.com", "timezone": timezone_for(i, options)}
        signups += [
            {
                "type": "identify",
                "messageId": f"demo-identify-{i}",
                "userId": i,
                "timestamp": now,
                "traits": {**traits, "plan": "free"},
            },
            {
                "type": "track",
                "event": SIGNED_UP,
                "messageId": f"demo-signup-{i}",
                "userId": i,
                "timestamp": now,
            },
        ]
    await post_events(api, signups)
    # Consent is asked at signup; only new customers answer, so an operator's change sticks.
    for source_id, key in zip(ids, keys, strict=True):
        if key in known:
            continue
        await post_json(
            api,
            "/v1/consent",
            {
                "customer_id": source_id,
                "channel": CHANNEL,
                "purpose": PURPOSE,
                "granted": not seeded("optout", source_id, options.opt_out_share),
                "source": "demo-signup",
            },
        )
    spec = load_spec_file(example_spec(DRIP_SPEC))
    version = await save_version(db, spec)
    progress(
        f"cohort {spec.entry_cohort}: signed up in the last 7 days; {spec.campaign_id} v{version}"
    )
    return Launch(spec=spec, version=version, cohort=signed_up_cohort(spec.entry_cohort))


def signed_up_cohort(cohort_id: str) -> dict[str, Any]:
    """The drip's entry cohort: customers who signed up in the last week."""
    return {
        "cohort_id": cohort_id,
        "name": "new signups",
        "rule": {"event": SIGNED_UP, "within": "P7D", "op": ">=", "count": 1},
    }


async def first_purchases(
    api: httpx.AsyncClient, options: DemoOptions, progress: Progress
) -> dict[str, int]:
    """The seeded buyers make their first purchase; the API signals their campaigns."""
    chosen = buyers(signup_ids(options.signups), options)
    now = datetime.now(UTC).isoformat()
    totals = await post_events(
        api,
        [
            {
                "type": "track",
                "event": "purchase",
                "messageId": f"demo-purchase-{i}",
                "userId": i,
                "timestamp": now,
                "properties": {"amount": purchase_amount(i), "currency": "USD"},
            }
            for i in chosen
        ],
    )
    progress(
        f"{len(chosen)} signups bought: {totals['accepted']} purchase events accepted, "
        f"{totals['duplicates']} already known, {totals['signalled']} campaigns signalled"
    )
    return {"purchases": len(chosen), **totals}


async def purchases_heard(
    client: Client, drip: Launch, settings: Settings, options: DemoOptions
) -> None:
    """Wait until no buyer's drip campaign still waits for the purchase it was sent
    (TimeoutError after the demo's settle timeout)."""
    pseudonymiser = Pseudonymiser.from_settings(settings)
    keys = [pseudonymiser.customer_key(i) for i in buyers(signup_ids(options.signups), options)]
    if not keys:
        return
    query = visibility.running(
        visibility.equals(SA.CAMPAIGN_ID, drip.campaign_id),
        visibility.equals(SA.CAMPAIGN_STATE, "waiting"),
        visibility.one_of(SA.CUSTOMER_KEY, keys),
    )
    deadline = time.monotonic() + options.settle_timeout_seconds
    while (await client.count_workflows(query)).count:
        if time.monotonic() > deadline:
            raise TimeoutError("buyers' drip campaigns did not hear their purchases in time")
        await asyncio.sleep(0.2)
