"""Who is asking, for every route: bearer tokens, roles and a rate limit per token.

Each route declares the roles it admits with :func:`guard`; the roles also go into the
OpenAPI document (``x-roles``), which the tests walk so that a route without a check fails.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import (
    HTTPAuthorizationCredentials,
    HTTPBasic,
    HTTPBasicCredentials,
    HTTPBearer,
)

from cohortflow.auth import policy
from cohortflow.auth.identity import Identity, Role
from cohortflow.auth.rate_limit import RateLimiter
from cohortflow.auth.tokens import TokenService
from cohortflow.errors import Unauthenticated

_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="token",
    description="A cohortflow API token (`cohortflow token create`): `cft_<id>_<secret>`.",
)
_write_key = HTTPBasic(
    auto_error=False,
    scheme_name="writeKey",
    description="Segment's write key, as Segment and RudderStack SDKs send it: an `ingest` "
    "token as the user name, no password.",
)

# The answers every guarded route may give besides its own, for the OpenAPI document.
_PROBLEM = {"content": {"application/json": {"example": {"detail": [{"loc": [], "msg": "…"}]}}}}
AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"description": "no token, or an unknown, revoked or expired one", **_PROBLEM},
    403: {"description": "the token's roles or scope do not allow this", **_PROBLEM},
    429: {"description": "too many requests from this token; see Retry-After", **_PROBLEM},
    503: {"description": "a part the request needs is unavailable; see Retry-After", **_PROBLEM},
}


class Authenticator:
    """Checks tokens against the store and spends each token's request budget."""

    def __init__(self, tokens: TokenService, limiter: RateLimiter) -> None:
        self.tokens = tokens
        self.limiter = limiter

    async def identity(self, presented: str | None) -> Identity:
        """The identity behind ``presented``; 401 without a usable token, 429 over budget."""
        if not presented:
            raise Unauthenticated("a bearer token is required (Authorization: Bearer cft_…)")
        identity = await self.tokens.authenticate(presented)
        self.limiter.take(identity.token_id)
        return identity


async def authenticate(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Identity:
    """The caller's identity, from the bearer token (resolved once per request)."""
    auth: Authenticator = request.app.state.cohortflow.auth  # set by create_app
    return await auth.identity(credentials.credentials if credentials else None)


async def authenticate_write_key(
    request: Request,
    basic: Annotated[HTTPBasicCredentials | None, Depends(_write_key)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Identity:
    """The caller's identity from a Segment write key (basic auth) or a bearer token."""
    auth: Authenticator = request.app.state.cohortflow.auth
    presented = basic.username if basic else credentials.credentials if credentials else None
    return await auth.identity(presented)


Who = Annotated[Identity, Depends(authenticate)]
WriteKeyWho = Annotated[Identity, Depends(authenticate_write_key)]


def _body(schema: dict[str, Any] | None) -> dict[str, Any]:
    if schema is None:
        return {}
    content = {"application/json": {"schema": schema}}
    return {"requestBody": {"required": True, "content": content}}


def guard(
    roles: frozenset[Role],
    what: str,
    responses: dict[int, str] | None = None,
    *,
    write_key: bool = False,
    body: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Route options admitting only ``roles``: ``@router.get(path, **guard(READ, "…"))``;
    ``responses`` documents the route's own error answers (status: description);
    ``write_key`` also admits a token sent as a Segment write key; ``body`` is the JSON
    Schema of a body the route reads itself (``api.schemas.body_schema``)."""

    async def check(identity: Who) -> Identity:
        policy.require(identity, roles, what)
        return identity

    async def check_write_key(identity: WriteKeyWho) -> Identity:
        policy.require(identity, roles, what)
        return identity

    checker: Callable[..., Awaitable[Identity]] = check_write_key if write_key else check

    return {
        "dependencies": [Depends(checker)],
        "openapi_extra": {"x-roles": sorted(roles), **_body(body)},
        "responses": {
            **AUTH_RESPONSES,
            **{code: {"description": text, **_PROBLEM} for code, text in (responses or {}).items()},
        },
    }
