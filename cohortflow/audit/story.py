"""One customer's story, told from the audit trail and their cohort entries in words a
person reads: ``cohortflow audit why KEY``."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC
from typing import Any

from cohortflow.storage.tables import AuditRow, CohortTransition

Payload = dict[str, Any]


@dataclass(frozen=True)
class Chapter:
    """One thing that happened: when (ISO-8601, UTC), in which campaign ("" for none), what."""

    at: str
    campaign: str
    text: str

    def line(self) -> str:
        """``2026-12-07 13:20Z winback: approved by alice: ok``."""
        where = f"{self.campaign}: " if self.campaign else ""
        return f"{_minute(self.at)} {where}{self.text}"


def _scores(p: Payload) -> str:
    versions = p.get("model_versions", {})
    told = [f"{score:.2f} {m} by model {versions.get(m, '?')}" for m, score in p["scores"].items()]
    features = p.get("features", {})
    because = ", ".join(f"{name} {_number(value)}" for name, value in features.items())
    return "scored " + ", ".join(told) + (f" because {because}" if because else "")


def _minute(iso: str) -> str:
    return f"{iso[:16].replace('T', ' ')}Z"


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, int | float) else str(value)


def _decided(p: Payload) -> str:
    verdict = "approved" if p.get("approve") else "rejected"
    by = ", ".join(p.get("approved_by", [])) or p.get("operator", "?")
    return f"{verdict} by {by}: {p.get('reason', '')}"


def _branch(p: Payload) -> str:
    if not p.get("matched"):
        return f"went to {p['taken']} (no rule held: the default)"
    seen = ", ".join(f"{name} {_number(value)}" for name, value in p.get("values", {}).items())
    return f"went to {p['taken']} by {p['matched']}" + (f" ({seen})" if seen else "")


def _waited(p: Payload) -> str:
    came = "it came" if p["outcome"] == "event" else "it did not come"
    return f"waited for {p['event']}: {came}"


# A template over the row's payload, or a function of it.
_TELLERS: dict[str, str | Callable[[Payload], str]] = {
    "variant_assigned": "put in the {variant} arm ({holdout_percent:g}% held out)",
    "scored": _scores,
    "branch": _branch,
    "holdout_skipped": "{action} skipped: control arm",
    "approval_requested": lambda p: f"approval requested, open until {_minute(p['expires_at'])}",
    "approval_decided": _decided,
    "approval_expired": "approval expired unanswered",
    "approval_withdrawn": "approval request withdrawn: {why}",
    "approval_escalated": "approval escalated before its expiry",
    "consent_allowed": "consent {channel}/{purpose} checked: allowed",
    "consent_blocked": "stopped: no consent for {channel}/{purpose}",
    "frequency_capped": "{action} held back: {recent_actions} actions already in the cap's window",
    "crm_written": "CRM: {action} done",
    "crm_compensated": "CRM: {action} undone after consent was revoked",
    "event_wait": _waited,
    "converted": lambda p: f"converted at {_minute(p['at'])}",
    "finished": "ended {state}: {reason}",
    "fallback": "put in the safe segment {segment}: {reason}",
    "consent_granted": "consent {channel}/{purpose} granted via {how} by {by}",
    "consent_revoked": "consent {channel}/{purpose} revoked via {how} by {by}",
    "customer_erased": "personal data erased by {by}: {reason}",
    "erasure_refused": "erasure refused by legal hold ({legal_hold})",
}


def chapter(at: str, campaign: str, kind: str, payload_text: str) -> Chapter:
    """One audit row in words (an unknown kind, or a payload without the expected fields, is
    told as it is stored rather than dropped)."""
    payload: Payload = json.loads(payload_text)
    teller = _TELLERS.get(kind)
    try:
        if teller is None:
            text = f"{kind} {payload_text}"
        elif isinstance(teller, str):
            text = teller.format_map(payload)
        else:
            text = teller(payload)
    except (KeyError, TypeError, ValueError, AttributeError):
        text = f"{kind} {payload_text}"
    return Chapter(at, "" if campaign == "-" else campaign, text)


def cohort_chapter(at: str, cohort_id: str, kind: str) -> Chapter:
    """A cohort entry or exit in words."""
    verb = "entered" if kind == "entered" else "left"
    return Chapter(at, "", f"{verb} cohort {cohort_id}")


def in_order(chapters: Iterable[Chapter]) -> list[Chapter]:
    """The chapters by time (stable: the trail's own order within one instant)."""
    return sorted(chapters, key=lambda c: c.at)


def story(rows: Iterable[AuditRow], transitions: Iterable[CohortTransition]) -> list[Chapter]:
    """A customer's audit rows and cohort transitions as one story, in order."""
    told = [chapter(r.created_at, r.campaign_id, r.kind, r.payload) for r in rows]
    for t in transitions:
        at = t.at if t.at.tzinfo else t.at.replace(tzinfo=UTC)  # SQLite drops the zone
        told.append(cohort_chapter(at.isoformat(timespec="microseconds"), t.cohort_id, t.kind))
    return in_order(told)
