"""The payload converter's JSON (dataclasses encoded without ``asdict``'s deep copies) is
the SDK default's JSON byte for byte, for the messages a campaign sends and carries, and
reads back into the same dataclasses."""

from __future__ import annotations

from typing import Any

import temporalio.converter

from cohortflow.payload_json import PayloadConverter
from cohortflow.spec import parse_spec
from tests.harness import spec_document
from workflows.campaign.activity_io import Decision
from workflows.campaign.contract import CampaignState
from workflows.campaign.definition import plain
from workflows.campaign.messages import CustomerEvent, DecideRequest, PendingApproval
from workflows.campaign.state import CampaignInput, RunState


def carried_input() -> CampaignInput:
    """A continuation's input: a pinned spec and a run state with every nested kind."""
    document = spec_document()
    decide = DecideRequest("a1", True, "alice", "fine", ["approver"])
    carried = RunState(
        step_id="approve",
        entered_at="2026-12-08T00:00:00+00:00",
        scores={"churn": 0.25},
        features={"recency_days": 3.0},
        pending_approval=PendingApproval("a1", "approve", "high churn", "t0", "t1"),
        revoked=[["email", "marketing"]],
        events_awaited=["purchase"],
        steps_run=["score", "route"],
        current=CampaignState.AWAITING_APPROVAL,
        decision=decide,
        approvals=[decide],
        unrecorded=[Decision("route", "branch", {"next": "approve", "why": ("a", 1)})],
        early_events=[CustomerEvent("purchase", "2026-12-08T00:00:00Z", "m1", {"n": [1, 2]})],
        transitions=["entered", "scored"],
    )
    return CampaignInput(
        campaign_id=document["campaign_id"],
        version=3,
        customer_key="c_1",
        entry_id="1",
        cohort_id="vip",
        carried=carried,
        spec=plain(parse_spec(document).to_definition(3, "alice")),
    )


def test_the_json_is_the_sdk_defaults_byte_for_byte() -> None:
    ours, sdks = PayloadConverter(), temporalio.converter.DefaultPayloadConverter()
    carried = carried_input()
    values: list[Any] = [carried, CampaignInput("c", 1, "k", "1", "h"), {"a": [1]}, "s"]
    for value in values:
        [mine], [theirs] = ours.to_payloads([value]), sdks.to_payloads([value])
        assert mine == theirs
    [payload] = ours.to_payloads([carried])
    [back] = ours.from_payloads([payload], [CampaignInput])
    # The tuple inside a decision's payload comes back as JSON's list, as with the SDK's.
    assert back == carried_input_as_read(carried)


def carried_input_as_read(sent: CampaignInput) -> CampaignInput:
    assert sent.carried is not None
    [decision] = sent.carried.unrecorded
    decision.payload["why"] = list(decision.payload["why"])
    return sent
