"""The approval inbox: server-rendered pages for operators, behind a sign-in with a token.

Every page and form goes through the same controls as the API and the CLI (roles, scope,
the campaign's four-eyes validator); the inbox only renders and redirects. Nothing is
loaded from outside: the pages carry their own small stylesheet and no script.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from cohortflow.api.deps import Ctl, app_state
from cohortflow.api.inbox_session import InboxSessions, Session
from cohortflow.campaigns.bulk import ApprovalFilter, decide_all, matching, waiting_at_least
from cohortflow.campaigns.controls import Controls
from cohortflow.errors import Invalid, OperatorError, Unauthenticated

templates = Jinja2Templates(directory=Path(__file__).parent / "templates")
_FILTERS = ("campaign", "cohort", "score", "min", "max", "older_than")


def _sessions(request: Request) -> InboxSessions:
    sessions: InboxSessions = app_state(request).inbox
    return sessions


def _filter(values: dict[str, str]) -> ApprovalFilter:
    """The inbox's filter fields as a bulk filter; a bad value names its field."""

    def number(name: str) -> float | None:
        text = values.get(name, "").strip()
        try:
            return float(text) if text else None
        except ValueError:
            raise Invalid(f"{name}: {text!r} is not a number", field=name) from None

    return ApprovalFilter(
        campaign_id=values.get("campaign") or None,
        cohort_id=values.get("cohort") or None,
        score=values.get("score") or None,
        min_score=number("min"),
        max_score=number("max"),
        older_than=waiting_at_least(values.get("older_than")),
    )


def _page(request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
    return templates.TemplateResponse(request, name, context, status_code=status)


def inbox_router() -> APIRouter:
    """``/inbox``: sign in, the queue, one request, decide, decide in bulk."""
    router = APIRouter(prefix="/inbox", include_in_schema=False)

    async def signed_in(request: Request) -> Session | RedirectResponse:
        try:
            return await _sessions(request).current(request)
        except Unauthenticated:
            return RedirectResponse("/inbox/login", status_code=303)

    @router.get("/login")
    async def login_page(request: Request) -> HTMLResponse:
        return _page(request, "login.html", error="")

    @router.post("/login")
    async def login(request: Request, token: Annotated[str, Form()]) -> Response:
        response = RedirectResponse("/inbox", status_code=303)
        try:
            await _sessions(request).start(token, response)
        except Unauthenticated as exc:
            return _page(request, "login.html", 401, error=exc.message)
        return response

    @router.post("/logout")
    async def logout() -> Response:
        response = RedirectResponse("/inbox/login", status_code=303)
        InboxSessions.end(response)
        return response

    @router.get("")
    async def queue(
        request: Request, ctl: Ctl, note: Annotated[str, Query(max_length=300)] = ""
    ) -> Response:
        session = await signed_in(request)
        if isinstance(session, RedirectResponse):
            return session
        values = {k: request.query_params.get(k, "") for k in _FILTERS}
        error = ""
        try:
            pending = await matching(ctl, session.identity, _filter(values))
            decided = [
                r
                for r in await ctl.list_approvals(
                    session.identity, None, values["campaign"] or None
                )
                if r.status != "pending"
            ][:20]
        except OperatorError as exc:
            pending, decided, error = [], [], exc.message
        return _page(
            request,
            "queue.html",
            session=session,
            pending=pending,
            decided=decided,
            filters=values,
            query=urlencode({k: v for k, v in values.items() if v}),
            note=note,
            error=error,
            now=datetime.now(UTC),
        )

    @router.get("/approvals/{approval_id}")
    async def one(request: Request, approval_id: str, ctl: Ctl) -> Response:
        session = await signed_in(request)
        if isinstance(session, RedirectResponse):
            return session
        found = await ctl.approval_context(session.identity, approval_id)
        return _page(request, "approval.html", session=session, found=found, error="")

    @router.post("/approvals/{approval_id}")
    async def decide(
        request: Request,
        approval_id: str,
        ctl: Ctl,
        decision: Annotated[str, Form()],
        reason: Annotated[str, Form()],
        csrf: Annotated[str, Form()],
    ) -> Response:
        session = await signed_in(request)
        if isinstance(session, RedirectResponse):
            return session
        await _sessions(request).check_form(request, session, csrf)
        try:
            result = await ctl.decide(
                approval_id, approve=decision == "approve", identity=session.identity, reason=reason
            )
        except OperatorError as exc:
            found = await ctl.approval_context(session.identity, approval_id)
            page = "approval.html"
            return _page(
                request, page, exc.http_status, session=session, found=found, error=exc.message
            )
        more = f"; {result.remaining} more approval(s) needed" if result.remaining else ""
        note = urlencode({"note": f"{approval_id} {result.decision}{more}"})
        return RedirectResponse(f"/inbox?{note}", status_code=303)

    @router.post("/bulk")
    async def bulk(request: Request, ctl: Ctl) -> Response:
        session = await signed_in(request)
        if isinstance(session, RedirectResponse):
            return session
        form = {k: str(v) for k, v in (await request.form()).items()}
        await _sessions(request).check_form(request, session, form.get("csrf", ""))
        try:
            note = await _decide_in_bulk(ctl, session, form)
        except OperatorError as exc:
            note = exc.message
        kept = {k: form[k] for k in _FILTERS if form.get(k)}  # back to the same view
        return RedirectResponse(f"/inbox?{urlencode({**kept, 'note': note})}", status_code=303)

    return router


async def _decide_in_bulk(ctl: Controls, session: Session, form: dict[str, str]) -> str:
    """Decide everything the form's filter matches, once confirmed by its count."""
    rows = await matching(ctl, session.identity, _filter(form))
    decision = form.get("decision", "")
    if decision not in ("approve", "reject"):
        raise Invalid("decision: approve or reject", field="decision")
    if form.get("confirm", "").strip() != str(len(rows)):
        raise Invalid(
            f"confirm: type the number of requests ({len(rows)}) to decide them all",
            field="confirm",
        )
    summary = await decide_all(
        ctl, session.identity, rows, approve=decision == "approve", reason=form.get("reason", "")
    )
    return (
        f"bulk {decision}: {summary.matched} matched, {summary.decided} decided, "
        f"{summary.refused} refused by validation, {summary.already_decided} already decided"
    )
