"""The outbound CRM action of a campaign step: gated, written once in effect, then on record.

Every write has the idempotency key ``{workflow_id}:{step_id}``. The ledger of confirmed
effects makes it happen once even where the CRM has no idempotency of its own (sequence
enrolment): a key on record is not sent again, a retried enrolment reads the contact back
first, and so does a write whose reply was lost. Records go through the process's batcher
(batch calls across campaigns, under the ceiling every process shares). A short 429 is waited
out; a long one is retried after exactly its delay; a spent daily window is answered, so the
campaign waits for it durably and visibly; a record the CRM refuses is the campaign's
business failure. Only properties cohortflow owns are ever written.
"""

from __future__ import annotations

import asyncio
import fnmatch
from collections.abc import Collection
from dataclasses import replace
from datetime import timedelta
from typing import NoReturn

import structlog
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.campaign import gate
from activities.campaign.audit import append_decisions, append_row
from activities.campaign.batcher import CrmBatcher
from activities.campaign.heartbeat import heartbeating
from activities.campaign.log_context import bind
from cohortflow.crm.connector import (
    ContactState,
    ContactWrite,
    CrmError,
    CrmRejected,
    CrmRetryAfter,
    CrmUnavailable,
    CrmWaitForWindow,
    Membership,
    RecordOutcome,
)
from cohortflow.storage import crm_ledger
from cohortflow.storage.db import Database
from cohortflow.storage.group_commit import GroupCommit
from cohortflow.storage.tables import CrmEffect
from workflows.campaign.activity_io import (
    CompensateInput,
    CompensateResult,
    CrmOutcome,
    CrmWriteInput,
    CrmWriteResult,
)
from workflows.campaign.contract import ActivityName, AuditKind, idempotency_key

log = structlog.get_logger(__name__)

# Actions the CRM does not make idempotent by itself: read back before sending them again.
MEMBERSHIP_ACTIONS = frozenset({"enroll_sequence", "add_to_list"})
UNDO = {
    "enroll_sequence": "unenroll",
    "add_to_list": "remove_from_lists",
    "set_properties": "clear_properties",
}


class _WindowSpent(Exception):
    def __init__(self, error: CrmWaitForWindow) -> None:
        super().__init__(str(error))
        self.error = error


class CrmActivities:
    """Writes to the CRM through the consent and frequency-cap gate, once in effect."""

    def __init__(
        self,
        db: Database,
        batcher: CrmBatcher,
        *,
        owned_properties: Collection[str] = ("*",),
        sender_email: str = "",
    ) -> None:
        self._db = db
        self._batcher = batcher
        self._owned = tuple(owned_properties)
        self._sender = sender_email
        # The gate and the record of concurrent writes share transactions (group commit).
        self._gate = GroupCommit(db, gate.gate_many)
        self._record = GroupCommit(db, gate.written_many)

    @activity.defn(name=ActivityName.CRM_WRITE)
    async def crm_write(self, inp: CrmWriteInput) -> CrmWriteResult:
        """Check pause, consent and the frequency cap right before writing, then write once
        in effect; the action holds a cap reservation from the gate until it is recorded."""
        bind(inp.workflow_id, inp.customer_key)
        async with heartbeating():
            return await self._write(inp)

    async def _write(self, inp: CrmWriteInput) -> CrmWriteResult:
        self._refuse_unowned(inp)
        verdict = await self._gate.submit(gate.GateItem(inp, gate.reservation_ttl(activity.info())))
        if verdict.stopped is not None:
            # The gate's transaction appended the decisions the action carried.
            return replace(verdict.stopped, decisions_recorded=len(inp.decisions))
        try:
            effect = await self._effect(inp, verdict)
        except _WindowSpent as spent:
            await gate.release(self._db, inp.customer_key, inp.workflow_id, inp.step_id)
            return CrmWriteResult(
                outcome=CrmOutcome.WAIT_WINDOW,
                detail=str(spent.error),
                retry_at=spent.error.until.isoformat(),
                decisions_recorded=len(inp.decisions),
            )
        # Once the CRM took it, the record is made and answered even if a cancel arrives: the
        # campaign then learns the write happened (and ended with it, if it was the last).
        recording = asyncio.ensure_future(self._record.submit((inp, effect)))
        try:
            await asyncio.shield(recording)
        except asyncio.CancelledError:
            await recording
        log.info("crm written", action=inp.action, how=effect.how, attempt=activity.info().attempt)
        activity.metric_meter().create_counter(
            "cohortflow_crm_writes", "Outbound actions the CRM took, by how it was confirmed"
        ).add(1, {"action": inp.action, "how": effect.how})
        return CrmWriteResult(
            outcome=CrmOutcome.WRITTEN,
            crm_record_id=effect.crm_id,
            decisions_recorded=len(inp.decisions),
            if_written_recorded=bool(inp.if_written),
        )

    async def _effect(self, inp: CrmWriteInput, verdict: gate.Verdict) -> crm_ledger.Effect:
        """The action's confirmed effect: from the ledger, from a read-back, or sent now."""
        key = idempotency_key(inp.workflow_id, inp.step_id)
        if verdict.confirmed is not None:
            return _effect(inp, key, verdict.confirmed.crm_id, "ledger")
        if inp.action in MEMBERSHIP_ACTIONS and activity.info().attempt > 1:
            # An earlier attempt may have enrolled and died before recording it.
            crm_id = await self._read_back(inp)
            if crm_id is not None:
                return _effect(inp, key, crm_id, "read_back")
        try:
            outcome = await self._send(inp, key, verdict.email)
        except CrmUnavailable as exc:
            crm_id = await self._read_back(inp) if exc.ambiguous else None
            if crm_id is None:
                await self._fail(inp, exc)
            return _effect(inp, key, crm_id or "", "read_back")
        except CrmError as exc:
            await self._fail(inp, exc)
        if not outcome.ok:
            refused = CrmUnavailable(outcome.error) if outcome.retryable else None
            await self._fail(inp, refused or CrmRejected(422, None, outcome.error))
        return _effect(inp, key, outcome.crm_id, "answered")

    async def _send(self, inp: CrmWriteInput, key: str, email: str) -> RecordOutcome:
        if inp.action == "set_properties":
            properties = dict(inp.properties)
            # Contact data is resolved here, inside the activity, never in workflow history.
            if email and self._owns("email"):
                properties["email"] = email
            return await self._batcher.upsert(ContactWrite(key, inp.customer_key, properties))
        target = inp.sequence_id if inp.action == "enroll_sequence" else inp.list_id
        member = Membership(key, inp.customer_key, target, self._sender)
        if inp.action == "enroll_sequence":
            return await self._batcher.enroll(member)
        if inp.action == "add_to_list":
            return await self._batcher.add_to_list(member)
        raise CrmRejected(422, "action", f"unknown CRM action {inp.action!r}")

    async def _read_back(self, inp: CrmWriteInput) -> str | None:
        """The contact's CRM id when the membership the action makes is already there."""
        state: ContactState | None = await self._batcher.read_contact(inp.customer_key)
        if state is None:
            return None
        held = state.sequences if inp.action == "enroll_sequence" else state.lists
        target = inp.sequence_id if inp.action == "enroll_sequence" else inp.list_id
        return state.crm_id if target in held else None

    async def _fail(self, inp: CrmWriteInput, error: CrmError) -> NoReturn:
        """Raise what Temporal should do about ``error``; a definitive one gives the cap slot
        back at once, a retryable one keeps it for the retry (the write may have landed)."""
        if isinstance(error, CrmWaitForWindow):
            raise _WindowSpent(error)
        if isinstance(error, CrmRetryAfter):
            log.warning("crm rate limited", retry_after=error.seconds)
            raise ApplicationError(
                str(error), type="CrmRateLimited", next_retry_delay=timedelta(seconds=error.seconds)
            )
        if isinstance(error, CrmRejected):
            await gate.release(self._db, inp.customer_key, inp.workflow_id, inp.step_id)
            detail = error.detail if isinstance(error, CrmRejected) else str(error)
            raise ApplicationError(
                f"CRM rejected the record: {detail}", type="CrmRejected", non_retryable=True
            )
        raise ApplicationError(f"CRM unavailable: {error}", type="CrmUnavailable")

    def _refuse_unowned(self, inp: CrmWriteInput) -> None:
        foreign = sorted(name for name in inp.properties if not self._owns(name))
        if foreign:
            raise ApplicationError(
                f"properties {', '.join(foreign)} are not owned by cohortflow "
                "(COHORTFLOW_CRM_OWNED_PROPERTIES)",
                type="CrmRejected",
                non_retryable=True,
            )

    def _owns(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self._owned)

    @activity.defn(name=ActivityName.CRM_COMPENSATE)
    async def crm_compensate(self, inp: CompensateInput) -> CompensateResult:
        """Undo, once each, the effects this campaign had confirmed, of the kinds ``undo``
        names; not consent-gated, since the revocation is why they are undone."""
        bind(inp.workflow_id, inp.customer_key)
        async with self._db.transaction() as session:
            effects = await crm_ledger.effects_of(session, inp.workflow_id)
            await append_decisions(
                session, inp.workflow_id, inp.campaign_id, inp.customer_key, inp.decisions
            )
        wanted = [e for e in effects if UNDO.get(e.action) in inp.undo]
        async with heartbeating():
            results = await asyncio.gather(*(self._undo(inp, effect) for effect in wanted))
        undone = sum(1 for ok in results if ok)
        return CompensateResult(
            undone=undone, refused=len(results) - undone, decisions_recorded=len(inp.decisions)
        )

    async def _undo(self, inp: CompensateInput, effect: CrmEffect) -> bool:
        key = f"{effect.idempotency_key}:undo"
        async with self._db.transaction() as session:
            if await crm_ledger.confirmed(session, key) is not None:
                return True
        member = Membership(key, effect.customer_key, effect.target, self._sender)
        if effect.action == "enroll_sequence":
            outcome = await self._batcher.unenroll(member)
        elif effect.action == "add_to_list":
            outcome = await self._batcher.remove_from_list(member)
        else:
            cleared = {name: "" for name in effect.properties if self._owns(name)}
            write = ContactWrite(key, effect.customer_key, cleared)
            outcome = await self._batcher.upsert(write)
        async with self._db.transaction() as session:
            if outcome.ok:
                await crm_ledger.record(
                    session,
                    crm_ledger.Effect(
                        key,
                        effect.workflow_id,
                        effect.step_id,
                        effect.customer_key,
                        f"undo_{effect.action}",
                        effect.target,
                        list(effect.properties),
                        outcome.crm_id or effect.crm_id,
                        "answered",
                    ),
                )
            payload = {"undid": effect.action, "target": effect.target, "ok": outcome.ok}
            if outcome.error:
                payload["error"] = outcome.error
            await append_row(
                session,
                inp.workflow_id,
                effect.step_id,
                AuditKind.CRM_COMPENSATED,
                inp.campaign_id,
                inp.customer_key,
                payload,
            )
        return outcome.ok


def _effect(inp: CrmWriteInput, key: str, crm_id: str, how: str) -> crm_ledger.Effect:
    target = inp.sequence_id or inp.list_id
    return crm_ledger.Effect(
        key,
        inp.workflow_id,
        inp.step_id,
        inp.customer_key,
        inp.action,
        target,
        sorted(inp.properties),
        crm_id,
        how,
    )
