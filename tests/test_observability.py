"""Log lines carry the bound context and never raw PII; spans reach the console when asked."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from cohortflow.observability import configure_logging

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers, root.level = handlers, level
    structlog.contextvars.clear_contextvars()
    structlog.reset_defaults()


def json_lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_json_lines_carry_bound_context_and_redact_email(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("json", "INFO")
    structlog.contextvars.bind_contextvars(workflow_id="campaign:c1:k1:e1", customer_key="k1")
    structlog.get_logger("cohortflow.test").info(
        "crm write", email="ada@example.com", customer_id="C-1234", step_id="welcome"
    )
    err = capsys.readouterr().err
    (line,) = json_lines(err)
    assert line["event"] == "crm write"
    assert line["workflow_id"] == "campaign:c1:k1:e1"
    assert line["customer_key"] == "k1"
    assert line["email"] == "[redacted]"
    assert line["customer_id"] == "[redacted]"
    assert line["step_id"] == "welcome"
    assert line["level"] == "info"
    assert str(line["timestamp"]).endswith("Z")
    assert "ada@example.com" not in err
    assert "C-1234" not in err


def test_stdlib_records_get_the_same_treatment(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("json", "WARNING")
    structlog.contextvars.bind_contextvars(customer_key="k2")
    stdlib = logging.getLogger("some.library")
    stdlib.info("below the level")
    stdlib.warning("retrying %s", "crm", extra={"phone": "+44 20 7946 0000"})
    err = capsys.readouterr().err
    (line,) = json_lines(err)
    assert line["event"] == "retrying crm"
    assert line["logger"] == "some.library"
    assert line["customer_key"] == "k2"
    assert line["phone"] == "[redacted]"
    assert "7946" not in err


def test_console_format_redacts_too(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("console", "INFO")
    structlog.get_logger().info("hello", name="Ada Lovelace", customer_key="k3")
    err = capsys.readouterr().err
    assert "hello" in err
    assert "k3" in err
    assert "Ada Lovelace" not in err


SPAN = """
import sys
from opentelemetry import trace
from cohortflow.observability import configure_tracing
configure_tracing(sys.argv[1] == "console", "cohortflow-test")
with trace.get_tracer("test").start_as_current_span("score-customer"):
    pass
"""


@pytest.mark.parametrize("console", [True, False])
def test_spans_go_to_the_console_only_when_asked(console: bool) -> None:
    done = subprocess.run(
        [sys.executable, "-c", SPAN, "console" if console else "quiet"],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert ("score-customer" in done.stderr) is console
    assert ("cohortflow-test" in done.stderr) is console
    assert done.stdout == ""
