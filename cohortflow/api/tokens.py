"""API tokens over HTTP, for admins: create (the secret is in this answer only), list, revoke."""

from __future__ import annotations

from datetime import datetime, timedelta

from fastapi import APIRouter
from pydantic import BaseModel, Field, field_validator

from cohortflow.api.auth import Who, guard
from cohortflow.api.deps import State, StrictBody
from cohortflow.auth import policy
from cohortflow.auth.identity import Role
from cohortflow.auth.tokens import MAX_LIFETIME
from cohortflow.spec import parse_duration
from cohortflow.storage.tables import ApiToken


class TokenIn(StrictBody):
    """A token to issue: whose, which roles, for how long, scoped to which campaigns."""

    name: str = Field(min_length=1, max_length=128)
    roles: list[Role] = Field(min_length=1)
    expires_in: str = Field("P90D", description="ISO-8601 duration, at most P366D.")
    campaigns: list[str] = Field(default_factory=list, max_length=100)
    tags: list[str] = Field(default_factory=list, max_length=100)

    @field_validator("expires_in")
    @classmethod
    def _lifetime(cls, value: str) -> str:
        lifetime = parse_duration(value)
        if not timedelta(0) < lifetime <= MAX_LIFETIME:
            raise ValueError("must be longer than zero and at most P366D")
        return value


class TokenOut(BaseModel):
    """A token as listed: never its secret."""

    token_id: str
    name: str
    roles: list[str]
    campaigns: list[str]
    tags: list[str]
    created_by: str
    created_at: datetime
    expires_at: datetime
    revoked_at: datetime | None


class IssuedOut(TokenOut):
    """A new token with its secret, shown this once."""

    token: str


def _out(row: ApiToken) -> TokenOut:
    return TokenOut.model_validate(row, from_attributes=True)


def tokens_router() -> APIRouter:
    """``/v1/tokens``: create, list and revoke API tokens (admin)."""
    router = APIRouter(prefix="/v1/tokens", tags=["tokens"])

    @router.post("", **guard(policy.ADMIN, "manage tokens", {422: "bad name, role or expiry"}))
    async def create(body: TokenIn, state: State, who: Who) -> IssuedOut:
        """Issue a token; its secret is in this answer and nowhere else."""
        issued = await state.tokens.create(
            body.name,
            [r.value for r in body.roles],
            lifetime=parse_duration(body.expires_in),
            by=who.name,
            campaigns=body.campaigns,
            tags=body.tags,
        )
        return IssuedOut(**_out(issued.row).model_dump(), token=issued.secret)

    @router.get("", **guard(policy.ADMIN, "manage tokens"))
    async def list_tokens(state: State, include_inactive: bool = False) -> list[TokenOut]:
        """Tokens still usable (``include_inactive``: revoked and expired ones too)."""
        return [_out(r) for r in await state.tokens.list(include_inactive=include_inactive)]

    @router.post(
        "/{token_id}/revoke", **guard(policy.ADMIN, "manage tokens", {404: "unknown token"})
    )
    async def revoke(token_id: str, state: State, who: Who) -> TokenOut:
        """Revoke at once: the next request with it answers 401. Revoking twice is a no-op."""
        return _out(await state.tokens.revoke(token_id, by=who.name))

    return router
