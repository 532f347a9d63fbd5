"""Roles and the identity a request acts as."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class Role(StrEnum):
    """What a token may do. Roles do not imply one another: an admin is not an approver."""

    INGEST = "ingest"  # post events
    OPERATOR = "operator"  # read approvals, cohorts and models; pause and resume campaigns
    APPROVER = "approver"  # decide approvals, within the token's campaign scope
    ADMIN = "admin"  # tokens, campaigns, cohorts, models, consent corrections, cancel


ALL_ROLES: tuple[Role, ...] = tuple(Role)


@dataclass(frozen=True)
class Identity:
    """An authenticated caller: a named person or system, its roles and its approval scope.

    ``campaigns`` and ``tags`` limit which campaigns an approver may decide for; both empty
    means every campaign. ``token_id`` is ``local`` for the CLI's configured local identity.
    """

    name: str
    roles: frozenset[Role]
    token_id: str
    campaigns: tuple[str, ...] = field(default=())
    tags: tuple[str, ...] = field(default=())

    def has_any(self, roles: frozenset[Role]) -> bool:
        """Whether this identity carries at least one of ``roles``."""
        return bool(self.roles & roles)

    def may_reach(self, campaign_id: str, campaign_tags: frozenset[str]) -> bool:
        """Whether the token's scope covers this campaign (by id or by one of its tags)."""
        if not self.campaigns and not self.tags:
            return True
        return campaign_id in self.campaigns or bool(campaign_tags & set(self.tags))
