"""What can go wrong talking to a CRM, split by what the caller should do about it.

- :class:`CrmRateLimited`: wait ``retry_after`` seconds, then try again.
- :class:`CrmRejected`: the request itself is wrong; retrying sends the same wrong request.
- :class:`CrmUnavailable`: the CRM or the network failed; a retry may well succeed.

Every exception keeps its constructor arguments in ``args`` so it survives pickling.
"""

from __future__ import annotations


class CrmError(Exception):
    """Base class of every CRM connector error."""


class CrmRateLimited(CrmError):
    """The CRM answered 429; ``retry_after`` is how many seconds it asked us to wait."""

    def __init__(self, retry_after: float, detail: str = "rate limited") -> None:
        super().__init__(retry_after, detail)
        self.retry_after = retry_after
        self.detail = detail

    def __str__(self) -> str:
        return f"CRM rate limited, retry after {self.retry_after:g}s: {self.detail}"


class CrmRejected(CrmError):
    """A 4xx answer: the request is invalid and never worth retrying unchanged.

    ``field`` is the path of the offending field as the CRM reported it (for example
    ``inputs[1].idempotency_key``), or ``None`` when it named none.
    """

    def __init__(self, status: int, field: str | None, detail: str) -> None:
        super().__init__(status, field, detail)
        self.status = status
        self.field = field
        self.detail = detail

    def __str__(self) -> str:
        where = f" at {self.field}" if self.field else ""
        return f"CRM rejected the request ({self.status}){where}: {self.detail}"


class CrmUnavailable(CrmError):
    """A 5xx answer, a timeout or a connection failure; ``status`` is None without an answer.

    ``ambiguous``: the request may have been applied before it failed (a timeout after it was
    sent, a connection reset before the reply), so a caller reads the state back first.
    """

    def __init__(self, detail: str, status: int | None = None, ambiguous: bool = False) -> None:
        super().__init__(detail, status, ambiguous)
        self.detail = detail
        self.status = status
        self.ambiguous = ambiguous

    def __str__(self) -> str:
        code = f" ({self.status})" if self.status is not None else ""
        return f"CRM unavailable{code}: {self.detail}"
