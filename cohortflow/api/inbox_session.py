"""Browser sessions of the approval inbox: a signed cookie per sign-in, and CSRF tokens.

The cookie names the API token the operator signed in with and when the session ends,
signed with an HMAC keyed by that token's stored hash. No other server secret is needed,
the key never leaves the database, and revoking the token ends every session made with
it at the next request. Forms carry a CSRF token derived the same way from the session, and
posts whose ``Origin`` is another site are refused before anything else.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from dataclasses import dataclass

from fastapi import Request, Response

from cohortflow.auth.identity import Identity
from cohortflow.auth.tokens import TokenService
from cohortflow.errors import Forbidden, Unauthenticated
from cohortflow.storage import tokens
from cohortflow.storage.db import Database

COOKIE = "cohortflow_inbox"
SESSION_SECONDS = 8 * 3600


@dataclass(frozen=True)
class Session:
    """A signed-in operator: who, and the CSRF token their forms must carry."""

    identity: Identity
    csrf: str


def _sign(key: str, *parts: str) -> str:
    return hmac.new(key.encode(), "|".join(parts).encode(), hashlib.sha256).hexdigest()


class InboxSessions:
    """Starts, checks and ends inbox sessions over the token store."""

    def __init__(self, db: Database, token_service: TokenService, *, secure: bool) -> None:
        self._db = db
        self._tokens = token_service
        self._secure = secure

    async def start(self, presented: str, response: Response) -> Identity:
        """Check ``presented`` (an API token) and set the session cookie on ``response``."""
        identity = await self._tokens.authenticate(presented)
        key = await self._key(identity.token_id)
        until = str(int(time.time()) + SESSION_SECONDS)
        value = f"{identity.token_id}.{until}.{_sign(key, 'session', identity.token_id, until)}"
        response.set_cookie(
            COOKIE,
            value,
            max_age=SESSION_SECONDS,
            httponly=True,
            secure=self._secure,
            samesite="strict",
            path="/inbox",
        )
        return identity

    @staticmethod
    def end(response: Response) -> None:
        """Clear the session cookie."""
        response.delete_cookie(COOKIE, path="/inbox")

    async def current(self, request: Request) -> Session:
        """The request's session; :class:`Unauthenticated` without a valid one."""
        value = request.cookies.get(COOKIE, "")
        token_id, _, rest = value.partition(".")
        until, _, signature = rest.partition(".")
        if not (token_id and until.isdigit() and signature) or int(until) < time.time():
            raise Unauthenticated("sign in to the inbox")
        async with self._db.read_transaction() as session:
            row = await tokens.get_token(session, token_id)
        if row is None or not hmac.compare_digest(
            signature, _sign(row.secret_hash, "session", token_id, until)
        ):
            raise Unauthenticated("sign in to the inbox")
        identity = self._tokens.identity_of(row)
        return Session(identity, _sign(row.secret_hash, "csrf", value))

    async def check_form(self, request: Request, session: Session, csrf: str) -> None:
        """Refuse a post from another origin or without this session's CSRF token."""
        origin = request.headers.get("origin")
        own = f"{request.url.scheme}://{request.url.netloc}"
        if origin is not None and origin != own:
            raise Forbidden(f"cross-origin post from {origin} refused")
        if not hmac.compare_digest(csrf, session.csrf):
            raise Forbidden("the form's CSRF token does not match this session; reload the page")

    async def _key(self, token_id: str) -> str:
        async with self._db.read_transaction() as session:
            row = await tokens.get_token(session, token_id)
        if row is None:
            raise Unauthenticated("unknown token")
        return row.secret_hash
