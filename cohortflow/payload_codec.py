"""Workflow payloads encrypted before they reach Temporal, with keys that rotate.

Every client and worker gets :func:`data_converter`: each payload (inputs, results,
signals, updates, queries, memos, user metadata, heartbeat details) is serialised and
sealed with AES-GCM under a fresh 96-bit nonce, the key's id in the payload's metadata
(and bound in as associated data). The key ring's last key seals; every key in it opens, so
a key is rotated by appending a new one and retired once no open history needs it. The
failure converter moves failure messages and stack traces into an encoded payload too.
Search attributes cannot be encoded: they carry no personal data (docs/architecture.md,
"What an SRE reads in the Temporal UI").

A payload of ``COMPRESS_FROM_BYTES`` or more is compressed (zlib) before it is sealed, under
an encoding of its own that the seal authenticates. Compressed ciphertext lengths say a
little about the content; only someone who can both read histories and write into the same
payload could learn from them, and such a reader is already inside Temporal.

Payloads without our encoding pass through decoding untouched, so histories written before
encryption (and the saved histories the replay tests read) still decode.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import os
import secrets
import tempfile
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import temporalio.converter
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from temporalio.api.common.v1 import Payload

from cohortflow.errors import Invalid
from cohortflow.payload_json import PayloadConverter
from cohortflow.settings import Settings

ENCODING = b"binary/encrypted"
# The same, over the serialised payload compressed with zlib first.
ENCODING_ZLIB = b"binary/encrypted+zlib"
# Smaller payloads are sealed as they are: compressing them saves too little.
COMPRESS_FROM_BYTES = 512
KEY_ID = "encryption-key-id"
NONCE_BYTES = 12
KEY_BYTES = 32


class KeyRing:
    """Named AES-256 keys; the last one seals new payloads."""

    def __init__(self, keys: Mapping[str, bytes]) -> None:
        if not keys:
            raise ValueError("a key ring needs at least one key")
        for key_id, key in keys.items():
            if len(key) != KEY_BYTES:
                raise ValueError(f"key {key_id!r} is {len(key)} bytes, not {KEY_BYTES}")
        self._keys = {key_id: AESGCM(key) for key_id, key in keys.items()}
        self.current = list(keys)[-1]

    def sealer(self) -> tuple[str, AESGCM]:
        """The id and cipher that seal new payloads."""
        return self.current, self._keys[self.current]

    def opener(self, key_id: str) -> AESGCM:
        """The cipher of ``key_id``; ValueError when the ring lacks it."""
        try:
            return self._keys[key_id]
        except KeyError:
            raise ValueError(f"payload sealed with key {key_id!r}, not in the key ring") from None

    @classmethod
    def from_json(cls, text: str) -> KeyRing:
        """A ring from ``{"id": "<base64 of 32 bytes>", ...}``, in rotation order."""
        try:
            document = json.loads(text)
            if not isinstance(document, dict):
                raise ValueError("not a JSON object of key id to base64 key")
            return cls({str(k): base64.b64decode(v, validate=True) for k, v in document.items()})
        except (ValueError, TypeError, binascii.Error) as exc:
            raise ValueError(f"payload keys: {exc}") from exc


class EncryptionCodec(temporalio.converter.PayloadCodec):
    """AES-GCM over whole serialised payloads."""

    def __init__(self, ring: KeyRing) -> None:
        self._ring = ring

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        """Seal each payload with the ring's current key; one of ``COMPRESS_FROM_BYTES`` or
        more is compressed first (a campaign's input with its pinned spec shrinks from about
        3 KB to under 1 KB, and the server's CPU per start with it)."""
        key_id, cipher = self._ring.sealer()
        sealed = []
        for payload in payloads:
            clear, encoding = payload.SerializeToString(), ENCODING
            if len(clear) >= COMPRESS_FROM_BYTES:
                clear, encoding = zlib.compress(clear), ENCODING_ZLIB
            nonce = os.urandom(NONCE_BYTES)
            data = nonce + cipher.encrypt(nonce, clear, _associated(key_id.encode(), encoding))
            metadata = {"encoding": encoding, KEY_ID: key_id.encode()}
            sealed.append(Payload(metadata=metadata, data=data))
        return sealed

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        """Open each sealed payload; others pass through as they are."""
        opened = []
        for payload in payloads:
            encoding = payload.metadata.get("encoding")
            if encoding not in (ENCODING, ENCODING_ZLIB):
                opened.append(payload)
                continue
            key_id = payload.metadata.get(KEY_ID, b"")
            cipher = self._ring.opener(key_id.decode())
            nonce, sealed = payload.data[:NONCE_BYTES], payload.data[NONCE_BYTES:]
            try:
                clear = cipher.decrypt(nonce, sealed, _associated(key_id, encoding))
            except InvalidTag:
                raise ValueError(f"payload does not open with key {key_id.decode()!r}") from None
            opened.append(
                Payload.FromString(zlib.decompress(clear) if encoding == ENCODING_ZLIB else clear)
            )
        return opened


def _associated(key_id: bytes, encoding: bytes) -> bytes:
    """What the seal authenticates beside the content: the key's id, and for a compressed
    payload its encoding too, so relabelling one as the other fails to open."""
    return key_id if encoding == ENCODING else key_id + b";" + encoding


def data_converter(ring: KeyRing) -> temporalio.converter.DataConverter:
    """The default converter, with payloads and failure messages encrypted under ``ring``
    (and dataclasses encoded without deep copies: ``payload_json``)."""
    return dataclasses.replace(
        temporalio.converter.default(),
        payload_converter_class=PayloadConverter,
        payload_codec=EncryptionCodec(ring),
        failure_converter_class=temporalio.converter.DefaultFailureConverterWithEncodedAttributes,
    )


def key_ring(settings: Settings, *, create: bool = True) -> KeyRing:
    """The configured ring (``COHORTFLOW_PAYLOAD_KEYS``), else the data dir's key file,
    generated once (mode 0600) when ``create``; :class:`Invalid` for an unusable one."""
    try:
        if settings.payload_keys is not None:
            return KeyRing.from_json(settings.payload_keys.get_secret_value())
        return KeyRing.from_json(_key_file_text(settings.payload_key_file, create))
    except ValueError as exc:
        raise Invalid(str(exc), field="COHORTFLOW_PAYLOAD_KEYS") from exc


def _key_file_text(path: Path, create: bool) -> str:
    if path.exists() or not create:
        try:
            return path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"no payload key file at {path}: set the variable or run up") from exc
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"k1": base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode()})
    # Written aside, then linked into place: two processes starting together end up with
    # one ring, and no reader ever sees a half-written file.
    fd, aside = tempfile.mkstemp(prefix=".payload-keys-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.link(aside, path)
    except FileExistsError:
        return path.read_text(encoding="utf-8")
    finally:
        os.unlink(aside)
    return text
