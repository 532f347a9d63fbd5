"""Segment's HTTP Tracking API, as the official Segment and RudderStack SDKs send it.

The SDKs run unchanged against the real API over a socket; the events land in the store
with their anonymous profiles merged, their clocks corrected and their unknown fields kept.
"""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import rudderstack.analytics.client as rudder
import segment.analytics.client as segment
from sqlalchemy import select

from cohortflow.events.identities import ANONYMOUS
from cohortflow.storage.db import Database
from cohortflow.storage.tables import Customer, CustomerFeatures, Event, ProfileAlias
from tests.harness import issue_token
from tests.test_events import PSEUDONYMISER, Served, serve_api, settings_for

NOW = datetime.now(UTC)


@pytest.fixture
async def api(db: Database, database_url: str, tmp_path: Path) -> AsyncIterator[Served]:
    """The API over the migrated test database, with an ingest token."""
    async with serve_api(settings_for(database_url, tmp_path)) as served:
        yield served


def write_key(api: Served) -> str:
    """The ingest token of ``api``, which the SDKs send as Segment's write key."""
    return api.headers["Authorization"].removeprefix("Bearer ")


async def stored(db: Database) -> dict[str, Event]:
    """Every stored event by message id."""
    async with db.transaction() as session:
        return {e.message_id: e for e in await session.scalars(select(Event))}


def key(user_id: str) -> str:
    """A known customer's key."""
    return PSEUDONYMISER.customer_key(user_id)


def anonymous_key(anonymous_id: str) -> str:
    """An anonymous profile's key."""
    return PSEUDONYMISER.customer_key(ANONYMOUS + anonymous_id)


async def test_the_segment_sdk_sends_every_call_and_anonymous_history_joins_the_user(
    api: Served, db: Database
) -> None:
    errors: list[Any] = []
    client = segment.Client(
        write_key(api), host=api.url, sync_mode=True, on_error=lambda e, _: errors.append(e)
    )
    context = {"ip": "203.0.113.9", "page": {"path": "/pricing"}, "traits": {"email": "a@b.c"}}

    def send() -> None:
        # Before sign-up: anonymous browsing and a purchase.
        client.page(anonymous_id="anon-1", name="Pricing", message_id="p1", context=context)
        client.track(
            anonymous_id="anon-1",
            event="purchase",
            properties={"amount": 12.5, "coupon": "X"},
            timestamp=NOW - timedelta(days=3),
            message_id="t1",
            integrations={"All": False},
        )
        # Sign-up ties the anonymous id to the user; later calls carry the user id.
        client.identify(
            user_id="user-1",
            anonymous_id="anon-1",
            traits={"email": "ada@example.com", "timezone": "Europe/Paris", "plan": "pro"},
            message_id="i1",
        )
        client.track(user_id="user-1", event="purchase", properties={"amount": 30}, message_id="t2")
        client.screen(user_id="user-1", name="Basket", message_id="s1")
        client.group(user_id="user-1", group_id="acme", traits={"seats": 5}, message_id="g1")
        # A later anonymous event under the merged id lands on the user.
        client.track(anonymous_id="anon-1", event="visit", message_id="t3")

    await asyncio.to_thread(send)
    assert errors == []
    events = await stored(db)
    user = key("user-1")
    assert {e.type for e in events.values()} == {"page", "track", "identify", "screen", "group"}
    assert {m: e.customer_key for m, e in events.items()} == dict.fromkeys(events, user)
    assert events["p1"].properties["name"] == "Pricing"
    assert events["g1"].properties == {"groupId": "acme", "traits": {"seats": 5}}
    # Unknown and context fields are kept; personal context, routing and the key are not.
    raw = events["p1"].raw or {}
    assert raw["context"]["page"] == {"path": "/pricing"}
    assert raw["context"]["library"]["name"] == "analytics-python"  # the SDK's own
    assert "ip" not in raw["context"] and "traits" not in raw["context"]
    assert "integrations" not in (events["t1"].raw or {})
    assert write_key(api) not in json.dumps([e.raw for e in events.values()])
    async with db.transaction() as session:
        features = await session.get(CustomerFeatures, user)
        assert features is not None
        assert features.features["count:purchase"] == 2  # the anonymous purchase counts
        assert await session.get(CustomerFeatures, anonymous_key("anon-1")) is None
        customer = await session.get(Customer, user)
        assert customer is not None and customer.email == "ada@example.com"
        assert customer.attributes == {"plan": "pro"}
        assert await session.get(Customer, anonymous_key("anon-1")) is None
        alias = await session.get(ProfileAlias, anonymous_key("anon-1"))
        assert alias is not None and alias.customer_key == user


async def test_the_rudderstack_sdk_sends_gzipped_batches_and_alias_merges_a_user(
    api: Served, db: Database
) -> None:
    errors: list[Any] = []
    client = rudder.Client(
        write_key(api), host=api.url, sync_mode=True, on_error=lambda e, _: errors.append(e)
    )

    def send() -> None:
        client.track(user_id="old-login", event="visit", message_id="r1")
        client.alias(previous_id="old-login", user_id="new-login", message_id="r2")
        client.track(user_id="old-login", event="visit", message_id="r3")

    await asyncio.to_thread(send)
    assert errors == []
    events = await stored(db)
    assert {e.customer_key for e in events.values()} == {key("new-login")}
    async with db.transaction() as session:
        features = await session.get(CustomerFeatures, key("new-login"))
        assert features is not None and features.features["count:visit"] == 2


async def post(api: Served, path: str, body: Any, **headers: str) -> httpx.Response:
    """POST ``body`` (JSON, or bytes as given) to ``path`` with the write key."""
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with httpx.AsyncClient(base_url=api.url, timeout=30) as http:
        return await http.post(
            path,
            content=content,
            auth=(write_key(api), ""),
            headers={"content-type": "application/json", **headers},
        )


async def test_a_device_clock_hours_off_is_corrected_from_sent_at(
    api: Served, db: Database
) -> None:
    # The device's clock is 5 hours ahead: its timestamp and sentAt are both in the future.
    device_now = datetime.now(UTC) + timedelta(hours=5)
    event = {
        "type": "track",
        "messageId": "skewed",
        "userId": "u",
        "event": "visit",
        "timestamp": (device_now - timedelta(minutes=10)).isoformat(),
    }
    response = await post(api, "/v1/batch", {"batch": [event], "sentAt": device_now.isoformat()})
    assert response.status_code == 200, response.text
    occurred = (await stored(db))["skewed"].occurred_at
    assert abs(occurred - (datetime.now(UTC) - timedelta(minutes=10))) < timedelta(seconds=30)
    # Without sentAt nothing can be corrected, and a time hours ahead is refused by name.
    late = {**event, "messageId": "unsent"}
    response = await post(api, "/v1/track", late)
    assert response.status_code == 400
    assert response.json()["detail"][0]["loc"] == ["body", "timestamp"]
    assert response.json()["message"].endswith("in the future")


async def test_segment_size_limits_and_refusals_name_the_field(api: Served, db: Database) -> None:
    big = {"type": "track", "messageId": "big", "userId": "u", "event": "visit"}
    big["properties"] = {"blob": "x" * 33_000}
    ok = {"type": "track", "messageId": "ok", "userId": "u", "event": "visit", "extra": {"a": 1}}
    response = await post(api, "/v1/batch", {"batch": [big, ok]})
    assert response.status_code == 200
    assert response.json()["results"][0]["errors"][0]["loc"] == ["body", "batch", 0]
    assert (await stored(db))["ok"].raw == {"extra": {"a": 1}}
    response = await post(api, "/v1/track", big)
    assert response.status_code == 413 and response.json()["code"] == "too_large"
    many = {"batch": [{**ok, "messageId": f"m{i}", "pad": "x" * 20_000} for i in range(30)]}
    response = await post(api, "/v1/batch", many)
    assert response.status_code == 413
    response = await post(api, "/v1/identify", {"messageId": "n", "traits": {}})
    assert response.status_code == 400
    assert response.json()["detail"][0]["loc"] == ["body", "userId"]
    response = await post(api, "/v1/page", {"type": "track", "messageId": "x", "userId": "u"})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "type"]
    assert set(await stored(db)) == {"ok"}


async def test_gzip_bodies_are_read_and_a_bomb_is_refused(api: Served, db: Database) -> None:
    event = {"type": "track", "messageId": "z", "userId": "u", "event": "visit"}
    packed = gzip.compress(json.dumps({"batch": [event]}).encode())
    response = await post(api, "/v1/batch", packed, **{"content-encoding": "gzip"})
    assert response.status_code == 200, response.text
    bomb = gzip.compress(b'{"batch": [' + b" " * 50_000_000 + b"]}")
    response = await post(api, "/v1/batch", bomb, **{"content-encoding": "gzip"})
    assert response.status_code == 413
    response = await post(api, "/v1/batch", b"not gzip", **{"content-encoding": "gzip"})
    assert response.status_code == 400 and response.json()["code"] == "gzip_invalid"
    assert set(await stored(db)) == {"z"}


async def test_the_write_key_must_be_a_live_ingest_token(api: Served, db: Database) -> None:
    event = {"type": "track", "messageId": "w", "userId": "u", "event": "visit"}
    operator = await issue_token(db, "ops", "operator")
    async with httpx.AsyncClient(base_url=api.url, timeout=30) as http:
        refused = await http.post("/v1/track", json=event, auth=("cft_wrong_key", ""))
        assert refused.status_code == 401
        forbidden = await http.post("/v1/track", json=event, auth=(operator, ""))
        assert forbidden.status_code == 403
        nothing = await http.post("/v1/track", json=event)
        assert nothing.status_code == 401
    assert await stored(db) == {}


async def test_an_identify_and_a_track_of_one_user_in_one_batch_keep_the_contact_data(
    api: Served, db: Database
) -> None:
    identify = {
        "type": "identify",
        "messageId": "i",
        "userId": "new",
        "traits": {"email": "new@example.com", "timezone": "Asia/Tokyo", "plan": "free"},
    }
    signed_up = {"type": "track", "messageId": "t", "userId": "new", "event": "signed_up"}
    response = await post(api, "/v1/batch", {"batch": [identify, signed_up]})
    assert response.status_code == 200, response.text
    async with db.transaction() as session:
        customer = await session.get(Customer, key("new"))
    assert customer is not None
    assert (customer.email, customer.timezone) == ("new@example.com", "Asia/Tokyo")
    assert customer.attributes == {"plan": "free"}


async def test_input_no_store_can_keep_is_refused_by_path_and_the_rest_is_stored(
    api: Served, db: Database
) -> None:
    def event(message_id: str, **properties: Any) -> str:
        body = {"type": "track", "messageId": message_id, "userId": "u", "event": "purchase"}
        return json.dumps({**body, "properties": {"amount": 1.0, **properties}})

    deep = '{"a": ' * 930 + "1" + "}" * 930
    batch = [
        event("good"),
        event("\ud800"),  # a lone surrogate: valid JSON, not storable text
        event("deep").replace('"amount": 1.0', f'"amount": 1.0, "deep": {deep}'),
        event("huge").replace('"amount": 1.0', '"amount": 1' + "0" * 400),
        event("big").replace('"amount": 1.0', '"amount": 1e308'),
    ]
    body = ('{"batch": [' + ", ".join(batch) + "]}").encode()
    response = await post(api, "/v1/batch", body)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["status"] for r in results] == ["accepted"] + ["rejected"] * 4
    assert results[1]["messageId"] is None  # not echoed: the answer must encode
    locs = [r["errors"][0]["loc"][3:] for r in results[1:]]
    assert locs[0] == ["messageId"]
    assert locs[1][:2] == ["properties", "deep"] and len(locs[1]) == 32
    assert locs[2] == locs[3] == ["properties", "amount"]
    assert set(await stored(db)) == {"good"}
    # Nesting beyond what the JSON parser takes at all is one clear 400, not a 500.
    too_deep = ('{"batch": [' + "[" * 100_000 + "]" * 100_000 + "]}").encode()
    response = await post(api, "/v1/batch", too_deep)
    assert (response.status_code, response.json()["code"]) == (400, "json_invalid")
