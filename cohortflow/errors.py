"""Errors an operator can act on. The CLI prints them on one line and exits 2; the API maps
them to 401, 403, 404, 409, 422, 429 and 503, naming the field where there is one."""

from __future__ import annotations


class OperatorError(Exception):
    """A request that cannot be carried out as asked; nothing was written."""

    http_status = 400

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class NotFound(OperatorError):
    """The named thing does not exist."""

    http_status = 404


class Conflict(OperatorError):
    """The thing exists but is not in a state that allows the request."""

    http_status = 409


class Invalid(OperatorError):
    """A field of the request is malformed."""

    http_status = 422


class Unavailable(OperatorError):
    """A part the request needs (Temporal, a worker) is not there."""

    http_status = 503


class Unauthenticated(OperatorError):
    """No usable credentials: none given, unknown, revoked or expired."""

    http_status = 401


class Forbidden(OperatorError):
    """The caller is known but may not do this (role, scope or four-eyes rule)."""

    http_status = 403


class RateLimited(OperatorError):
    """Too many requests from one token; try again after ``retry_after`` seconds."""

    http_status = 429

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after
