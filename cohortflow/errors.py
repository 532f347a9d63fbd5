"""Errors an operator can act on. The CLI prints them on one line and exits 2; the API maps
them to 404, 409, 422 and 503, naming the field where there is one."""

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
