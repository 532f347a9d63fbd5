"""API tokens: stored by the hash of their secret, listed, revoked."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from cohortflow.storage._sql import utc
from cohortflow.storage.tables import ApiToken


async def add_token(session: AsyncSession, token: ApiToken) -> None:
    """Store a new token row (its id is random, so it never collides in practice)."""
    session.add(token)
    await session.flush()


async def get_token(session: AsyncSession, token_id: str) -> ApiToken | None:
    """The token with ``token_id``, revoked or expired included, or None."""
    return await session.get(ApiToken, token_id)


async def list_tokens(session: AsyncSession, *, include_inactive: bool = False) -> list[ApiToken]:
    """Tokens by creation time; without ``include_inactive``, only those still usable."""
    query = select(ApiToken).order_by(ApiToken.created_at, ApiToken.token_id)
    if not include_inactive:
        query = query.where(ApiToken.revoked_at.is_(None), ApiToken.expires_at > utc())
    return list(await session.scalars(query))


async def revoke_token(
    session: AsyncSession, token_id: str, *, by: str, now: datetime | None = None
) -> bool:
    """Revoke a token; False when it was already revoked (or does not exist)."""
    revoked = await session.execute(
        update(ApiToken)
        .where(ApiToken.token_id == token_id, ApiToken.revoked_at.is_(None))
        .values(revoked_at=utc(now), revoked_by=by)
        .returning(ApiToken.token_id)
    )
    return revoked.first() is not None
