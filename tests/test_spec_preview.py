"""The dry-run walk behind `campaign preview`: the same rules as the workflow, no side effect."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

from cohortflow.campaigns.preview import PreviewContext, summarise, walk
from cohortflow.spec import parse_spec
from workflows.campaign.definition import CampaignSpecDef
from workflows.campaign.interpreter import holdout_variant


def definition(**settings: Any) -> CampaignSpecDef:
    return parse_spec(
        {  # `settings` may replace any field, the steps too
            "campaign_id": "preview_test",
            "name": "Preview",
            "owner": "crm-team",
            "entry_cohort": "cohort_a",
            "safe_default_segment": "nurture_default",
            "steps": [
                {"id": "score", "type": "score", "models": ["churn"]},
                {
                    "id": "route",
                    "type": "branch",
                    "rules": [
                        {"all": [{"score": "churn", "op": ">=", "value": 0.5}], "next": "label"}
                    ],
                    "default": "done",
                },
                {
                    "id": "label",
                    "type": "crm",
                    "action": "set_properties",
                    "properties": {"churn": "{score.churn}", "arm": "{variant}"},
                    "on_capped": "done",
                },
                {"id": "enrol", "type": "crm", "action": "enroll_sequence", "sequence_id": "s"},
                {"id": "done", "type": "exit"},
            ],
            **settings,
        }
    ).to_definition(3)


def context(key: str, churn: float, **overrides: Any) -> PreviewContext:
    values: dict[str, Any] = {
        "customer_key": key,
        "now": datetime(2026, 11, 1, 4, 30, tzinfo=UTC),  # 00:30 in New York, DST ends tonight
        "timezone": ZoneInfo("America/New_York"),
        "scores": {"churn": churn},
        "consent": {("email", "marketing"): True},
    }
    return PreviewContext(**(values | overrides))


async def test_the_walk_follows_branches_and_renders_the_writes() -> None:
    result = await walk(definition(), context("c_1", 0.8))
    assert result.path == "score > route > label > enrol > done"
    assert [s.crm_write for s in result.steps if s.crm_write] == [
        "set_properties arm=treatment, churn=0.8000",
        "enroll_sequence sequence s",
    ]
    assert (await walk(definition(), context("c_1", 0.2))).path == "score > route > done"


async def test_quiet_hours_delay_the_write_to_the_local_end_across_dst() -> None:
    spec = definition(quiet_hours={"start": "21:00", "end": "08:00"})
    label = (await walk(spec, context("c_1", 0.8))).steps[2]
    assert label.detail.startswith("quiet hours: waits until 2026-11-01T13:00+00:00")


async def test_the_cap_takes_on_capped_and_control_writes_nothing() -> None:
    spec = definition(frequency_cap={"max_actions": 2, "per": "P7D"})
    capped = await walk(spec, context("c_1", 0.8, recent_actions=2))
    assert capped.path == "score > route > label > done"
    assert "frequency cap reached (2/2)" in capped.steps[2].detail
    # One slot left: the label takes it, then the enrolment is capped and falls through.
    one_left = await walk(spec, context("c_1", 0.8, recent_actions=1))
    assert [s.crm_write != "" for s in one_left.steps if s.type == "crm"] == [True, False]
    held = definition(holdout_percent=50)
    control = next(
        f"c_{n}" for n in range(100) if holdout_variant("preview_test", f"c_{n}", 50) == "control"
    )
    result = await walk(held, context(control, 0.8))
    assert result.variant == "control" and not any(s.crm_write for s in result.steps)
    assert result.outcome == "completed"


async def test_a_control_customer_skips_the_approval_a_treated_one_waits_for() -> None:
    spec = definition(
        steps=[
            {"id": "score", "type": "score", "models": ["churn"]},
            {"id": "approve", "type": "approval", "reason": "offer"},
            {"id": "label", "type": "crm", "action": "set_properties", "properties": {"a": "1"}},
        ],
        sensitive=True,
        holdout_percent=50,
    )
    keys = [f"c_{n}" for n in range(100)]
    control = next(k for k in keys if holdout_variant("preview_test", k, 50) == "control")
    treated = next(k for k in keys if holdout_variant("preview_test", k, 50) == "treatment")
    skipped = await walk(spec, context(control, 0.8))
    assert skipped.steps[1].detail == "skipped: control arm (holdout)"
    assert skipped.outcome == "completed"
    refused = await walk(spec, context(treated, 0.8, approve=False))
    assert refused.path == "score > approve" and refused.outcome == "rejected"


async def test_a_model_that_cannot_score_ends_the_walk_in_the_safe_default() -> None:
    result = await walk(definition(), context("c_1", 0.8, scores={}))
    assert (result.path, result.outcome) == ("score", "fallback")
    assert result.reason == "scoring failed: segment nurture_default"


async def test_a_cohort_summary_counts_paths_outcomes_and_writes() -> None:
    spec = definition()
    results = [
        await walk(spec, context("c_a", 0.9)),
        await walk(spec, context("c_b", 0.7)),
        await walk(spec, context("c_c", 0.1)),
        await walk(spec, context("c_d", 0.9, consent={})),
    ]
    paths, outcomes, writes = summarise(results)
    assert paths == {
        "score > route > label > enrol > done": 2,
        "score > route > done": 1,
        "score > route > label": 1,
    }
    assert outcomes == {"completed": 3, "consent_blocked": 1}
    assert writes["enroll_sequence sequence s"] == 2
