"""The relational schema: SQLAlchemy 2 declarative tables, shared by SQLite and PostgreSQL.

Raw customer ids and contact data live only in ``customers``; every other table, the audit
trail included, holds the pseudonymous ``customer_key``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

KEY_LEN = 40
# SQLite only auto-increments INTEGER PRIMARY KEY; PostgreSQL gets a BIGINT identity.
BigId = BigInteger().with_variant(Integer(), "sqlite")

# Explicit constraint names, identical on both dialects, so later migrations can name what
# they alter (SQLite batch migrations cannot drop an unnamed constraint).
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every dialect.

    SQLite has no time zone type: SQLAlchemy stores the wall-clock digits and drops the
    offset, and returns naive values. Converting to UTC on the way in and tagging UTC on the
    way out makes both dialects store and return the same instant. Naive values are refused
    because their instant is ambiguous.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Convert to UTC; reject naive datetimes."""
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value!r}: pass a timezone-aware datetime")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Return a UTC-aware datetime (SQLite hands back naive UTC digits)."""
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    """Declarative base; ``Base.metadata`` is what Alembic migrates."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        dict[str, Any]: JSON,
        datetime: UTCDateTime(),
    }


class Customer(Base):
    """A customer as the source system knows them. The only table with raw ids and contacts."""

    __tablename__ = "customers"

    customer_key: Mapped[str] = mapped_column(String(KEY_LEN), primary_key=True)
    source_id: Mapped[str] = mapped_column(String(200), unique=True)
    email: Mapped[str | None] = mapped_column(String(320))
    timezone: Mapped[str | None] = mapped_column(String(64))  # None: the spec's default
    attributes: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime]
    # Set once the customer's personal data was erased (``cohortflow customer forget``).
    erased_at: Mapped[datetime | None]
    # Why the customer may not be erased (a legal hold), or None.
    legal_hold: Mapped[str | None] = mapped_column(String(300))


class CustomerFeatures(Base):
    """The latest feature vector of a customer (name -> value), as of a point in time."""

    __tablename__ = "customer_features"

    customer_key: Mapped[str] = mapped_column(String(KEY_LEN), primary_key=True)
    features: Mapped[dict[str, Any]]
    as_of: Mapped[datetime]
    updated_at: Mapped[datetime]
    # Activity per day in the feature windows before as_of (``RecentDays``), which re-windows
    # the windowed features at a later day; None for rows not computed from events.
    recent: Mapped[dict[str, Any] | None]


class FeatureChange(Base):
    """A customer whose stored features changed (written or deleted) after the columnar
    snapshot was taken: evaluations read these from ``customer_features`` instead of the
    snapshot, and taking the next snapshot deletes the ones it covers
    (``storage.feature_snapshot``). Append-only; a key may appear more than once."""

    __tablename__ = "feature_changes"

    seq: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    customer_key: Mapped[str] = mapped_column(String(KEY_LEN))


class FeatureSnapshotRow(Base):
    """The current columnar snapshot of ``customer_features`` (one row, ``slot`` 1): its
    file's id, how many customers it holds and the feature name of each column."""

    __tablename__ = "feature_snapshot"

    slot: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    snapshot_id: Mapped[str] = mapped_column(String(32))
    customers: Mapped[int] = mapped_column(BigInteger)
    columns: Mapped[list[str]] = mapped_column(JSON)
    taken_at: Mapped[datetime]


class Consent(Base):
    """Consent per customer, channel and purpose. No row means no consent (opt-in)."""

    __tablename__ = "consents"

    customer_key: Mapped[str] = mapped_column(String(KEY_LEN), primary_key=True)
    channel: Mapped[str] = mapped_column(String(32), primary_key=True)
    purpose: Mapped[str] = mapped_column(String(64), primary_key=True)
    granted: Mapped[bool] = mapped_column(Boolean)
    source: Mapped[str] = mapped_column(String(64))
    updated_at: Mapped[datetime]


class ConsentChange(Base):
    """Every consent decision as evidence, append-only: who gave it, when, how (api, cli,
    import, event, seed, system), from which source, and the policy version or text the
    customer was shown. ``changed`` says whether the effective consent moved."""

    __tablename__ = "consent_history"
    __table_args__ = (Index("ix_consent_history_customer_key_at", "customer_key", "at"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    customer_key: Mapped[str] = mapped_column(String(KEY_LEN))
    channel: Mapped[str] = mapped_column(String(32))
    purpose: Mapped[str] = mapped_column(String(64))
    granted: Mapped[bool] = mapped_column(Boolean)
    changed: Mapped[bool] = mapped_column(Boolean)
    how: Mapped[str] = mapped_column(String(16))
    by: Mapped[str] = mapped_column(String(200))
    source: Mapped[str] = mapped_column(String(64))
    policy_version: Mapped[str | None] = mapped_column(String(64))
    text: Mapped[str | None] = mapped_column(Text)
    at: Mapped[datetime]


class Campaign(Base):
    """A campaign and its operational status (``active``, ``paused``, ``cancelled``)."""

    __tablename__ = "campaigns"

    campaign_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    status: Mapped[str] = mapped_column(String(16), default="active")
    latest_version: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[datetime]


class CampaignSpecVersion(Base):
    """One immutable version of a campaign spec (the validated document, as JSON)."""

    __tablename__ = "campaign_specs"

    campaign_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    spec: Mapped[dict[str, Any]]
    spec_hash: Mapped[str] = mapped_column(String(64))
    created_by: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime]


class CampaignEntry(Base):
    """A launched campaign: one per (campaign, customer, entry), keyed by its workflow id."""

    __tablename__ = "campaign_entries"
    __table_args__ = (UniqueConstraint("campaign_id", "customer_key", "entry_id"),)

    workflow_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    campaign_id: Mapped[str] = mapped_column(String(64), index=True)
    customer_key: Mapped[str] = mapped_column(String(KEY_LEN), index=True)
    entry_id: Mapped[str] = mapped_column(String(64))
    cohort_id: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer)
    launched_at: Mapped[datetime]


class Approval(Base):
    """An approval a campaign asked for; ``status``: pending, approved, rejected, expired."""

    __tablename__ = "approvals"

    approval_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    workflow_id: Mapped[str] = mapped_column(String(200), index=True)
    step_id: Mapped[str] = mapped_column(String(64))
    campaign_id: Mapped[str] = mapped_column(String(64), index=True)
    customer_key: Mapped[str] = mapped_column(String(KEY_LEN))
    reason: Mapped[str] = mapped_column(Text, default="")
    scores: Mapped[dict[str, Any]] = mapped_column(default=dict)
    status: Mapped[str] = mapped_column(String(16), default="pending", index=True)
    requested_at: Mapped[datetime]
    expires_at: Mapped[datetime]
    decided_by: Mapped[str | None] = mapped_column(String(128))
    decided_at: Mapped[datetime | None]
    decision_reason: Mapped[str | None] = mapped_column(Text)
    # Approvals given so far when the spec asks for several approvers; empty otherwise.
    approved_by: Mapped[list[str]] = mapped_column(JSON, default=list, server_default=text("'[]'"))
    # When the request was escalated, unanswered, ahead of its expiry (approval.escalate_before).
    escalated_at: Mapped[datetime | None]


class SegmentAssignment(Base):
    """A customer put in a campaign's safe default segment, and why."""

    __tablename__ = "segment_assignments"

    workflow_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    step_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    campaign_id: Mapped[str] = mapped_column(String(64))
    customer_key: Mapped[str] = mapped_column(String(KEY_LEN), index=True)
    segment: Mapped[str] = mapped_column(String(64))
    reason: Mapped[str] = mapped_column(Text)
    crm_synced: Mapped[bool] = mapped_column(Boolean, default=False)
    assigned_at: Mapped[datetime]


class AuditRow(Base):
    """The append-only, hash-chained audit trail. Never updated, never deleted.

    ``hash`` = SHA-256 over the row's seq, ``prev_hash`` and ``content_hash`` (the rules are
    in ``cohortflow.audit.chain``), so any change, removal or reordering of an earlier row
    breaks every later hash. (workflow, step, kind) is unique, so a retried activity appends
    nothing.
    """

    __tablename__ = "audit_log"
    __table_args__ = (UniqueConstraint("workflow_id", "step_id", "kind", name="uq_audit_wsk"),)

    seq: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=False)
    workflow_id: Mapped[str] = mapped_column(String(200))
    step_id: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(48))
    campaign_id: Mapped[str] = mapped_column(String(64), index=True)
    customer_key: Mapped[str] = mapped_column(String(KEY_LEN), index=True)
    payload: Mapped[str] = mapped_column(Text)  # canonical JSON, hashed as stored
    created_at: Mapped[str] = mapped_column(String(40))  # ISO-8601 UTC, hashed as stored
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64), unique=True)
    # Null on rows written before content hashes were kept (migration 0013).
    content_hash: Mapped[str | None] = mapped_column(String(64))


class OutboundReservation(Base):
    """An outbound action that passed the frequency cap and has not been recorded yet.

    Made in the same transaction as the cap check and removed in the same transaction as the
    action's ``crm_written`` audit row, so every action counts exactly once against every
    campaign's cap while the CRM call is in flight. An action that ends without a write stops
    counting when its reservation is removed (refused, fallback) or at ``expires_at``.
    Mutable, so it cannot live in the append-only ``audit_log``.
    """

    __tablename__ = "outbound_reservations"
    # The cap counts one customer's live reservations.
    __table_args__ = (
        Index("ix_outbound_reservations_customer_key_expires_at", "customer_key", "expires_at"),
    )

    workflow_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    step_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    campaign_id: Mapped[str] = mapped_column(String(64))
    customer_key: Mapped[str] = mapped_column(String(KEY_LEN))
    reserved_at: Mapped[datetime]
    expires_at: Mapped[datetime]


class Event(Base):
    """One ingested event, keyed by its ``message_id`` so a re-sent batch inserts nothing.

    Holds only the pseudonymous key: an ``identify``'s contact traits go to ``customers``.
    """

    __tablename__ = "events"
    # Per-customer history (feature recompute) and per-event-type windows (conversion counts).
    __table_args__ = (
        Index("ix_events_customer_key_occurred_at", "customer_key", "occurred_at"),
        Index("ix_events_event_occurred_at", "event", "occurred_at"),
    )

    message_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    customer_key: Mapped[str] = mapped_column(String(KEY_LEN))
    type: Mapped[str] = mapped_column(String(16))
    event: Mapped[str] = mapped_column(String(128))
    occurred_at: Mapped[datetime]
    received_at: Mapped[datetime]
    properties: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # What the event carried beyond the columns (context, unknown fields), minus personal
    # context and routing (``events.schema``); None for events stored before it existed.
    raw: Mapped[dict[str, Any] | None]


class EventRollup(Base):
    """The totals of a customer's events purged by retention (``events.rollup``), which
    their features start from; ``through`` is the cutoff the last purge used."""

    __tablename__ = "event_rollups"

    customer_key: Mapped[str] = mapped_column(String(KEY_LEN), primary_key=True)
    summary: Mapped[dict[str, Any]]
    through: Mapped[datetime]
    updated_at: Mapped[datetime]


class ProfileAlias(Base):
    """An identity merged into a customer: an anonymous id (on ``identify`` or ``alias``) or
    an earlier user id (on ``alias``), by its pseudonymous key. Later events under the alias
    land on ``customer_key``."""

    __tablename__ = "profile_aliases"

    alias_key: Mapped[str] = mapped_column(String(KEY_LEN), primary_key=True)
    customer_key: Mapped[str] = mapped_column(String(KEY_LEN), index=True)
    merged_at: Mapped[datetime]


class SignalOutbox(Base):
    """A signal owed to the customer's running campaigns (``signal`` names it: a customer
    event, a consent change), written in the transaction that stored what it tells and
    deleted once delivered (``events.relay``). ``created_at`` and then ``seq`` are the order
    it was owed in; ``due_at`` is when a relay may next take it: a lease while one delivers,
    a back-off after Temporal failed."""

    __tablename__ = "signal_outbox"

    message_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    customer_key: Mapped[str] = mapped_column(String(KEY_LEN), index=True)
    signal: Mapped[str] = mapped_column(String(32), server_default="customer_event")
    payload: Mapped[dict[str, Any]]  # the signal's fields
    created_at: Mapped[datetime]
    seq: Mapped[int] = mapped_column(Integer, server_default="0")  # its place in its transaction
    due_at: Mapped[datetime] = mapped_column(index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)


class Cohort(Base):
    """A cohort definition: structured rules, validated, stored as JSON, never evaluated as code."""

    __tablename__ = "cohorts"

    cohort_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    definition: Mapped[dict[str, Any]]
    version: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[datetime]
    evaluated_at: Mapped[datetime | None]


class CohortRefresh(Base):
    """A customer whose events changed since their cohorts last looked: written in the
    transaction that stored the events, deleted once every cohort re-evaluated them
    (``cohorts.refresh``). Touched again meanwhile, ``touched_at`` moves and the row stays."""

    __tablename__ = "cohort_refresh"

    customer_key: Mapped[str] = mapped_column(String(KEY_LEN), primary_key=True)
    touched_at: Mapped[datetime] = mapped_column(index=True)


class CohortMember(Base):
    """A customer currently in a cohort, since when."""

    __tablename__ = "cohort_members"

    cohort_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    customer_key: Mapped[str] = mapped_column(String(KEY_LEN), primary_key=True)
    entered_at: Mapped[datetime]


class CohortTransition(Base):
    """An entry into or exit from a cohort (``kind``: entered, exited), in evaluation order.

    ``seq`` orders transitions, so a bulk launch pages through entries with a cursor.
    """

    __tablename__ = "cohort_transitions"
    # A bulk launch pages through one cohort's entries in ``seq`` order.
    __table_args__ = (Index("ix_cohort_transitions_cohort_kind_seq", "cohort_id", "kind", "seq"),)

    seq: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    cohort_id: Mapped[str] = mapped_column(String(64))
    customer_key: Mapped[str] = mapped_column(String(KEY_LEN), index=True)
    kind: Mapped[str] = mapped_column(String(8))
    evaluation_id: Mapped[str] = mapped_column(String(40))
    at: Mapped[datetime]


class LaunchDecision(Base):
    """What a campaign made of one cohort entry: its ``entry_id``, or None when re-entry
    refused it. Decided once (primary key), so a retried launch reuses the decision."""

    __tablename__ = "launch_decisions"

    campaign_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    transition_seq: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    customer_key: Mapped[str] = mapped_column(String(KEY_LEN))
    entry_id: Mapped[str | None] = mapped_column(String(64))
    reason: Mapped[str] = mapped_column(Text, default="")
    decided_at: Mapped[datetime]
    launched_at: Mapped[datetime | None]  # set once its workflow start was confirmed


class CrmEffect(Base):
    """The ledger of effects the CRM confirmed, by idempotency key ``{workflow}:{step}``.

    What makes a write to a CRM without idempotency of its own (sequence enrolment) happen
    once: a key found here is not sent again, and after an ambiguous failure the state read
    back from the CRM is recorded here before anything is retried. Compensations (``undo``)
    are effects too, under their own keys.
    """

    __tablename__ = "crm_effects"
    __table_args__ = (Index("ix_crm_effects_workflow_id", "workflow_id"),)

    idempotency_key: Mapped[str] = mapped_column(String(300), primary_key=True)
    workflow_id: Mapped[str] = mapped_column(String(200))
    step_id: Mapped[str] = mapped_column(String(80))
    customer_key: Mapped[str] = mapped_column(String(KEY_LEN))
    action: Mapped[str] = mapped_column(String(32))  # set_properties | enroll_sequence | ...
    target: Mapped[str] = mapped_column(String(200))  # sequence or list id, "" for properties
    properties: Mapped[list[str]] = mapped_column(JSON)  # names set, for a later undo
    crm_id: Mapped[str] = mapped_column(String(100))
    confirmed_at: Mapped[datetime]
    how: Mapped[str] = mapped_column(String(16))  # answered | read_back


class CrmRequest(Base):
    """Requests sent to a CRM within its rate window, one row each: the shared ceiling.

    Every process takes a row before each request, under one lock per ceiling, so together
    they never send more than the CRM allows in any window. Rows older than the window are
    deleted as new ones come, so a ceiling holds at most its limit of rows.
    """

    __tablename__ = "crm_requests"
    __table_args__ = (Index("ix_crm_requests_ceiling_sent_at", "ceiling", "sent_at"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    ceiling: Mapped[str] = mapped_column(String(100))
    sent_at: Mapped[datetime]


class ApiToken(Base):
    """A bearer token of the API: who it names, what roles it carries, until when.

    Only the SHA-256 of the secret is kept; the token itself is shown once, at creation.
    ``campaigns`` and ``tags`` scope an approver: empty both means every campaign.
    """

    __tablename__ = "api_tokens"

    token_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), index=True)
    roles: Mapped[list[str]] = mapped_column(JSON)
    campaigns: Mapped[list[str]] = mapped_column(JSON, default=list)
    tags: Mapped[list[str]] = mapped_column(JSON, default=list)
    secret_hash: Mapped[str] = mapped_column(String(64))
    created_by: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime]
    revoked_at: Mapped[datetime | None]
    revoked_by: Mapped[str | None] = mapped_column(String(128))
