"""Customer pseudonymisation: the HMAC key and the customer keys made with it."""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from pathlib import Path

from cohortflow.settings import Settings

KEY_BYTES = 32


# What customer_key returns; source ids of this very shape are read as keys.
KEY_PATTERN = re.compile(r"c_[0-9a-f]{24}")


class KeyMissing(LookupError):
    """No key is configured and none was generated yet."""


def load_or_create_key(settings: Settings, *, create: bool = True) -> bytes:
    """Return the HMAC key: configured, or generated once into the data dir with mode 0600."""
    if settings.pseudonymisation_key is not None:
        return settings.pseudonymisation_key.get_secret_value().encode()
    path: Path = settings.key_file
    if path.exists():
        return bytes.fromhex(path.read_text().strip())
    if not create:
        raise KeyMissing(
            f"no pseudonymisation key: set COHORTFLOW_PSEUDONYMISATION_KEY or run "
            f"`cohortflow up --data-dir {settings.data_dir}` once to generate {path}"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(KEY_BYTES)
    # O_EXCL: two processes starting together must not each write a different key.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return bytes.fromhex(path.read_text().strip())
    with os.fdopen(fd, "w") as f:
        f.write(key.hex())
    return key


class Pseudonymiser:
    """Turns source customer ids into stable keyed-HMAC customer keys."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("pseudonymisation key must be at least 16 bytes")
        self._key = key

    def customer_key(self, source_id: str) -> str:
        """The customer key for a raw source id: ``c_`` and 24 hex digits of HMAC-SHA256."""
        digest = hmac.new(self._key, source_id.strip().encode(), hashlib.sha256).hexdigest()
        return f"c_{digest[:24]}"

    def resolve(self, customer: str) -> str:
        """The key for ``customer``, given either as a key (``c_`` and 24 hex digits, as
        every operator screen shows) or as the source id."""
        customer = customer.strip()
        return customer if KEY_PATTERN.fullmatch(customer) else self.customer_key(customer)

    @classmethod
    def from_settings(cls, settings: Settings, *, create: bool = True) -> Pseudonymiser:
        """Build from configuration or the data dir's key file (generated if ``create``)."""
        return cls(load_or_create_key(settings, create=create))
