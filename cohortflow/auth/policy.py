"""Which roles may do what: one table for the API's routes and the CLI's commands alike."""

from __future__ import annotations

from cohortflow.auth.identity import Identity, Role
from cohortflow.errors import Forbidden

_R = frozenset

INGEST = _R({Role.INGEST})
READ = _R({Role.OPERATOR, Role.APPROVER, Role.ADMIN})  # approvals, cohorts, models
# Who may reach the decide route at all; each campaign's spec then says which of these may
# approve and which may reject (by default: approvers only), and the workflow checks it.
DECIDE = _R({Role.APPROVER, Role.OPERATOR, Role.ADMIN})
PAUSE = _R({Role.OPERATOR, Role.ADMIN})  # pause and resume
ADMIN = _R({Role.ADMIN})  # tokens, cancel, cohort definitions and evaluation, consent


def require(identity: Identity, roles: frozenset[Role], what: str) -> None:
    """:class:`Forbidden` unless ``identity`` carries one of ``roles`` for ``what``."""
    if not identity.has_any(roles):
        needed = " or ".join(sorted(roles))
        raise Forbidden(f"{identity.name} needs role {needed} to {what}")
