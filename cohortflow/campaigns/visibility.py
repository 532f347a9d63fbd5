"""Finding running campaigns by their search attributes, and reaching each one.

Queries are built from the typed keys in ``contract.SA``, never written by hand, and values
are quoted; ``signal_running`` sends a signal, named by its handler method, to every running
campaign a query matches. A campaign that closes between the listing and the signal is simply
not counted: whatever prompted the signal is already stored and stays valid.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar

from temporalio.client import Client, WorkflowExecution, WorkflowHandle
from temporalio.common import SearchAttributeKey
from temporalio.service import RPCError, RPCStatusCode

from workflows.campaign.contract import CAMPAIGN_WORKFLOW_TYPES
from workflows.campaign.messages import CampaignResult
from workflows.campaign.workflow import CampaignWorkflow

# Visibility queries with more OR terms than this get slow on the dev server's SQLite.
MAX_TERMS = 50
# Signals in flight at once: enough to hide round trips, few enough for a small server.
CONCURRENCY = 32

_A = TypeVar("_A")
CampaignHandle = WorkflowHandle[CampaignWorkflow, CampaignResult]


def quoted(value: str | int | bool) -> str:
    """A value as the visibility query language writes it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def equals(key: SearchAttributeKey[Any], value: str | int | bool) -> str:
    """``Key = value``."""
    return f"{key.name} = {quoted(value)}"


def one_of(key: SearchAttributeKey[Any], values: Iterable[str]) -> str:
    """``(Key = a OR Key = b ...)``."""
    return "(" + " OR ".join(equals(key, v) for v in values) + ")"


def none_of(key: SearchAttributeKey[Any], values: Iterable[str]) -> str:
    """``Key NOT IN (a, b ...)``."""
    return f"{key.name} NOT IN ({', '.join(quoted(v) for v in values)})"


def all_of(*conditions: str) -> str:
    """Every condition holds."""
    return " AND ".join(conditions)


def running(*conditions: str) -> str:
    """Running campaign workflows that meet every condition."""
    types = ", ".join(quoted(t) for t in CAMPAIGN_WORKFLOW_TYPES)
    return all_of(*conditions, f"WorkflowType IN ({types})", 'ExecutionStatus = "Running"')


def chunks(values: Sequence[str], size: int = MAX_TERMS) -> list[Sequence[str]]:
    """Values in groups small enough for one query each."""
    return [values[i : i + size] for i in range(0, len(values), size)]


async def each_running(
    client: Client,
    query: str,
    act: Callable[[CampaignHandle, WorkflowExecution], Awaitable[int]],
) -> int:
    """Apply ``act`` to every running campaign ``query`` matches, a few at a time; the sum of
    what ``act`` counted, where a campaign that closed meanwhile counts nothing."""
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(execution: WorkflowExecution) -> int:
        handle = client.get_workflow_handle_for(CampaignWorkflow.run, execution.id)
        async with gate:
            try:
                return await act(handle, execution)
            except RPCError as exc:
                if exc.status != RPCStatusCode.NOT_FOUND:
                    raise
                return 0

    executions = [e async for e in client.list_workflows(query)]
    # A task group: when one call fails for good, the others are cancelled, not orphaned,
    # and the caller sees that call's own error.
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(one(e)) for e in executions]
    except ExceptionGroup as failed:
        raise failed.exceptions[0] from failed
    return sum(task.result() for task in tasks)


async def signal_running(
    client: Client,
    query: str,
    handler: Callable[[CampaignWorkflow, _A], None],
    argument: _A,
) -> int:
    """Send ``handler``'s signal with ``argument`` to every running campaign ``query``
    matches; how many it reached."""

    async def send(handle: CampaignHandle, _: WorkflowExecution) -> int:
        await handle.signal(handler, argument)
        return 1

    return await each_running(client, query, send)


async def cancel_running(client: Client, query: str) -> int:
    """Ask every running campaign ``query`` matches to cancel; how many it reached."""

    async def cancel(handle: CampaignHandle, _: WorkflowExecution) -> int:
        await handle.cancel()
        return 1

    return await each_running(client, query, cancel)
