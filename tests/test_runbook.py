"""docs/runbook.md stays true: every ``cohortflow`` command in it parses against the CLI as
it is (command path, options, arguments), every ``temporal`` command names a subcommand and
flags the bundled CLI has, every visibility query runs on the dev server, and every metric it
names is one the code exports."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
import typer
from temporalio.client import Client

from cohortflow.cli.main import app
from cohortflow.runtime.binaries import temporal_cli

REPO = Path(__file__).resolve().parents[1]
RUNBOOK = (REPO / "docs" / "runbook.md").read_text(encoding="utf-8")


def blocks(kind: str) -> list[str]:
    """The lines of every fenced block of ``kind``."""
    found = re.findall(rf"^```{kind}\n(.*?)^```", RUNBOOK, flags=re.M | re.S)
    return [line for block in found for line in block.splitlines() if line.strip()]


COMMANDS = [shlex.split(line.removeprefix("$ ")) for line in blocks("console")]
OURS = [c for c in COMMANDS if c[0] == "cohortflow"]
TEMPORAL = [c for c in COMMANDS if c[0] == "temporal"]
QUERIES = blocks("visibility")


def test_the_runbook_has_commands_and_queries_and_nothing_else() -> None:
    assert len(OURS) >= 15 and len(TEMPORAL) >= 3 and len(QUERIES) >= 5
    assert all(line.startswith("$ ") for line in blocks("console"))
    assert len(OURS) + len(TEMPORAL) == len(COMMANDS), "a console line runs something else"


def parse(args: list[str]) -> Any:
    """Parse ``args`` as the CLI would, down to the leaf command, without running it
    (typer vendors its own click, so go by shape rather than by class)."""
    command: Any = typer.main.get_command(app)
    ctx = command.make_context("cohortflow", list(args))
    while hasattr(command, "resolve_command"):
        # The command words a group left for its subcommands (private in this click).
        words = [*getattr(ctx, "_protected_args", []), *ctx.args]
        name, command, rest = command.resolve_command(ctx, words)
        ctx = command.make_context(name, rest, parent=ctx)
    return ctx


@pytest.mark.parametrize("args", OURS, ids=lambda a: " ".join(a[1:4]))
def test_every_cohortflow_command_parses(args: list[str]) -> None:
    ctx = parse(args[1:])
    assert not ctx.args, f"left over: {ctx.args}"


@pytest.mark.parametrize("args", TEMPORAL, ids=lambda a: " ".join(a[1:3]))
def test_every_temporal_command_has_its_subcommand_and_flags(args: list[str]) -> None:
    words = [a for a in args[1:] if not a.startswith("-")][:2]
    shown = subprocess.run(
        [str(temporal_cli()), *words, "--help"], capture_output=True, text=True, check=True
    ).stdout
    for flag in (a for a in args if a.startswith("--")):
        assert f"{flag} " in shown or f"{flag}=" in shown, (flag, words)


@pytest.mark.devserver
@pytest.mark.parametrize("query", QUERIES)
async def test_every_visibility_query_runs(dev_client: Client, query: str) -> None:
    counted = await dev_client.count_workflows(query)
    assert counted.count >= 0


def test_every_metric_named_is_exported() -> None:
    named = set(re.findall(r"\b(cohortflow_[a-z_]+)\b", RUNBOOK))
    assert len(named) >= 5
    sources = "".join(
        p.read_text(encoding="utf-8")
        for folder in ("cohortflow", "workflows", "activities")
        for p in (REPO / folder).rglob("*.py")
    )
    assert {m for m in named if f'"{m}"' not in sources} == set()
