"""Forgetting a customer: ``cohortflow customer forget``.

In this order, so nothing writes to the customer once their data is gone: their running
campaigns are terminated, their personal data is erased from our store with an audit row in
the same transaction (``storage.erasure``: the chain covers only pseudonymous records, so it
still verifies), and the CRM is asked to delete the contact. Every consent is revoked with
the erasure, so a campaign Temporal could not be reached to stop is refused at its next
outbound step. A customer under legal hold is not erased: their audit trail is exported for
whoever placed the hold, and the refusal says why. Running it again finishes what an
interrupted run left (the CRM delete, say) and erases nothing twice.
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass
from pathlib import Path

import structlog
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from cohortflow.audit.actions import record_action
from cohortflow.audit.export import Selection, write_export
from cohortflow.auth import policy
from cohortflow.auth.identity import Identity
from cohortflow.campaigns import visibility
from cohortflow.crm.connector import CrmConnector, CrmError
from cohortflow.errors import Conflict, NotFound
from cohortflow.pseudonymisation import Pseudonymiser
from cohortflow.storage import customers
from cohortflow.storage.db import Database
from cohortflow.storage.erasure import Erased, erase_customer, set_legal_hold
from workflows.campaign.contract import SA, AuditKind

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Forgotten:
    """What ``forget`` did: rows erased, campaigns stopped (None: Temporal not reached), and
    whether the CRM deleted the contact (``crm_error`` when it could not)."""

    customer_key: str
    erased: Erased
    campaigns_terminated: int | None
    crm_deleted: bool
    crm_error: str = ""


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


class Forgetter:
    """Erasure and legal holds over one database, the CRM and (when reachable) Temporal."""

    def __init__(
        self,
        db: Database,
        pseudonymiser: Pseudonymiser,
        connector: CrmConnector,
        client: Client | None,
    ) -> None:
        self._db = db
        self._pseudonymiser = pseudonymiser
        self._connector = connector
        self._client = client

    async def forget(
        self, customer: str, identity: Identity, reason: str, export_dir: Path
    ) -> Forgotten:
        """Erase the customer (source id or key); :class:`Conflict` under a legal hold,
        after exporting their audit trail into ``export_dir``."""
        policy.require(identity, policy.ADMIN, "erase customers")
        key, hold = await self._existing(customer)
        if hold:
            exported = await self._refuse(key, identity, hold, export_dir)
            raise Conflict(
                f"customer {key} is under legal hold ({hold}): not erased; its audit trail"
                f" is exported to {exported}",
                field="customer",
            )
        stopped = await self._terminate_campaigns(key, reason)
        async with self._db.transaction() as session:
            erased = await erase_customer(session, key)
            await record_action(
                session,
                AuditKind.CUSTOMER_ERASED,
                f"customer:{key}",
                identity.name,
                customer_key=key,
                reason=reason,
                campaigns_terminated=stopped,
                **asdict(erased),
            )
        try:
            await self._connector.delete_contact(key)
        except CrmError as exc:
            log.warning("crm contact not deleted", customer_key=key, error=str(exc))
            return Forgotten(key, erased, stopped, False, str(exc))
        log.info("customer erased", customer_key=key, campaigns_terminated=stopped)
        return Forgotten(key, erased, stopped, True)

    async def hold(self, customer: str, identity: Identity, reason: str | None) -> str:
        """Place (``reason``) or lift (None) a legal hold; the customer's key."""
        policy.require(identity, policy.ADMIN, "place legal holds")
        key, _ = await self._existing(customer)
        async with self._db.transaction() as session:
            await set_legal_hold(session, key, reason)
        return key

    async def _existing(self, customer: str) -> tuple[str, str | None]:
        """The customer's key and legal hold (None without one); NotFound for a stranger."""
        key = self._pseudonymiser.resolve(customer)
        async with self._db.read_transaction() as session:
            row = await customers.get_customer(session, key)
        if row is None:
            raise NotFound(f"customer: no customer {customer!r}", field="customer")
        return key, row.legal_hold

    async def _refuse(self, key: str, identity: Identity, hold: str, export_dir: Path) -> Path:
        """Export the held customer's audit trail and put the refusal on record."""
        target = export_dir / f"{key}.audit.jsonl"
        async with self._db.transaction() as session:
            await record_action(
                session, AuditKind.ERASURE_REFUSED, f"customer:{key}", identity.name,
                customer_key=key, legal_hold=hold,
            )  # fmt: skip
        lines: list[str] = []
        async with self._db.read_transaction() as session:
            await write_export(session, Selection(customer_key=key), lines.append)
        await asyncio.to_thread(_write, target, "".join(lines))
        return target

    async def _terminate_campaigns(self, key: str, reason: str) -> int | None:
        """Terminate the customer's running campaigns; how many (None: Temporal away)."""
        if self._client is None:
            return None
        query = visibility.running(visibility.equals(SA.CUSTOMER_KEY, key))
        ids = [execution.id async for execution in self._client.list_workflows(query)]
        stopped = 0
        for workflow_id in ids:
            try:
                await self._client.get_workflow_handle(workflow_id).terminate(
                    f"customer erased: {reason}"
                )
                stopped += 1
            except RPCError as exc:
                # Closed since the listing: nothing left to stop.
                if exc.status != RPCStatusCode.NOT_FOUND:
                    raise
        return stopped
