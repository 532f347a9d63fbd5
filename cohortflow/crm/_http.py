"""HTTP plumbing the CRM connectors share: a client span per request, transport failures by
what they mean, ``Retry-After`` in both of its forms, and strict readers of JSON bodies.

A library: no Temporal, no storage, no settings. Every reader raises :class:`CrmError` for a
body of the wrong shape, never ``KeyError``, ``TypeError`` or ``ValueError``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import Any, Self

import httpx
from opentelemetry import trace

from cohortflow.crm.errors import CrmError, CrmUnavailable

# Failures where the request cannot have reached the CRM whole: nothing was applied.
_NOT_SENT: tuple[type[httpx.HTTPError], ...] = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.PoolTimeout,
    httpx.WriteError,
    httpx.WriteTimeout,
    httpx.UnsupportedProtocol,
    httpx.LocalProtocolError,
    httpx.ProxyError,
)


# httpcore's trace events for the moment a request's head starts onto the wire.
_HEADERS_SENT = ("http11.send_request_headers.started", "http2.send_request_headers.started")


@dataclass
class WireStamp:
    """When a request last started onto the wire (``None``: it never did, as far as the
    transport could tell)."""

    sent_at: datetime | None = None


# Entered around every request a connector sends, from before it goes until its answer
# comes: where a rate ceiling shared by every process counts requests as the CRM does, one
# per HTTP request, lookups and read-backs included. The transport fills the stamp it yields.
RequestGate = Callable[[], AbstractAsyncContextManager[WireStamp]]

TraceCallback = Callable[[str, dict[str, Any]], Awaitable[None]]


class _CrmTransport(httpx.AsyncBaseTransport):
    """A transport that sends each request in a client span and, with a ``gate``, inside it,
    stamping when it reached the wire through httpcore's ``trace`` extension: a request may
    wait in a busy event loop or for a pooled connection after its gate opened, and the CRM
    counts it only on arrival. The span covers the wait for the gate too (the ceiling's use
    shows in the trace); its attributes name the request's method, host and path, never its
    query or body (contact data travels in the body)."""

    def __init__(self, inner: httpx.AsyncBaseTransport, gate: RequestGate | None) -> None:
        self._inner = inner
        self._gate = gate

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        attributes: dict[str, str | int] = {
            "http.request.method": request.method,
            "server.address": url.host,
            "server.port": url.port or (443 if url.scheme == "https" else 80),
            "url.path": url.path,
        }
        with _tracer.start_as_current_span(
            f"CRM {request.method}", kind=trace.SpanKind.CLIENT, attributes=attributes
        ) as span:
            response = await self._send(request)
            span.set_attribute("http.response.status_code", response.status_code)
            if response.status_code >= 400:
                span.set_status(trace.StatusCode.ERROR)
                span.set_attribute("error.type", str(response.status_code))
            return response

    async def _send(self, request: httpx.Request) -> httpx.Response:
        if self._gate is None:
            return await self._inner.handle_async_request(request)
        async with self._gate() as stamp:
            request.extensions["trace"] = _stamping(stamp, request.extensions.get("trace"))
            return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self._inner.aclose()


_tracer = trace.get_tracer(__name__)


def pooled_client(
    base_url: str,
    token: str | None,
    timeout: float,
    request_gate: RequestGate | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> httpx.AsyncClient:
    """One pooled JSON client for a CRM: bearer ``token`` when given, every request traced
    and sent inside ``request_gate``."""
    headers = {"Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.AsyncClient(
        base_url=base_url,
        headers=headers,
        timeout=timeout,
        transport=_CrmTransport(transport or httpx.AsyncHTTPTransport(), request_gate),
    )


def _stamping(stamp: WireStamp, previous: TraceCallback | None) -> TraceCallback:
    """A trace callback that sets ``stamp`` each time the request's head is sent (a retry on
    a fresh connection sends it again: the last time counts), then calls ``previous``."""

    async def trace(event: str, info: dict[str, Any]) -> None:
        if event in _HEADERS_SENT:
            stamp.sent_at = datetime.now(UTC)
        if previous is not None:
            await previous(event, info)

    return trace


class AsyncClosing(ABC):
    """An async context manager that calls :meth:`aclose` on exit."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    @abstractmethod
    async def aclose(self) -> None:
        """Release the connections held."""


def transport_error(method: str, path: str, exc: httpx.HTTPError) -> CrmUnavailable:
    """The :class:`CrmUnavailable` for an exception httpx raised while sending ``path``.

    Connecting failed, or the request could not be written whole: the CRM never saw it
    (``ambiguous=False``). The request went out and the answer did not come back (a read
    timeout, a reset or closed connection, a body that would not decode): the CRM may have
    applied it (``ambiguous=True``), so the caller reads the state back before sending again.
    """
    name = type(exc).__name__
    if isinstance(exc, _NOT_SENT):
        return CrmUnavailable(f"{method} {path} was not sent: {name}: {exc}", ambiguous=False)
    if isinstance(exc, httpx.TimeoutException):
        return CrmUnavailable(f"{method} {path} timed out after sending ({name})", ambiguous=True)
    return CrmUnavailable(f"{method} {path} got no answer: {name}: {exc}", ambiguous=True)


def parse_retry_after(header: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value: delay-seconds or an HTTP date.

    ``None`` when the header is missing or unreadable. A date in the past means now (0).
    """
    if header is None:
        return None
    text = header.strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        return _seconds_until(text, now or datetime.now(UTC))
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return seconds


def _seconds_until(text: str, now: datetime) -> float | None:
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT; "-0000" parses as naive
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - now).total_seconds())


def json_body(response: httpx.Response) -> Any:
    """The decoded JSON body of a response, or :class:`CrmError`."""
    try:
        return response.json()
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CrmError(f"CRM answered {response.status_code} with a body that is not JSON") from exc


def obj(data: Any, what: str) -> dict[str, Any]:
    """``data`` as a JSON object."""
    if not isinstance(data, dict):
        raise CrmError(f"malformed CRM response: {what} is not an object")
    return data


def member_list(data: dict[str, Any], key: str, what: str, *, required: bool) -> list[Any]:
    """``data[key]`` as a list; a missing (or null) optional one is empty."""
    value = data.get(key)
    if value is None:
        if required:
            raise CrmError(f"malformed CRM response: {what} has no {key!r}")
        return []
    if not isinstance(value, list):
        raise CrmError(f"malformed CRM response: {what}.{key} is not a list")
    return value


def text(data: dict[str, Any], key: str, what: str, *, required: bool = True) -> str:
    """``data[key]`` as a string; a missing optional one is empty."""
    value = data.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise CrmError(f"malformed CRM response: {what}.{key} is not a string")
    return value


def ident(value: Any, what: str) -> str:
    """A record id, which a CRM may spell as a string or an integer."""
    if isinstance(value, str) and value:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise CrmError(f"malformed CRM response: {what} is not an id")


def ident_list(data: dict[str, Any], key: str, what: str) -> list[str]:
    """An optional list of record ids."""
    return [ident(item, f"{what}.{key}[]") for item in member_list(data, key, what, required=False)]
