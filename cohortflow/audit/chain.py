"""How an audit row is hashed into the chain, with no database: the rules the store, the
offline verifier of exports and any outsider's own checker share.

Each row's ``hash`` is SHA-256 over the canonical JSON array ``[seq, prev_hash,
content_hash]``, where ``content_hash`` is SHA-256 over ``[workflow_id, step_id, kind,
campaign_id, customer_key, payload, created_at]`` exactly as stored. Splitting the content
off lets an export prove the rows it leaves out with their content hashes alone, so one
customer's export never carries another's records. Rows written before the split
(``content_hash`` absent) were hashed over ``[seq, prev_hash, <content>...]`` in one array;
they still verify in full, and an export can only link over them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from cohortflow.storage._sql import canonical_json

GENESIS_HASH = "0" * 64


def _sha256(value: Any) -> str:
    return hashlib.sha256(canonical_json(value).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class RowContent:
    """What one audit row says, exactly as stored (``payload`` is canonical JSON text)."""

    workflow_id: str
    step_id: str
    kind: str
    campaign_id: str
    customer_key: str
    payload: str
    created_at: str

    def fields(self) -> list[str]:
        """The content in its hashed order."""
        return [
            self.workflow_id,
            self.step_id,
            self.kind,
            self.campaign_id,
            self.customer_key,
            self.payload,
            self.created_at,
        ]


def content_hash(content: RowContent) -> str:
    """The hash of a row's content alone."""
    return _sha256(content.fields())


def chain_hash(seq: int, prev_hash: str, content_hash_: str) -> str:
    """The hash of a row, given its content hash."""
    return _sha256([seq, prev_hash, content_hash_])


def legacy_chain_hash(seq: int, prev_hash: str, content: RowContent) -> str:
    """The hash of a row written before content hashes were kept."""
    return _sha256([seq, prev_hash, *content.fields()])


@dataclass(frozen=True)
class Link:
    """One row as the chain sees it; ``content`` is None when only its hashes are known,
    ``content_hash`` None for a row written before content hashes were kept."""

    seq: int
    prev_hash: str
    hash: str
    content_hash: str | None
    content: RowContent | None


def link_problem(link: Link, expected_seq: int, prev_hash: str | None) -> str:
    """Why ``link`` cannot follow a row hashed ``prev_hash`` at ``expected_seq`` ("" when it
    can). ``prev_hash`` None takes the row's own word for its predecessor (the first row of
    an export that starts mid-chain). A legacy row without its content only links."""
    if link.seq != expected_seq:
        return f"expected seq {expected_seq}, found seq {link.seq}"
    if prev_hash is not None and link.prev_hash != prev_hash:
        return f"seq {link.seq}: prev_hash does not match the hash of seq {link.seq - 1}"
    if link.content_hash is None:
        if link.content is None:
            return ""
        recomputed = legacy_chain_hash(link.seq, link.prev_hash, link.content)
    else:
        if link.content is not None and content_hash(link.content) != link.content_hash:
            return f"seq {link.seq}: content does not match its content hash"
        recomputed = chain_hash(link.seq, link.prev_hash, link.content_hash)
    if recomputed != link.hash:
        return f"seq {link.seq}: content does not match its hash"
    return ""


@dataclass(frozen=True)
class Anchor:
    """The chain's head as recorded at a time: a later chain must still hold this row with
    this hash, or rows were cut from its tail (which the chain alone cannot show)."""

    seq: int
    hash: str
    at: str

    def to_json(self) -> str:
        """One line of JSON."""
        return json.dumps({"seq": self.seq, "hash": self.hash, "at": self.at})

    @classmethod
    def from_json(cls, line: str) -> Anchor:
        """Read :meth:`to_json`'s line back (ValueError when it is not one)."""
        try:
            data = json.loads(line)
            return cls(int(data["seq"]), str(data["hash"]), str(data["at"]))
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"not an anchor: {line[:80]!r}") from exc
