"""``cohortflow audit why``: a real campaign (scored, approved, written to the sandbox CRM)
and a consent revocation, told back in order and in words from the store."""

from __future__ import annotations

import re

from cohortflow.audit.story import story
from cohortflow.campaigns.controls import Controls
from cohortflow.pseudonymisation import Pseudonymiser
from cohortflow.storage import audit, cohorts
from tests.harness import Harness, spec_document, wait_for_state, who
from workflows.campaign.contract import CampaignState
from workflows.campaign.messages import DecideRequest
from workflows.campaign.workflow import CampaignWorkflow


async def test_a_customers_story_reads_in_order_and_in_words(harness: Harness) -> None:
    spec, version = await harness.apply(spec_document())
    pseudonymiser = Pseudonymiser(b"k" * 32)
    key = await harness.customer(
        key=pseudonymiser.customer_key("story-1"), recency_days=210.0, frequency=1.0
    )
    async with harness.workers():
        handle = await harness.launch(spec, version, key)
        status = await wait_for_state(handle, CampaignState.AWAITING_APPROVAL)
        assert status.pending_approval is not None
        decision = DecideRequest(
            status.pending_approval.approval_id, True, "alice", "offer fits", ["approver"]
        )
        await handle.execute_update(CampaignWorkflow.decide, decision)
        await harness.result(handle)
    controls = Controls(harness.db, harness.settings, pseudonymiser, None)
    await controls.set_consent(
        "story-1",
        channel="email",
        purpose="marketing",
        granted=False,
        source="cli",
        identity=who("carol", "admin"),
        how="cli",
    )
    async with harness.db.read_transaction() as session:
        told = story(
            await audit.audit_for_customer(session, key), await cohorts.history(session, key)
        )
    lines = [c.line() for c in told]
    texts = [c.text for c in told]
    # In the trail's order, each line stamped and, within a campaign, named by it.
    assert [c.at for c in told] == sorted(c.at for c in told)
    assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\dZ ", line) for line in lines)
    assert lines[0].endswith(f"{spec.campaign_id}: put in the treatment arm (0% held out)")
    scored = next(t for t in texts if t.startswith("scored "))
    assert re.match(r"scored 0\.\d\d churn by model churn-v\d+-\w+ because ", scored)
    assert re.search(r"went to approve by rules\[0\] \(churn 0\.\d+\)", " ".join(texts))
    expected_in_order = [
        "approval requested, open until ",
        "approved by alice: offer fits",
        "consent email/marketing checked: allowed",
        "CRM: set_properties done",
        "CRM: enroll_sequence done",
        "ended completed: ",
        "consent email/marketing revoked via cli by carol",
    ]
    positions = [next(i for i, t in enumerate(texts) if t.startswith(e)) for e in expected_in_order]
    assert positions == sorted(positions), texts
    # The revocation is no campaign's: it carries no campaign name.
    assert told[-1].campaign == "" and told[-1].text.startswith("consent email/marketing revoked")
