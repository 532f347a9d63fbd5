"""Issuing, checking and revoking API tokens.

A token reads ``cft_<id>_<secret>``: the id finds the row, the secret is checked against its
SHA-256 in constant time. The secret is 256 random bits, so a fast hash is enough (a slow
password hash guards low-entropy secrets, which these are not) and a stolen table holds
nothing that can be replayed.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cohortflow.auth.identity import Identity, Role
from cohortflow.errors import Invalid, NotFound, Unauthenticated
from cohortflow.storage import audit, tokens
from cohortflow.storage.db import Database
from cohortflow.storage.tables import ApiToken
from workflows.campaign.contract import AuditKind

PREFIX = "cft"
_TOKEN = re.compile(rf"^{PREFIX}_([a-z0-9]{{12}})_([A-Za-z0-9_-]{{43}})$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$")
MAX_LIFETIME = timedelta(days=366)


@dataclass(frozen=True)
class IssuedToken:
    """A new token: its row, and the secret, which is never available again."""

    row: ApiToken
    secret: str


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


def parse_roles(values: list[str]) -> frozenset[Role]:
    """Role names as roles; an unknown name is refused by name."""
    known = {r.value for r in Role}
    for value in values:
        if value not in known:
            raise Invalid(
                f"roles: unknown role {value!r} (one of {', '.join(sorted(known))})", field="roles"
            )
    if not values:
        raise Invalid("roles: give at least one role", field="roles")
    return frozenset(Role(v) for v in values)


class TokenService:
    """API tokens over one database."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def create(
        self,
        name: str,
        roles: list[str],
        *,
        lifetime: timedelta,
        by: str,
        campaigns: list[str] | None = None,
        tags: list[str] | None = None,
        now: datetime | None = None,
    ) -> IssuedToken:
        """Issue a token for ``name`` with ``roles``; the creation is audited."""
        if not _NAME.match(name):
            raise Invalid(
                "name: 1-128 letters, digits or ._@- starting with a letter or digit",
                field="name",
            )
        granted = parse_roles(roles)
        if not timedelta(0) < lifetime <= MAX_LIFETIME:
            raise Invalid("expires_in: between one second and 366 days", field="expires_in")
        at = now or datetime.now(UTC)
        token_id = secrets.token_hex(6)
        secret = secrets.token_urlsafe(32)
        row = ApiToken(
            token_id=token_id,
            name=name,
            roles=sorted(granted),
            campaigns=sorted(set(campaigns or [])),
            tags=sorted(set(tags or [])),
            secret_hash=_digest(secret),
            created_by=by,
            created_at=at,
            expires_at=at + lifetime,
        )
        async with self._db.transaction() as session:
            await tokens.add_token(session, row)
            await audit.append_audit(session, _token_event(AuditKind.TOKEN_CREATED, row, by, at))
        return IssuedToken(row=row, secret=f"{PREFIX}_{token_id}_{secret}")

    async def authenticate(self, presented: str, *, now: datetime | None = None) -> Identity:
        """The identity a presented token stands for; :class:`Unauthenticated` otherwise.

        Every refusal says the same thing, so a caller cannot tell an unknown id from a wrong
        secret; revoked and expired tokens say which, since their holder needs to know.
        """
        match = _TOKEN.match(presented.strip())
        if match is None:
            raise Unauthenticated("not a cohortflow token")
        token_id, secret = match.groups()
        async with self._db.read_transaction() as session:
            row = await tokens.get_token(session, token_id)
        if row is None or not hmac.compare_digest(row.secret_hash, _digest(secret)):
            raise Unauthenticated("unknown token")
        return self.identity_of(row, now=now)

    def identity_of(self, row: ApiToken, *, now: datetime | None = None) -> Identity:
        """The identity of a stored token; :class:`Unauthenticated` once revoked or expired."""
        if row.revoked_at is not None:
            raise Unauthenticated("token revoked")
        if row.expires_at <= (now or datetime.now(UTC)):
            raise Unauthenticated("token expired")
        return Identity(
            name=row.name,
            roles=frozenset(Role(r) for r in row.roles),
            token_id=row.token_id,
            campaigns=tuple(row.campaigns),
            tags=tuple(row.tags),
        )

    async def list(self, *, include_inactive: bool = False) -> list[ApiToken]:
        """Tokens (never their secrets), oldest first."""
        async with self._db.read_transaction() as session:
            return await tokens.list_tokens(session, include_inactive=include_inactive)

    async def revoke(self, token_id: str, *, by: str, now: datetime | None = None) -> ApiToken:
        """Revoke a token at once; revoking twice is a no-op. Audited."""
        at = now or datetime.now(UTC)
        async with self._db.transaction() as session:
            row = await tokens.get_token(session, token_id)
            if row is None:
                raise NotFound(f"token_id: no token {token_id!r}", field="token_id")
            if await tokens.revoke_token(session, token_id, by=by, now=at):
                await audit.append_audit(
                    session, _token_event(AuditKind.TOKEN_REVOKED, row, by, at)
                )
            await session.refresh(row)
        return row


def _token_event(kind: AuditKind, row: ApiToken, by: str, at: datetime) -> audit.AuditEvent:
    return audit.AuditEvent(
        workflow_id=f"token:{row.token_id}",
        step_id=f"{kind.value}:{at.isoformat()}",
        kind=kind,
        campaign_id="-",
        customer_key="-",
        payload={"name": row.name, "roles": list(row.roles), "by": by},
    )
