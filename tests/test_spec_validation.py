"""Campaign spec validation: every problem at once with its path, and property tests that
the validator never crashes and never accepts a spec the interpreter cannot run."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from temporalio.converter import DataConverter

from cohortflow.campaigns.preview import PreviewContext, walk
from cohortflow.spec import SpecError, json_schema, load_spec_file, load_spec_text, parse_spec
from workflows.campaign.definition import CampaignSpecDef, from_plain, plain

ROOT = Path(__file__).resolve().parents[1]
# `examples/` links to the packaged `cohortflow/examples/`, which the demo runs.
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def base(**overrides: Any) -> dict[str, Any]:
    document: dict[str, Any] = {
        "campaign_id": "spec_test",
        "name": "Spec test",
        "owner": "crm-team",
        "entry_cohort": "cohort_a",
        "safe_default_segment": "nurture_default",
        "steps": [
            {"id": "score", "type": "score", "models": ["churn"]},
            {"id": "hold", "type": "wait", "duration": "P1D"},
            {"id": "done", "type": "exit"},
        ],
    }
    document.update(overrides)
    return document


def problems_of(document: Any) -> list[str]:
    with pytest.raises(SpecError) as caught:
        parse_spec(document)
    return caught.value.problems


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_shipped_examples_are_valid(path: Path) -> None:
    spec = load_spec_file(path)
    definition = spec.to_definition(1)
    assert definition.steps
    assert from_plain(plain(definition)) == definition


def test_every_problem_is_listed_at_once_with_its_path() -> None:
    document = base(
        steps=[
            {"id": "score", "type": "score", "models": ["churn"]},
            {"id": "hold", "type": "wait", "duration": "P3X"},
            {"id": "route", "type": "branch", "rules": [], "next": "nowhere"},
            {"id": "later", "type": "crm", "action": "enroll_sequence"},
            {"id": "ask", "type": "approval"},
            {"id": "done", "type": "exit"},
            {"id": "orphan", "type": "exit"},
        ]
    )
    problems = problems_of(document)
    assert problems == [
        "steps[1].duration: 'P3X' is not an ISO-8601 duration such as P3D or PT30S",
        "steps[2]: a branch step needs 'rules'",
        "steps[3]: enroll_sequence needs 'sequence_id'",
        "steps[2].next: unknown step 'nowhere'",
        "steps[6]: step 'orphan' is unreachable from the first step",
        "steps[4]: approval steps are only allowed in a campaign marked sensitive",
    ]


def test_graph_problems_of_an_otherwise_valid_spec() -> None:
    document = base(
        sensitive=False,
        steps=[
            {"id": "score", "type": "score", "models": ["churn"]},
            {
                "id": "route",
                "type": "branch",
                "rules": [{"all": [{"score": "churn", "op": ">", "value": 0.5}], "next": "ghost"}],
                "default": "score",
            },
            {"id": "done", "type": "exit"},
            {"id": "done", "type": "exit"},
        ],
    )
    assert problems_of(document) == [
        "steps[3].id: duplicate step id 'done'",
        "steps[1].rules[0].next: unknown step 'ghost'",
        "steps[2]: step 'done' is unreachable from the first step",
        "steps[0]: loop score -> route -> score has no wait step, so it would repeat without "
        "ever pausing",
    ]


def test_a_loop_through_a_wait_is_accepted() -> None:
    document = base(
        steps=[
            {"id": "score", "type": "score", "models": ["churn"]},
            {"id": "nudge", "type": "crm", "action": "add_to_list", "list_id": "l1"},
            {
                "id": "hold",
                "type": "wait",
                "event": "purchase",
                "timeout": "P7D",
                "on_event": "done",
                "on_timeout": "nudge",
            },
            {"id": "done", "type": "exit"},
        ]
    )
    assert parse_spec(document).steps[2].on_timeout == "nudge"


def test_an_approval_inside_a_loop_is_refused() -> None:
    document = base(
        sensitive=True,
        steps=[
            {"id": "ask", "type": "approval"},
            {"id": "hold", "type": "wait", "duration": "P1D", "next": "ask"},
        ],
    )
    assert problems_of(document) == [
        "steps[0]: approval step 'ask' is inside a loop; a campaign asks for one approval once"
    ]


@pytest.mark.parametrize(
    ("step", "problem"),
    [
        ({"type": "wait"}, "a wait step needs exactly one of 'duration', 'until' or 'event'"),
        (
            {"type": "wait", "duration": "P1D", "until": "09:00"},
            "a wait step needs exactly one of 'duration', 'until' or 'event'",
        ),
        ({"type": "wait", "until": "25:00"}, "'25:00' is not a local time of day HH:MM"),
        (
            {"type": "wait", "event": "purchase"},
            "a wait for an event needs 'timeout' (an ISO-8601 duration)",
        ),
        (
            {"type": "wait", "duration": "P1D", "on_timeout": "done"},
            "'timeout', 'on_event' and 'on_timeout' only apply to a wait for an event",
        ),
        ({"type": "wait", "duration": "PT0S"}, "'PT0S' must be longer than zero"),
        ({"type": "wait", "duration": "P99999D"}, "longer than the longest allowed duration"),
        ({"type": "exit", "duration": "P1D"}, "duration only apply to wait steps"),
        ({"type": "exit", "on_capped": "done"}, "'on_capped' only applies to crm steps"),
    ],
)
def test_wait_and_step_field_rules(step: dict[str, Any], problem: str) -> None:
    document = base()
    document["steps"][1] = {"id": "hold", **step}
    assert any(problem in p for p in problems_of(document)), problems_of(document)


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        ({"default_timezone": "Mars/Olympus"}, "default_timezone: 'Mars/Olympus' is not an IANA"),
        ({"quiet_hours": {"start": "22:00", "end": "22:00"}}, "quiet_hours: quiet hours need"),
        ({"frequency_cap": {"max_actions": 0}}, "frequency_cap.max_actions:"),
        ({"conversion": {"event": "purchase", "window": "P0D"}}, "conversion.window:"),
        ({"holdout_percent": 60}, "holdout_percent:"),
        (
            {"holdout_percent": 10, "holdout_stratify": {"score": "churn", "bands": [0.8, 0.5]}},
            "holdout_stratify.bands: Value error, bands are distinct",
        ),
        (
            {"holdout_percent": 10, "holdout_stratify": {"score": "propensity", "bands": [0.5]}},
            "holdout_stratify.score: the first step must be a score step with model 'propensity'",
        ),
        (
            {"holdout_stratify": {"score": "churn", "bands": [0.5]}},
            "holdout_stratify: only applies when holdout_percent is above 0",
        ),
    ],
)
def test_campaign_settings_rules(overrides: dict[str, Any], problem: str) -> None:
    problems = problems_of(base(**overrides))
    assert any(p.startswith(problem.replace("Value error, ", "")) for p in problems), problems


def test_yaml_text_errors_name_the_source() -> None:
    with pytest.raises(SpecError) as caught:
        load_spec_text("steps: [unclosed", "bad.yaml")
    assert caught.value.problems[0].startswith("bad.yaml: not valid YAML or JSON")
    with pytest.raises(SpecError) as caught:
        load_spec_text("- a list", "list.yaml")
    assert caught.value.problems == ["list.yaml: a spec is a mapping of fields"]


def test_json_schema_describes_every_step_type_and_setting() -> None:
    schema = json_schema()
    assert schema["title"] == "CampaignSpec"
    for name in (
        "frequency_cap",
        "quiet_hours",
        "conversion",
        "holdout_stratify",
        "exit_on_events",
    ):
        assert name in schema["properties"]
    step = schema["$defs"]["StepSpec"]
    assert set(step["properties"]["type"]["enum"]) == {
        "score",
        "branch",
        "approval",
        "crm",
        "wait",
        "exit",
    }


# ---------------------------------------------------------------------- property tests

GOOD_DURATIONS = ["P1D", "PT30S", "P1DT2H", "PT1.5H"]
BAD_DURATIONS = ["P3X", "PT0S", "", "P9999999D", "P"]


def nested(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Lists and mappings of ``inner``: JSON's containers."""
    return st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    nested,
    max_leaves=10,
)


def mostly(good: list[Any], bad: list[Any]) -> st.SearchStrategy[Any]:
    """A valid value 19 times in 20, so many drawn specs pass and get run."""
    return st.integers(0, 19).flatmap(
        lambda roll: st.sampled_from(bad) if roll == 0 else st.sampled_from(good)
    )


@st.composite
def steps(draw: st.DrawFn, ids: list[str]) -> list[dict[str, Any]]:
    """Steps with the given ids, references among them (or to a ghost), fields mostly valid."""
    out = []
    for index, step_id in enumerate(ids):
        # Mostly forward (reachable), sometimes back (a loop) or to a step that is not there.
        ref = mostly(ids[index + 1 :] or ids[-1:], [*ids, "ghost"])
        last = step_id == ids[-1]
        kinds = ["exit"] if last else ["score", "branch", "approval", "crm", "wait", "wait"]
        kind = draw(mostly(kinds, ["bogus", "exit"]))
        step: dict[str, Any] = {"id": step_id, "type": kind}
        if draw(st.integers(0, 3)) == 0:
            step["next"] = draw(ref)
        if kind == "score":
            step["models"] = draw(mostly([["churn"], ["churn", "propensity"]], [[]]))
        if kind == "branch":
            comparison = {
                draw(st.sampled_from(["score", "feature"])): "churn",
                "op": draw(mostly([">", "<=", "=="], ["~"])),
                "value": draw(st.floats(allow_nan=True, allow_infinity=True)),
            }
            step["rules"] = [{"all": [comparison], "next": draw(ref)}]
            step["default"] = draw(ref)
        if kind == "crm":
            action = draw(st.sampled_from(["set_properties", "enroll_sequence", "add_to_list"]))
            step |= {"action": action, "properties": {"k": "{cohort}"}, "sequence_id": "s"}
            step["list_id"] = draw(mostly(["l"], [""]))
            if draw(st.booleans()):
                step["on_capped"] = draw(ref)
        if kind == "wait":
            which = draw(mostly(["duration", "until", "event"], ["mixed"]))
            if which in ("duration", "mixed"):
                step["duration"] = draw(mostly(GOOD_DURATIONS, BAD_DURATIONS))
            if which in ("until", "mixed"):
                step["until"] = draw(mostly(["09:00", "23:59", "02:30"], ["24:00", "9am"]))
            if which in ("event", "mixed"):
                step["event"] = "purchase"
                step["timeout"] = draw(mostly(GOOD_DURATIONS, BAD_DURATIONS))
                step["on_event"] = draw(ref)
                step["on_timeout"] = draw(ref)
        if kind == "exit":
            step["outcome"] = draw(mostly(["completed", "exited"], ["rejected"]))
        if draw(st.integers(0, 19)) == 0:
            step[draw(st.text(max_size=4))] = draw(json_values)
        out.append(step)
    return out


@st.composite
def documents(draw: st.DrawFn) -> dict[str, Any]:
    count = draw(st.integers(0, 6))
    ids = [f"s{i}" for i in range(count)]
    if count and draw(st.integers(0, 19)) == 0:
        ids[-1] = ids[0]  # a duplicate id
    document = base(steps=draw(steps(ids)))
    document["sensitive"] = draw(mostly([True], [False]))
    if draw(st.booleans()):
        document["holdout_percent"] = draw(st.floats(-1, 51))
    if draw(st.booleans()):
        document["quiet_hours"] = {"start": "21:00", "end": draw(mostly(["08:00"], ["x"]))}
    if draw(st.booleans()):
        document["frequency_cap"] = {"max_actions": draw(mostly([1, 3], [0])), "per": "P7D"}
    if draw(st.booleans()):
        document["conversion"] = {
            "event": "purchase",
            "window": draw(mostly(GOOD_DURATIONS, BAD_DURATIONS)),
        }
    if draw(st.integers(0, 19)) == 0:
        document[draw(st.sampled_from(["name", "steps", "owner", "extra"]))] = draw(json_values)
    return document


async def assert_runnable(definition: CampaignSpecDef, scores: float, events: bool) -> None:
    """What the interpreter relies on: closed references, waits in every loop, durations it
    can time, a payload Temporal can carry, and a walk that never crashes."""
    ids = {s.id for s in definition.steps}
    assert len(ids) == len(definition.steps)
    for step in definition.steps:
        targets = [step.next, step.default, step.on_event, step.on_timeout, step.on_capped]
        targets += [r.next for r in step.rules]
        assert {t for t in targets if t is not None} <= ids
        if step.type == "wait":
            assert step.until or step.seconds > 0
    converter = DataConverter.default.payload_converter
    assert converter.from_payload(converter.to_payload(definition), CampaignSpecDef) == definition
    # As the launcher pins it in a campaign's input, and the workflow reads it back.
    pinned = converter.from_payload(converter.to_payload(plain(definition)), dict[str, Any])
    assert from_plain(pinned) == definition
    ctx = PreviewContext(
        customer_key="c_property",
        now=datetime(2026, 3, 8, 6, 30, tzinfo=UTC),
        timezone=ZoneInfo("America/New_York"),
        scores={"churn": scores, "propensity": 1 - scores},
        features={"churn": scores},
        consent={("email", "marketing"): True},
        events=frozenset({"purchase"}) if events else frozenset(),
    )
    result = await walk(definition, ctx)
    approvals = [s.step_id for s in result.steps if s.type == "approval"]
    assert len(approvals) == len(set(approvals)), "an approval asked twice"
    # A loop must pass a wait: between two waits the walk visits each step at most once.
    since_wait = 0
    for step in result.steps:
        since_wait = 0 if step.type == "wait" else since_wait + 1
        assert since_wait <= len(definition.steps)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents(), st.floats(0, 1), st.booleans())
async def test_validator_never_crashes_nor_accepts_what_the_interpreter_cannot_run(
    document: dict[str, Any], score: float, events: bool
) -> None:
    try:
        spec = parse_spec(copy.deepcopy(document))
    except SpecError as exc:
        assert exc.problems and all(": " in p for p in exc.problems)
        return
    await assert_runnable(spec.to_definition(1), score, events)


@settings(max_examples=200, deadline=None)
@given(json_values)
def test_validator_never_crashes_on_any_json(document: Any) -> None:
    try:
        parse_spec(document)
    except SpecError as exc:
        assert exc.problems


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(documents())
def test_a_spec_that_parses_parses_the_same_from_its_own_json(document: dict[str, Any]) -> None:
    try:
        spec = parse_spec(copy.deepcopy(document))
    except SpecError:
        return
    assert parse_spec(spec.model_dump(mode="json")) == spec
