"""Property tests of the parsers that take outside input: events, cohort definitions and
settings. Any JSON (lone surrogates, huge numbers, NaN, deep nesting included) either parses
or is refused with the project's own error naming a field; never another exception. What
parses survives a round trip through its own JSON.

Campaign specs have the same properties in test_spec_validation.py, the CRM's answers in
test_crm_hubspot_garbage.py.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from typing import Any
from unittest import mock

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from pydantic_settings import SettingsError

from cohortflow.cohorts.rules import PLAIN_FEATURES, CohortDefinition, CohortError, parse_cohort
from cohortflow.errors import Invalid
from cohortflow.events.schema import EVENT_TYPES, MAX_NESTING, Received, parse_event
from cohortflow.settings import Settings

PROPERTIES = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# Any code point, lone surrogates included: valid in JSON text, not in UTF-8.
any_text = st.text(st.characters(blacklist_categories=()), max_size=12)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.floats(allow_nan=True, allow_infinity=True)
    | any_text
)


def json_of(keys: st.SearchStrategy[str], leaves: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """JSON values whose object keys are mostly ``keys``, so objects look like the real one."""
    return st.recursive(
        leaves,
        lambda inner: (
            st.lists(inner, max_size=3) | st.dictionaries(keys | any_text, inner, max_size=5)
        ),
        max_leaves=20,
    )


# ---------------------------------------------------------------------- events

EVENT_KEYS = st.sampled_from(
    [
        *("type", "messageId", "userId", "anonymousId", "timestamp", "sentAt", "event"),
        *("properties", "traits", "context", "groupId", "previousId", "name", "amount", "email"),
    ]
)
event_leaves = scalars | st.sampled_from(
    [*EVENT_TYPES, "purchase", "2026-03-01T10:00:00Z", "0001-01-01T00:00:00+15:00", "u1"]
)


def deep(levels: int) -> dict[str, Any]:
    """``{"a": {"a": ... 1}}``, ``levels`` objects deep."""
    value: Any = 1
    for _ in range(levels):
        value = {"a": value}
    return dict(value)


@st.composite
def events(draw: st.DrawFn) -> Any:
    """Anything JSON, mostly an object with an event's keys, sometimes a well-formed event
    with one field replaced, sometimes nested past the limit."""
    roll = draw(st.integers(0, 9))
    if roll < 4:
        return draw(json_of(EVENT_KEYS, event_leaves))
    event: dict[str, Any] = {
        "type": draw(st.sampled_from(EVENT_TYPES)),
        "messageId": draw(any_text.filter(bool) | st.just("m1")),
        "userId": draw(st.sampled_from(["u1", 42, ""]) | any_text),
        "event": draw(st.sampled_from(["purchase", "visit", "bad name!"])),
        "properties": {"amount": draw(scalars)},
        "traits": {"email": draw(st.sampled_from(["a@b.c", "nope"]) | any_text)},
        "groupId": "g",
        "previousId": "p",
    }
    if draw(st.booleans()):
        event["timestamp"] = draw(st.sampled_from(["2026-03-01T10:00:00Z", "yesterday", 0]))
    if roll == 9:
        event["properties"] = deep(draw(st.integers(MAX_NESTING - 2, MAX_NESTING + 40)))
    else:
        event[draw(EVENT_KEYS)] = draw(json_of(EVENT_KEYS, event_leaves))
    return event


RECEIVED = Received(at=datetime(2026, 3, 2, tzinfo=UTC), sent_at=None)


@PROPERTIES
@given(events(), st.sampled_from([None, RECEIVED]))
def test_any_json_is_an_event_or_errors_naming_a_field(raw: Any, received: Received | None) -> None:
    parsed = parse_event(raw, received)
    if isinstance(parsed, list):
        assert parsed, "refused without a reason"
        for error in parsed:
            assert isinstance(error["loc"], list)
            assert isinstance(error["msg"], str) and error["msg"]
            assert all(isinstance(part, str | int) for part in error["loc"])
            # An error can always be sent back: it quotes nothing that does not encode.
            error["msg"].encode("utf-8")
            for part in error["loc"]:
                str(part).encode("utf-8")
        if isinstance(raw, dict) and isinstance(raw.get("type"), str):
            assert any(e["loc"] or e["type"] == "too_large" for e in parsed), parsed
        return
    # Accepted: a time in range, text that encodes, and the same event again from its JSON.
    assert parsed.occurred_at.tzinfo is not None
    again = parse_event(parsed.model_dump(mode="json"), received)
    assert again == parsed


# ---------------------------------------------------------------------- cohorts

RULE_KEYS = st.sampled_from(
    [
        *("all", "any", "not", "feature", "score", "event", "op", "value", "within", "count"),
        *("cohort_id", "name", "rule", "description", "evaluate_every"),
    ]
)
rule_leaves = scalars | st.sampled_from(
    ["recency_days", "count:purchase", "churn", ">=", "<", "P30D", "PT0S", "P", "c1", "PT30S"]
)
ops = st.sampled_from(["<", "<=", "==", "!=", ">=", ">"])
comparisons = st.one_of(
    st.builds(
        lambda f, o, v: {"feature": f, "op": o, "value": v},
        st.sampled_from([*sorted(PLAIN_FEATURES), "count:purchase", "days_since:visit"]),
        ops,
        st.floats(-1e6, 1e6),
    ),
    st.builds(lambda o, v: {"score": "churn", "op": o, "value": v}, ops, st.floats(0, 1)),
    st.builds(
        lambda w, o, c: {"event": "purchase", "within": w, "op": o, "count": c},
        st.sampled_from(["P30D", "PT1H", "P1DT2H"]),
        ops,
        st.integers(0, 50),
    ),
)
rules = st.recursive(
    comparisons,
    lambda inner: (
        st.builds(lambda rs: {"all": rs}, st.lists(inner, min_size=1, max_size=3))
        | st.builds(lambda rs: {"any": rs}, st.lists(inner, min_size=1, max_size=3))
        | st.builds(lambda r: {"not": r}, inner)
    ),
    max_leaves=8,
)
good_cohorts = st.builds(
    lambda cid, rule, every: {"cohort_id": cid, "name": "N", "rule": rule, "evaluate_every": every},
    st.from_regex(r"[a-z][a-z0-9_]{0,10}", fullmatch=True),
    rules,
    st.sampled_from(["PT1H", "PT1M", "P1D"]),
)


def cohort_documents() -> st.SearchStrategy[Any]:
    """Anything JSON; a valid definition; a valid one with one field replaced by anything."""
    mutated = st.tuples(good_cohorts, RULE_KEYS, json_of(RULE_KEYS, rule_leaves)).map(
        lambda t: {**t[0], t[1]: t[2]}
    )
    return st.one_of(json_of(RULE_KEYS, rule_leaves), good_cohorts, mutated)


@PROPERTIES
@given(cohort_documents())
def test_any_json_is_a_cohort_or_a_cohort_error_naming_paths(document: Any) -> None:
    try:
        definition = parse_cohort(document)
    except CohortError as exc:
        assert exc.problems
        for problem in exc.problems:
            path, _, message = problem.partition(": ")
            # At no path: a document that is not an object at all, or a key named "".
            assert message and (path or not isinstance(document, dict) or "" in document)
            problem.encode("utf-8")
        return
    assert isinstance(definition, CohortDefinition)
    assert parse_cohort(definition.model_dump(mode="json", by_alias=True)) == definition


@settings(max_examples=100, deadline=None, derandomize=True, database=None)
@given(good_cohorts)
def test_a_valid_definition_always_parses(document: dict[str, Any]) -> None:
    # The generator of valid definitions is itself checked, so the round trip above runs.
    assert parse_cohort(document).cohort_id == document["cohort_id"]


# ---------------------------------------------------------------------- settings

FIELDS = sorted(Settings.model_fields)
env_values = st.one_of(
    st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=20),
    st.sampled_from(["", "0", "-1", "1e400", "nan", "[]", '["*"]', "{}", "true", "production"]),
)


@PROPERTIES
@given(st.dictionaries(st.sampled_from(FIELDS), env_values, min_size=1, max_size=3))
def test_any_environment_gives_settings_or_an_error_naming_its_variable(
    values: dict[str, str],
) -> None:
    environment = {f"COHORTFLOW_{name.upper()}": value for name, value in values.items()}
    clean = {k: v for k, v in os.environ.items() if not k.startswith("COHORTFLOW_")}
    # The real process environment, as an entry point reads it; only ours in it.
    with mock.patch.dict(os.environ, {**clean, **environment}, clear=True):
        try:
            loaded = Settings()
        except ValidationError as exc:
            assert {str(e["loc"][0]) for e in exc.errors()} <= set(values), exc
            return
        except SettingsError as exc:
            # A value that is not the JSON a list or mapping field takes: named by field.
            assert any(f'field "{name}"' in str(exc) for name in values), exc
            return
    try:
        loaded.check_production()
    except Invalid as exc:
        assert exc.field and exc.message
    # Derived values a process reads at start do not raise on anything that loaded.
    for derived in ("resolved_database_url", "resolved_temporal_address", "codec_origins"):
        getattr(loaded, derived)
