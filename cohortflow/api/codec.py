"""The codec server: Temporal's Web UI and CLI decode (and encode) workflow payloads here.

``POST /codec/decode`` and ``/codec/encode`` speak Temporal's remote codec protocol (a JSON
``Payloads`` message in, the same out) behind bearer tokens: decoding needs a role that may
read campaigns, encoding an admin. That is what ``temporal workflow show --codec-endpoint
URL/codec --codec-auth "Bearer cft_…"`` uses.

The Web UI cannot send a bearer token, so it decodes at ``/inbox/codec/decode`` with the
inbox's session cookie: an SRE signed in to the inbox (same site as the UI) ticks "include
cross-origin credentials" in the UI's codec settings. Only the Temporal UI's own origins
may read these answers across origins (:class:`CodecCors`). Without either, the UI shows
payloads sealed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Annotated

from fastapi import APIRouter, Body, Request, Response
from google.protobuf import json_format
from pydantic import BaseModel, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from temporalio.api.common.v1 import Payload, Payloads

from cohortflow.api.auth import guard
from cohortflow.api.deps import app_state
from cohortflow.auth import policy
from cohortflow.errors import Invalid

_CODEC_PATHS = ("/codec/", "/inbox/codec/")


class PayloadJson(BaseModel):
    """One payload as protobuf's JSON mapping writes it: bytes in base64."""

    metadata: dict[str, str] = Field(default_factory=dict)
    data: str = ""


class PayloadsJson(BaseModel):
    """Temporal's remote codec document."""

    payloads: list[PayloadJson] = Field(default_factory=list)


async def _transcode(
    document: PayloadsJson, op: Callable[[Sequence[Payload]], Awaitable[list[Payload]]]
) -> Response:
    try:
        payloads = json_format.ParseDict(document.model_dump(), Payloads())
    except json_format.ParseError as exc:
        raise Invalid(f"payloads: {exc}", field="payloads") from exc
    try:
        done = await op(list(payloads.payloads))
    except ValueError as exc:
        raise Invalid(f"payloads: {exc}", field="payloads") from exc
    body = json_format.MessageToJson(Payloads(payloads=done), indent=None)
    return Response(body, media_type="application/json")


def codec_router() -> APIRouter:
    """``/codec/decode``, ``/codec/encode`` (bearer) and ``/inbox/codec/decode`` (session)."""
    router = APIRouter(tags=["codec"])
    invalid = {422: "not a Payloads document, or a payload sealed with an unknown key"}

    @router.post("/codec/decode", **guard(policy.READ, "decode workflow payloads", invalid))
    async def decode(document: Annotated[PayloadsJson, Body()], request: Request) -> Response:
        """Open sealed payloads (others come back as they are)."""
        return await _transcode(document, app_state(request).codec.decode)

    @router.post("/codec/encode", **guard(policy.ADMIN, "encode workflow payloads", invalid))
    async def encode(document: Annotated[PayloadsJson, Body()], request: Request) -> Response:
        """Seal payloads with the current key (for input sent by the `temporal` CLI)."""
        return await _transcode(document, app_state(request).codec.encode)

    @router.post("/inbox/codec/decode", include_in_schema=False)
    async def decode_for_ui(
        document: Annotated[PayloadsJson, Body()], request: Request
    ) -> Response:
        state = app_state(request)
        session = await state.inbox.current(request)
        policy.require(session.identity, policy.READ, "decode workflow payloads")
        return await _transcode(document, state.codec.decode)

    return router


class CodecCors:
    """CORS for the codec routes alone, and only for the Temporal UI's origins: it answers
    their preflights and lets them read codec answers, cookies included; every other
    route and origin gets no CORS headers at all."""

    def __init__(self, app: ASGIApp, origins: frozenset[str]) -> None:
        self._app = app
        self._origins = origins

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(_CODEC_PATHS):
            await self._app(scope, receive, send)
            return
        origin = dict(scope["headers"]).get(b"origin", b"").decode("latin-1")
        if origin not in self._origins:
            await self._app(scope, receive, send)
            return
        allow = [
            (b"access-control-allow-origin", origin.encode("latin-1")),
            (b"access-control-allow-credentials", b"true"),
            (b"vary", b"Origin"),
        ]
        if scope["method"] == "OPTIONS":
            headers = [
                *allow,
                (b"access-control-allow-methods", b"POST"),
                (b"access-control-allow-headers", b"content-type, x-namespace, authorization"),
                (b"access-control-max-age", b"600"),
            ]
            await send({"type": "http.response.start", "status": 204, "headers": headers})
            await send({"type": "http.response.body", "body": b""})
            return

        async def with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *allow]
            await send(message)

        await self._app(scope, receive, with_cors)
