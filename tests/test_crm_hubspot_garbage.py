"""Whatever a CRM answers (wrong JSON shapes, wrong types, no JSON, any status, odd rate-limit
headers), a connector raises CrmError or returns outcomes: never another exception."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cohortflow.crm.connector import (
    ContactState,
    ContactWrite,
    CrmConnector,
    CrmError,
    Membership,
    RecordOutcome,
)
from cohortflow.crm.hubspot import HubSpotConnector
from cohortflow.crm.sandbox_connector import SandboxConnector

# Keys the real answers use, so generated objects get past the first checks and into the rest.
KEYS = [
    "results",
    "errors",
    "id",
    "properties",
    "objectWriteTraceId",
    "new",
    "context",
    "ids",
    "category",
    "message",
    "status",
    "sequenceId",
    "recordsIdsAdded",
    "recordIdsAdded",
    "recordIdsRemoved",
    "recordIdsMissing",
    "listId",
    "paging",
    "next",
    "after",
    "policyName",
    "contact_id",
    "sequence_id",
    "list_id",
    "sequences",
    "lists",
    "field",
    "cohortflow_key",
    "tier",
]
STATUSES = [200, 200, 200, 207, 400, 401, 404, 408, 409, 429, 500, 503, 302]

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.sampled_from(["1", "k", "cf0-x", "", "DAILY", "ALREADY_ENROLLED", "s"])
    | st.text(max_size=8)
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=4), inner, max_size=5)
    ),
    max_leaves=25,
)
header_values = st.sampled_from(
    ["7", "-1", "1e400", "nan", "Wed, 21 Oct 2099 07:28:00 GMT", "Wed, 99 Foo", "", "0", "x"]
) | st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=30)


def maybe(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly the right shape, sometimes anything."""
    return st.one_of(valid, valid, valid, json_values)


ids = maybe(st.sampled_from(["1", "2", "512", "k", "j"]) | st.integers(0, 3))
id_lists = maybe(st.lists(ids, max_size=3))
contexts = maybe(
    st.fixed_dictionaries({}, optional={"objectWriteTraceId": id_lists, "ids": id_lists})
)
batch_errors = maybe(
    st.fixed_dictionaries(
        {"category": maybe(st.sampled_from(["VALIDATION_ERROR", "CONFLICT"]))},
        optional={"message": maybe(st.text(max_size=5)), "context": contexts},
    )
)
records = maybe(
    st.fixed_dictionaries(
        {"id": ids},
        optional={
            "properties": maybe(
                st.dictionaries(st.sampled_from(["cohortflow_key", "tier"]), maybe(ids))
            ),
            "objectWriteTraceId": maybe(st.sampled_from(["cf0-x", "cf1-y"])),
            "new": maybe(st.booleans()),
            "listId": ids,
            "sequenceId": ids,
        },
    )
)
# The answers' own shapes, one leaf or branch at a time gone wrong.
shaped = st.one_of(
    st.fixed_dictionaries(
        {"results": maybe(st.lists(records, max_size=3))},
        optional={
            "errors": maybe(st.lists(batch_errors, max_size=2)),
            "paging": maybe(
                st.fixed_dictionaries(
                    {"next": maybe(st.fixed_dictionaries({"after": maybe(st.just(""))}))}
                )
            ),
        },
    ),
    records,
    st.fixed_dictionaries(
        {},
        optional={
            "recordsIdsAdded": id_lists,
            "recordIdsRemoved": id_lists,
            "recordIdsMissing": id_lists,
            "policyName": maybe(st.sampled_from(["DAILY", "SECONDLY", "TEN_SECONDLY_ROLLING"])),
        },
    ),
    st.fixed_dictionaries(
        {"contact_id": ids, "status": maybe(st.sampled_from(["created", "duplicate"]))},
        optional={"sequence_id": ids, "list_id": ids, "sequences": id_lists, "lists": id_lists},
    ),
)


@st.composite
def answers(draw: st.DrawFn) -> httpx.Response:
    status = draw(st.sampled_from(STATUSES))
    headers = {}
    for name in (
        "Retry-After",
        "X-HubSpot-RateLimit-Interval-Milliseconds",
        "X-HubSpot-RateLimit-Daily-Remaining",
    ):
        if draw(st.booleans()):
            headers[name] = draw(header_values).strip()
    if draw(st.integers(0, 9)) == 0:
        content = draw(st.binary(max_size=40))
    else:
        content = json.dumps(draw(st.one_of(shaped, shaped, json_values))).encode()
    return httpx.Response(status, headers=headers, content=content)


Operation = Callable[[CrmConnector], Awaitable[object]]
OPERATIONS: list[Operation] = [
    lambda c: c.upsert_contacts(
        [ContactWrite("w1", "k", {"tier": "gold"}), ContactWrite("w2", "k", {"tier": "x"})]
    ),
    lambda c: c.upsert_contacts([ContactWrite("w1", "k", {}), ContactWrite("w2", "j", {})]),
    lambda c: c.enroll(Membership("e", "k", "s", sender_email="rep@example.com")),
    lambda c: c.unenroll(Membership("u", "k", "s")),
    lambda c: c.add_to_list("7", [Membership("l1", "k", "7"), Membership("l2", "j", "7")]),
    lambda c: c.remove_from_list("7", [Membership("r", "k", "7")]),
    lambda c: c.read_contact("k", ["tier"]),
]


async def _exercise(connector: CrmConnector, operation: Operation) -> object:
    try:
        return await operation(connector)
    finally:
        await connector.aclose()


def _check(result: object) -> None:
    if isinstance(result, list):
        assert all(isinstance(o, RecordOutcome) for o in result)
    else:
        assert result is None or isinstance(result, RecordOutcome | ContactState)


def _transport(replies: list[httpx.Response]) -> httpx.MockTransport:
    served = iter(replies)

    def handle(request: httpx.Request) -> httpx.Response:
        reply = next(served, None)
        if reply is None:
            return httpx.Response(404, json={"message": "no more answers"})
        return httpx.Response(reply.status_code, headers=reply.headers, content=reply.content)

    return httpx.MockTransport(handle)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    operation=st.sampled_from(OPERATIONS),
    replies=st.lists(answers(), min_size=1, max_size=6),
    paths=st.sampled_from(["2026-03", "legacy"]),
    unenroll_path=st.sampled_from([None, "/unenroll"]),
)
def test_hubspot_garbage_is_a_crm_error(
    operation: Operation,
    replies: list[httpx.Response],
    paths: str,
    unenroll_path: str | None,
) -> None:
    connector = HubSpotConnector(
        "https://hubspot.invalid",
        "token",
        paths=paths,
        user_id="1",
        sequence_unenroll_path=unenroll_path,
        clock=lambda: datetime(2026, 3, 1, tzinfo=UTC),
        transport=_transport(replies),
    )
    try:
        result = asyncio.run(_exercise(connector, operation))
    except CrmError:
        return
    _check(result)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(operation=st.sampled_from(OPERATIONS), replies=st.lists(answers(), min_size=1, max_size=4))
def test_sandbox_connector_garbage_is_a_crm_error(
    operation: Operation, replies: list[httpx.Response]
) -> None:
    connector = SandboxConnector("https://sandbox.invalid")
    connector.client._http._transport = _transport(replies)  # the one pooled client
    try:
        result = asyncio.run(_exercise(connector, operation))
    except CrmError:
        return
    _check(result)


def test_a_well_formed_207_maps_each_input() -> None:
    """The shape the garbage above is cut from, answered as HubSpot documents it."""
    captured: list[dict[str, Any]] = []

    def handle(request: httpx.Request) -> httpx.Response:
        inputs = json.loads(request.content)["inputs"]
        captured.extend(inputs)
        ok, bad = inputs
        return httpx.Response(
            207,
            json={
                "status": "COMPLETE",
                "results": [
                    {
                        "id": "512",
                        "properties": {"cohortflow_key": ok["id"]},
                        "objectWriteTraceId": ok["objectWriteTraceId"],
                        "new": True,
                    }
                ],
                "numErrors": 1,
                "errors": [
                    {
                        "status": "error",
                        "category": "VALIDATION_ERROR",
                        "message": 'Property "tier" does not exist',
                        "context": {"objectWriteTraceId": [bad["objectWriteTraceId"]]},
                    }
                ],
            },
        )

    connector = HubSpotConnector(
        "https://hubspot.invalid", "t", transport=httpx.MockTransport(handle)
    )
    outcomes = asyncio.run(
        _exercise(
            connector,
            lambda c: c.upsert_contacts(
                [ContactWrite("w1", "a", {"x": "1"}), ContactWrite("w2", "b", {"tier": "2"})]
            ),
        )
    )

    assert isinstance(outcomes, list)
    assert [(o.key, o.ok, o.crm_id) for o in outcomes] == [("w1", True, "512"), ("w2", False, "")]
    assert 'Property "tier" does not exist' in outcomes[1].error
    assert [i["idProperty"] for i in captured] == ["cohortflow_key", "cohortflow_key"]
    assert len({i["objectWriteTraceId"] for i in captured}) == 2
