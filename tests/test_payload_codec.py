"""Payloads sealed before they reach Temporal: the codec itself, the key ring and its file,
and a campaign-shaped workflow on the real dev server whose stored history holds no clear
text, failure messages included, while a client with the ring reads it all."""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import uuid
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from google.protobuf import json_format
from playwright.async_api import async_playwright, expect
from pydantic import SecretStr
from temporalio import activity, workflow
from temporalio.api.common.v1 import Payload, Payloads
from temporalio.client import Client, WorkflowFailureError
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError
from temporalio.worker import Worker

from cohortflow.api.app import create_app
from cohortflow.errors import Invalid
from cohortflow.payload_codec import (
    COMPRESS_FROM_BYTES,
    ENCODING,
    ENCODING_ZLIB,
    EncryptionCodec,
    KeyRing,
    key_ring,
)
from cohortflow.runtime.binaries import temporal_cli
from cohortflow.runtime.devserver import DevServer
from cohortflow.runtime.ports import free_port
from cohortflow.settings import Settings
from cohortflow.storage.db import Database, migrate
from cohortflow.temporal_client import connect
from tests.harness import bearer, issue_token, serve_app

CANARY = "canary-ada@example.com"
CHROMIUM = "/usr/bin/chromium"


def ring(*ids: str) -> KeyRing:
    return KeyRing({key_id: os.urandom(32) for key_id in ids})


def payload(text: str) -> Payload:
    return Payload(metadata={"encoding": b"json/plain"}, data=json.dumps(text).encode())


async def test_sealed_payloads_hide_their_content_and_open_to_the_same_payload() -> None:
    codec = EncryptionCodec(ring("k1"))
    original = [payload(CANARY), payload(CANARY)]
    sealed = await codec.encode(original)
    assert all(p.metadata["encoding"] == ENCODING for p in sealed)
    assert all(p.metadata["encryption-key-id"] == b"k1" for p in sealed)
    assert all(CANARY.encode() not in p.SerializeToString() for p in sealed)
    assert sealed[0].data != sealed[1].data  # a fresh nonce each time
    assert await codec.decode(sealed) == original
    # What was never sealed (histories from before encryption) passes through.
    assert await codec.decode(original) == original


async def test_a_large_payload_is_compressed_under_the_seal_and_cannot_be_relabelled() -> None:
    codec = EncryptionCodec(ring("k1"))
    large = payload(CANARY + " " + "the same words again " * 100)
    assert large.ByteSize() >= COMPRESS_FROM_BYTES
    [sealed] = await codec.encode([large])
    assert sealed.metadata["encoding"] == ENCODING_ZLIB
    assert len(sealed.data) < large.ByteSize() / 4
    assert await codec.decode([sealed]) == [large]
    # The encoding is authenticated: as the uncompressed kind it does not open.
    relabelled = Payload(metadata={**sealed.metadata, "encoding": ENCODING}, data=sealed.data)
    with pytest.raises(ValueError, match="does not open with key 'k1'"):
        await codec.decode([relabelled])


async def test_a_rotated_ring_seals_with_its_newest_key_and_still_opens_the_old() -> None:
    old_keys = {"k1": os.urandom(32)}
    before = await EncryptionCodec(KeyRing(old_keys)).encode([payload(CANARY)])
    rotated = EncryptionCodec(KeyRing({**old_keys, "k2": os.urandom(32)}))
    after = await rotated.encode([payload(CANARY)])
    assert after[0].metadata["encryption-key-id"] == b"k2"
    assert await rotated.decode([*before, *after]) == [payload(CANARY)] * 2

    with pytest.raises(ValueError, match="sealed with key 'k2', not in the key ring"):
        await EncryptionCodec(KeyRing(old_keys)).decode(after)
    # One bit of the tag flipped (setting the last byte to 0 left it as it was 1 run in 256).
    last = after[0].data[-1] ^ 1
    forged = Payload(metadata=dict(after[0].metadata), data=after[0].data[:-1] + bytes([last]))
    with pytest.raises(ValueError, match="does not open with key 'k2'"):
        await rotated.decode([forged])


def test_the_embedded_ring_is_generated_once_private_and_a_bad_one_is_named(
    tmp_path: Path,
) -> None:
    settings = Settings(data_dir=tmp_path / "data", payload_keys=None)
    first = key_ring(settings)
    assert stat.S_IMODE(settings.payload_key_file.stat().st_mode) == 0o600
    assert key_ring(settings).sealer()[0] == first.sealer()[0] == "k1"
    assert list(settings.payload_key_file.parent.iterdir()) == [settings.payload_key_file]

    with pytest.raises(Invalid, match="no payload key file"):
        key_ring(Settings(data_dir=tmp_path / "other", payload_keys=None), create=False)
    short = json.dumps({"k1": base64.b64encode(b"short").decode()})
    with pytest.raises(Invalid, match="key 'k1' is 5 bytes, not 32") as caught:
        key_ring(Settings(data_dir=tmp_path, payload_keys=short))
    assert caught.value.field == "COHORTFLOW_PAYLOAD_KEYS"


@activity.defn
async def refuse(customer: str) -> str:
    raise ApplicationError(f"the CRM refused {customer}", non_retryable=True)


@workflow.defn(sandboxed=False)
class Echo:
    @workflow.run
    async def run(self, customer: str) -> str:
        if customer.startswith("fail:"):
            return await workflow.execute_activity(
                refuse,
                customer,
                start_to_close_timeout=timedelta(seconds=10),
                retry_policy=RetryPolicy(maximum_attempts=1),
            )
        return f"hello {customer}"


async def stored_bytes(client: Client, workflow_id: str) -> bytes:
    """A workflow's history as the server stores it, every event serialised."""
    history = await client.get_workflow_handle(workflow_id).fetch_history()
    return b"".join(event.SerializeToString() for event in history.events)


async def run_both(client: Client, queue: str) -> BaseException:
    """Run Echo once to success and once to failure on ``client``; the failure's cause."""
    async with Worker(client, task_queue=queue, workflows=[Echo], activities=[refuse]):
        ok = await client.execute_workflow(Echo.run, CANARY, id=f"{queue}-ok", task_queue=queue)
        assert ok == f"hello {CANARY}"
        with pytest.raises(WorkflowFailureError) as failed:
            await client.execute_workflow(
                Echo.run, f"fail:{CANARY}", id=f"{queue}-fail", task_queue=queue
            )
    step = failed.value.cause
    assert isinstance(step, ActivityError) and step.cause is not None
    return step.cause


@pytest.mark.devserver
async def test_histories_on_the_server_hold_no_clear_payload_and_read_back_with_the_ring(
    dev_settings: Settings,
) -> None:
    client = await connect(dev_settings, tracing=False)
    plain = await Client.connect(dev_settings.resolved_temporal_address)
    sealed_queue, plain_queue = f"codec-{uuid.uuid4().hex[:8]}", f"plain-{uuid.uuid4().hex[:8]}"
    # The client with the ring reads the failure's own message back...
    cause = await run_both(client, sealed_queue)
    assert f"the CRM refused fail:{CANARY}" in str(cause)
    # ...while the stored histories, read raw, show neither input, result nor message,
    for suffix in ("ok", "fail"):
        assert CANARY.encode() not in await stored_bytes(plain, f"{sealed_queue}-{suffix}")
    # where a client without the codec leaves all of them in clear (the scan can see).
    await run_both(plain, plain_queue)
    for suffix in ("ok", "fail"):
        assert CANARY.encode() in await stored_bytes(plain, f"{plain_queue}-{suffix}")


KEYS = json.dumps({"k1": base64.b64encode(b"k" * 32).decode()})


def with_keys(settings: Settings, **extra: object) -> Settings:
    return settings.model_copy(update={"payload_keys": SecretStr(KEYS), **extra})


@pytest.mark.devserver
async def test_the_codec_server_decodes_for_a_token_and_the_temporal_cli_reads_through_it(
    dev_settings: Settings, db: Database, tmp_path: Path
) -> None:
    client = await connect(with_keys(dev_settings), tracing=False)
    queue = f"codec-{uuid.uuid4().hex[:8]}"
    await run_both(client, queue)
    operator = await issue_token(db, "sre", "operator")
    ingest = await issue_token(db, "web-sdk", "ingest")
    settings = with_keys(
        dev_settings,
        data_dir=tmp_path / "api",
        database_url=db.url,
        pseudonymisation_key=SecretStr("x" * 32),
    )
    sealed = await client.data_converter.encode([CANARY])
    document = {"payloads": [json_format.MessageToDict(p) for p in sealed]}
    with serve_app(create_app(settings)) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            assert (await http.post("/codec/decode", json=document)).status_code == 401
            refused = await http.post("/codec/decode", json=document, headers=bearer(ingest))
            assert refused.status_code == 403
            opened = await http.post("/codec/decode", json=document, headers=bearer(operator))
            assert opened.status_code == 200, opened.text
            payloads = json_format.ParseDict(opened.json(), Payloads()).payloads
            assert [json.loads(p.data) for p in payloads] == [CANARY]
            unknown = {"payloads": [{**document["payloads"][0], "metadata": {
                **document["payloads"][0]["metadata"],
                "encryption-key-id": base64.b64encode(b"k9").decode(),
            }}]}  # fmt: skip
            bad = await http.post("/codec/decode", json=unknown, headers=bearer(operator))
            assert bad.status_code == 422
            assert "sealed with key 'k9'" in bad.json()["detail"][0]["msg"]
            shown = show(dev_settings, f"{queue}-ok")
            assert shown and not any(CANARY in data for data in shown)
            endpoint = f"{url}/codec"
            decoded = show(dev_settings, f"{queue}-ok", endpoint, f"Bearer {operator}")
            assert json.dumps(CANARY) in decoded and json.dumps(f"hello {CANARY}") in decoded


def show(settings: Settings, workflow_id: str, endpoint: str = "", auth: str = "") -> list[str]:
    """The data of every payload ``temporal workflow show`` prints for ``workflow_id``,
    through a codec server if given."""
    args = [str(temporal_cli()), "workflow", "show", "--workflow-id", workflow_id]
    args += ["--address", settings.resolved_temporal_address, "--output", "json"]
    if endpoint:
        args += ["--codec-endpoint", endpoint, "--codec-auth", auth]
    done = subprocess.run(args, capture_output=True, text=True, timeout=60, check=True)
    found: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if "data" in node and "metadata" in node:
                found.append(base64.b64decode(node["data"]).decode("utf-8", "replace"))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(json.loads(done.stdout))
    return found


async def test_only_the_temporal_ui_may_read_codec_answers_across_origins(
    db: Database, tmp_path: Path
) -> None:
    settings = Settings(
        data_dir=tmp_path, database_url=db.url, payload_keys=KEYS, temporal_ui_port=8233
    )
    ui, other = "http://127.0.0.1:8233", "http://127.0.0.1:9999"
    preflight = {"Access-Control-Request-Method": "POST"}
    with serve_app(create_app(settings)) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            allowed = await http.options("/inbox/codec/decode", headers={"Origin": ui, **preflight})
            assert allowed.status_code == 204
            assert allowed.headers["access-control-allow-origin"] == ui
            assert allowed.headers["access-control-allow-credentials"] == "true"
            stranger = await http.options(
                "/inbox/codec/decode", headers={"Origin": other, **preflight}
            )
            assert "access-control-allow-origin" not in stranger.headers
            # No session cookie: the UI gets 401, and the header to read that it did.
            answer = await http.post(
                "/inbox/codec/decode", json={"payloads": []}, headers={"Origin": ui}
            )
            assert answer.status_code == 401
            assert answer.headers["access-control-allow-origin"] == ui
            # Other routes never answer across origins.
            health = await http.get("/healthz", headers={"Origin": ui})
            assert "access-control-allow-origin" not in health.headers


@pytest.mark.devserver
async def test_the_web_ui_shows_a_campaign_sealed_then_decoded_once_signed_in(
    tmp_path: Path,
) -> None:
    settings = Settings(
        data_dir=tmp_path,
        temporal_port=free_port(),
        temporal_ui_port=free_port(),
        api_port=free_port(),
        payload_keys=KEYS,
        pseudonymisation_key="p" * 32,
    )
    server = DevServer(settings)  # its UI decodes at the API's /inbox/codec
    await server.start()
    try:
        client = await connect(settings, tracing=False)
        queue = f"ui-{uuid.uuid4().hex[:8]}"
        await run_both(client, queue)
        run_id = (await client.get_workflow_handle(f"{queue}-ok").describe()).run_id
        await migrate(settings.resolved_database_url)
        db = Database(settings.resolved_database_url)
        token = await issue_token(db, "sre", "operator")
        with serve_app(create_app(settings), settings.api_port) as api:
            ui = f"http://127.0.0.1:{settings.temporal_ui_port}"
            history = f"{ui}/namespaces/default/workflows/{queue}-ok/{run_id}/history"
            async with async_playwright() as playwright:
                browser = await playwright.chromium.launch(executable_path=CHROMIUM)
                page = await browser.new_page()
                await page.goto(history)
                await expect(page.get_by_text("Workflow Execution Completed")).to_be_visible()
                await page.screenshot(path=str(artifact("sealed.png")), full_page=True)
                assert CANARY not in await page.inner_text("body")
                # Signed in to the inbox, with the UI's codec settings sending credentials
                # (what its Codec Server dialog stores), the same page reads in clear.
                await page.goto(f"{api}/inbox/login")
                await page.fill("input[name=token]", token)
                await page.click("button[type=submit]")
                await page.goto(ui)
                await page.evaluate(
                    """endpoint => {
                        localStorage.setItem('overrideRemoteCodecConfiguration', 'true');
                        localStorage.setItem('endpoint', JSON.stringify(endpoint));
                        localStorage.setItem('includeCredentials', 'true');
                    }""",
                    settings.ui_codec_endpoint,
                )
                await page.goto(history)
                await expect(page.get_by_text(f'"hello {CANARY}"').first).to_be_visible()
                await page.screenshot(path=str(artifact("decoded.png")), full_page=True)
                await browser.close()
        await db.dispose()
    finally:
        server.stop()


def artifact(name: str) -> Path:
    """Where a screenshot of this module goes."""
    folder = Path(__file__).resolve().parents[1] / "test-artifacts" / "codec"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name
