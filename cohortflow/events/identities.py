"""Which customer each event of a batch belongs to, and which profiles it merges.

A customer is known by ``userId``; before that, by ``anonymousId``, whose pseudonymous key
is made from the id under its own namespace so it can never equal a user's key. An event
carrying both ids (``identify`` above all) merges the anonymous profile into the user, and
``alias`` merges ``previousId`` (an anonymous id or an earlier user id) into ``userId``.
Later events under a merged id land on the customer it was merged into. Pure: the stored
aliases are an input, the merges to apply an output (``storage.profiles`` applies them).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cohortflow.events.schema import (
    CONTACT_TRAITS,
    AliasEvent,
    AnyEvent,
    GroupEvent,
    IdentifyEvent,
    TrackEvent,
    ViewEvent,
)
from cohortflow.pseudonymisation import Pseudonymiser
from cohortflow.storage.events import EventRecord, IdentityRecord

ANONYMOUS = "anonymous:"  # the namespace of anonymous ids, in keys and source ids
KEY_CACHE = 65_536


@dataclass
class BatchPlan:
    """What a batch writes: events and identities under their final keys, merges in order."""

    records: list[EventRecord] = field(default_factory=list)
    identities: list[IdentityRecord] = field(default_factory=list)
    merges: list[tuple[str, str]] = field(default_factory=list)


class KeyMaker:
    """Pseudonymous keys for user ids and anonymous ids."""

    def __init__(self, pseudonymiser: Pseudonymiser) -> None:
        # A batch names each id twice (alias lookup, then the plan), and a stream names the
        # same customers again and again: an HMAC each time is measurable on the hot path.
        self._key = functools.lru_cache(maxsize=KEY_CACHE)(pseudonymiser.customer_key)

    def user(self, user_id: str) -> str:
        """The key of a known customer."""
        return self._key(user_id)

    def anonymous(self, anonymous_id: str) -> str:
        """The key of an anonymous profile."""
        return self._key(ANONYMOUS + anonymous_id)

    def candidates(self, events: Sequence[AnyEvent]) -> set[str]:
        """Every key the events could name: the stored aliases to look up."""
        keys: set[str] = set()
        for event in events:
            if event.userId is not None:
                keys.add(self.user(event.userId))
            if event.anonymousId is not None:
                keys.add(self.anonymous(event.anonymousId))
            if isinstance(event, AliasEvent):
                keys |= {self.user(event.previousId), self.anonymous(event.previousId)}
        return keys


def plan_batch(events: Sequence[AnyEvent], keys: KeyMaker, stored: Mapping[str, str]) -> BatchPlan:
    """Records, identities and merges for ``events`` in order, given the ``stored`` aliases."""
    plan = BatchPlan()
    aliases = dict(stored)

    def final(key: str) -> str:
        seen = {key}
        while key in aliases and aliases[key] not in seen:
            key = aliases[key]
            seen.add(key)
        return key

    def merge(alias_key: str, customer_key: str) -> None:
        # The first merge of an alias wins, stored or earlier in this batch.
        if alias_key != customer_key and alias_key not in aliases:
            aliases[alias_key] = customer_key
            plan.merges.append((alias_key, customer_key))

    for event in events:
        if event.userId is not None:
            own = keys.user(event.userId)
            key = final(own)
            if key == own:  # a merged id's customer already has their own identity
                plan.identities.append(_identity(key, event.userId, event))
            if event.anonymousId is not None:
                merge(keys.anonymous(event.anonymousId), key)
            if isinstance(event, AliasEvent):
                merge(keys.anonymous(event.previousId), key)
                merge(keys.user(event.previousId), key)
        else:
            assert event.anonymousId is not None  # the schema requires one of them
            anonymous = keys.anonymous(event.anonymousId)
            key = final(anonymous)
            if key == anonymous:  # a merged id's customer already has their own identity
                plan.identities.append(_identity(key, ANONYMOUS + event.anonymousId, event))
        plan.records.append(_record(key, event))
    # Records made before a merge in this batch move with it: name their final key.
    plan.records = [_rekeyed(r, final(r.customer_key)) for r in plan.records]
    return plan


def _identity(key: str, source_id: str, event: AnyEvent) -> IdentityRecord:
    if not isinstance(event, IdentifyEvent):
        return IdentityRecord(key, source_id)
    traits = event.traits
    return IdentityRecord(
        key,
        source_id,
        email=traits.get("email"),
        timezone=traits.get("timezone"),
        attributes={k: v for k, v in traits.items() if k not in CONTACT_TRAITS},
    )


def _record(key: str, event: AnyEvent) -> EventRecord:
    name, properties = _content(event)
    return EventRecord(
        event.messageId, key, event.type, name, event.occurred_at, properties, event.raw()
    )


def _content(event: AnyEvent) -> tuple[str, dict[str, Any]]:
    """The stored event name and properties of each kind of call."""
    if isinstance(event, TrackEvent):
        return event.event, event.properties
    if isinstance(event, ViewEvent):
        named = {"name": event.name, "category": event.category}
        return event.type, {**{k: v for k, v in named.items() if v is not None}, **event.properties}
    if isinstance(event, GroupEvent):
        return "group", {"groupId": event.groupId, "traits": event.traits}
    # identify and alias: the log keeps that they happened, never contact traits.
    return event.type, {}


def _rekeyed(record: EventRecord, key: str) -> EventRecord:
    if record.customer_key == key:
        return record
    return EventRecord(
        record.message_id,
        key,
        record.type,
        record.event,
        record.occurred_at,
        record.properties,
        record.raw,
    )
