"""The crash-chaos bench at a small size: 30 campaigns (half through approvals decided over the
API) while workers are SIGKILLed 4 times, one of them aimed at an in-flight CRM request and
one at an in-flight decision, and the dev server is killed and restarted once."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.chaos import run

pytestmark = pytest.mark.devserver


@pytest.mark.timeout(600)
async def test_every_promise_holds_through_kills_and_a_server_restart(tmp_path: Path) -> None:
    figures = await run(campaigns=30, kills=4, seed=11, root=tmp_path)

    assert figures["kills"] == 4 and figures["server_restarts"] == 1, figures
    assert figures["terminal"] == figures["campaigns"] == 30, figures
    assert (figures["ratio"], figures["target"]) == (1.0, 1.0), figures
    assert figures["unexpected_fallbacks"] == 0, figures
    # Half the campaigns were sensitive; each history shows its one decision.
    assert figures["decisions_in_histories"] == figures["expected_decisions"] == 15, figures
    assert figures["duplicates"] == 0 and figures["missing_effects"] == 0, figures
    assert figures["enrolments"] == figures["states"]["completed"], figures
    assert figures["missing_audit"] == 0 and figures["extra_audit"] == 0, figures
    assert figures["audit_ok"], figures["audit_verify"]
