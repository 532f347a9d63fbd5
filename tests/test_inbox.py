"""The approval inbox in a real browser (Debian's Chromium driven by Playwright) against the
API, real campaigns on the dev server and their workers: sign in, one approval, one
rejection, one bulk decision by filter; and the abuse a browser page invites: no session, a
forged or foreign-origin post. Screenshots land in ``test-artifacts/inbox/``."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from playwright.async_api import Page, async_playwright, expect

from cohortflow.api.app import create_app
from cohortflow.settings import Settings
from cohortflow.storage import approvals
from tests.harness import (
    Harness,
    api_settings,
    issue_token,
    serve_app,
    spec_document,
    wait_for_state,
)
from workflows.campaign.contract import CampaignState

pytestmark = pytest.mark.devserver

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "inbox"
KEY = "inbox-test-pseudonymisation-key-0123456"


@pytest.fixture
async def api_url(
    dev_harness: Harness, dev_settings: Settings, tmp_path: Path
) -> AsyncIterator[str]:
    with serve_app(create_app(api_settings(dev_harness, dev_settings, tmp_path, KEY))) as url:
        yield url


async def shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


async def sign_in(page: Page, url: str, token: str) -> None:
    await page.goto(f"{url}/inbox")
    await expect(page).to_have_url(re.compile(r"/inbox/login$"))  # no session: sign in first
    await page.fill("input[name=token]", token)
    await page.click("button[type=submit]")
    await expect(page).to_have_url(re.compile(r"/inbox$"))


async def decide_one(page: Page, approval_id: str, button: str, reason: str) -> None:
    await page.click(f"a:text('{approval_id}')")
    await expect(page.locator("#context")).to_contain_text("enroll_sequence winback")
    await page.fill("#decide input[name=reason]", reason)
    await page.click(f"#decide button:text('{button}')")
    await expect(page.locator(".note")).to_contain_text(approval_id)


async def test_sign_in_approve_reject_and_bulk_in_chromium(
    api_url: str, dev_harness: Harness
) -> None:
    document = spec_document()
    document["steps"] = [
        {**s, "duration": "PT1S"} if s["type"] == "wait" else s for s in document["steps"]
    ]
    spec, version = await dev_harness.apply(document)
    token = await issue_token(dev_harness.db, "alice", "approver")
    async with dev_harness.workers(), async_playwright() as playwright:
        handles = [
            await dev_harness.launch(spec, version, await dev_harness.customer()) for _ in range(4)
        ]
        for handle in handles:
            await wait_for_state(handle, CampaignState.AWAITING_APPROVAL)
        async with dev_harness.db.transaction() as session:
            pending = await approvals.list_approvals(session, campaign_id=spec.campaign_id)
        ids = sorted(a.approval_id for a in pending)

        browser = await playwright.chromium.launch(executable_path=CHROMIUM)
        page = await browser.new_page()
        await sign_in(page, api_url, token)
        await expect(page.locator("#who")).to_have_text("alice")
        await expect(page.locator("#pending tbody tr")).to_have_count(4)
        await shot(page, "1-queue")

        await decide_one(page, ids[0], "Approve", "offer within budget")
        await decide_one(page, ids[1], "Reject", "too generous")
        await shot(page, "2-after-two-decisions")
        await expect(page.locator("#pending tbody tr")).to_have_count(2)

        await page.fill("#filters input[name=campaign]", spec.campaign_id)
        await page.click("#filters button")
        await page.fill("#bulk input[name=reason]", "batch review")
        await page.fill("#bulk input[name=confirm]", "2")
        await page.click("#bulk button")
        await expect(page.locator(".note")).to_contain_text(
            "bulk approve: 2 matched, 2 decided, 0 refused by validation, 0 already decided"
        )
        await expect(page.locator("#pending tbody tr")).to_have_text("Nothing is waiting.")
        await expect(page.locator("#decided tbody tr")).to_have_count(4)
        await expect(page.locator("#decided")).to_contain_text("too generous")
        await shot(page, "3-after-bulk")
        await browser.close()
        results = {h.id: (await dev_harness.result(h)).state for h in handles}
    assert sorted(results.values()) == sorted(
        [CampaignState.COMPLETED] * 3 + [CampaignState.REJECTED]
    )


async def test_the_inbox_refuses_no_session_a_forged_form_and_a_foreign_origin(
    api_url: str, dev_harness: Harness
) -> None:
    token = await issue_token(dev_harness.db, "alice", "approver")
    async with httpx.AsyncClient(base_url=api_url, follow_redirects=False) as http:
        assert (await http.get("/inbox")).headers["location"] == "/inbox/login"
        anonymous = {"decision": "approve", "reason": "x", "csrf": "x"}
        post = await http.post("/inbox/approvals/apr_000000000000", data=anonymous)
        assert (post.status_code, post.headers["location"]) == (303, "/inbox/login")
        bad = await http.post("/inbox/login", data={"token": "cft_nope"})
        assert bad.status_code == 401
        signed = await http.post("/inbox/login", data={"token": token})
        assert signed.status_code == 303
        cookie = signed.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie and "path=/inbox" in cookie
        form = {"decision": "approve", "reason": "x", "confirm": "0", "csrf": "forged"}
        forged = await http.post("/inbox/bulk", data=form)
        assert forged.status_code == 403
        assert "CSRF" in forged.json()["detail"][0]["msg"]
        page = (await http.get("/inbox")).text
        csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', page)
        foreign = await http.post(
            "/inbox/bulk",
            data={**form, "csrf": csrf.group(1) if csrf else ""},
            headers={"Origin": "https://evil.example"},
        )
        assert foreign.status_code == 403
        assert "cross-origin" in foreign.json()["detail"][0]["msg"]
