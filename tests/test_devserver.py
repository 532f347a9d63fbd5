"""The embedded Temporal dev server: state on disk, our search attributes, no orphans."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import (
    AddSearchAttributesRequest,
    ListSearchAttributesRequest,
)
from temporalio.service import RPCError, RPCStatusCode
from temporalio.testing import WorkflowEnvironment

from cohortflow.runtime.binaries import temporal_test_server
from cohortflow.runtime.devserver import DevServer
from cohortflow.runtime.ports import PortInUse, free_port
from cohortflow.settings import Settings
from cohortflow.temporal_client import connect, ensure_search_attributes, search_attribute_types
from tests.processes import running, wait_until

REPO = Path(__file__).resolve().parents[1]
EXPECTED_TYPES = {
    name: IndexedValueType.Value(f"INDEXED_VALUE_TYPE_{type_name.upper()}")
    for name, type_name in search_attribute_types().items()
}


def embedded_settings(data_dir: Path) -> Settings:
    return Settings(data_dir=data_dir, temporal_port=free_port(), temporal_ui_port=free_port())


@pytest.fixture
async def devserver(tmp_path: Path) -> AsyncIterator[DevServer]:
    server = DevServer(embedded_settings(tmp_path / "data"))
    await server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.devserver
async def test_serves_every_search_attribute_with_its_type(devserver: DevServer) -> None:
    client = await connect(devserver.settings, tracing=False)
    listed = await client.operator_service.list_search_attributes(
        ListSearchAttributesRequest(namespace=devserver.settings.temporal_namespace)
    )
    assert {name: listed.custom_attributes.get(name) for name in EXPECTED_TYPES} == EXPECTED_TYPES
    await ensure_search_attributes(client, devserver.settings.temporal_namespace)


@pytest.mark.devserver
async def test_ui_answers_and_state_is_on_disk(devserver: DevServer) -> None:
    async with httpx.AsyncClient() as http:
        response = await http.get(devserver.ui_url, timeout=10)
    assert response.status_code == 200
    assert devserver.settings.temporal_db_path.is_file()
    assert devserver.log_path.is_file()


@pytest.mark.devserver
async def test_stop_leaves_no_process(devserver: DevServer) -> None:
    assert devserver.proc is not None
    pid = devserver.proc.pid
    assert running(pid)
    devserver.stop()
    assert not running(pid)
    assert devserver.proc is None


@pytest.mark.devserver
async def test_taken_port_fails_before_anything_starts(tmp_path: Path) -> None:
    settings = embedded_settings(tmp_path)
    with socket.socket() as squatter:
        squatter.bind((settings.temporal_host, settings.temporal_ui_port))
        squatter.listen()
        server = DevServer(settings)
        with pytest.raises(PortInUse, match="COHORTFLOW_TEMPORAL_UI_PORT"):
            await server.start()
    assert server.proc is None


# Starts the dev server, reports its pid and waits to be SIGKILLed.
PARENT = """
import asyncio, sys
from pathlib import Path
from cohortflow.runtime.devserver import DevServer
from cohortflow.settings import Settings
settings = Settings(data_dir=Path(sys.argv[1]), temporal_port=int(sys.argv[2]),
                    temporal_ui_port=int(sys.argv[3]))
server = DevServer(settings)
asyncio.run(server.start())
Path(sys.argv[4]).write_text(str(server.proc.pid))
asyncio.run(asyncio.sleep(300))
"""


@pytest.mark.devserver
def test_sigkill_of_parent_leaves_no_temporal_process(tmp_path: Path) -> None:
    pid_file = tmp_path / "temporal.pid"
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            PARENT,
            str(tmp_path / "data"),
            str(free_port()),
            str(free_port()),
            str(pid_file),
        ],
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert wait_until(pid_file.exists, 60.0), "the dev server did not start"
        temporal = int(pid_file.read_text())
        assert running(temporal)
    finally:
        parent.kill()
        parent.wait()
    try:
        assert wait_until(lambda: not running(temporal), 10.0), "temporal outlived its parent"
    finally:
        if running(temporal):
            os.kill(temporal, signal.SIGKILL)


async def test_ensure_search_attributes_on_the_time_skipping_server() -> None:
    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=str(temporal_test_server())
    )
    async with env:
        await ensure_search_attributes(env.client, "default")
        await ensure_search_attributes(env.client, "default")
        # This server cannot list attributes; it refuses a second registration of each one.
        for name, value_type in EXPECTED_TYPES.items():
            with pytest.raises(RPCError) as caught:
                await env.client.operator_service.add_search_attributes(
                    AddSearchAttributesRequest(
                        search_attributes={name: value_type}, namespace="default"
                    )
                )
            assert caught.value.status == RPCStatusCode.ALREADY_EXISTS
