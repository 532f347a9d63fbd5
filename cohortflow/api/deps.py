"""What every route of the API shares: the app's state, request bodies, operator controls."""

from __future__ import annotations

from typing import Annotated

import structlog
from fastapi import Depends, Request
from pydantic import BaseModel, ConfigDict
from temporalio.client import Client

from cohortflow.api.auth import Authenticator
from cohortflow.api.inbox_session import InboxSessions
from cohortflow.auth.rate_limit import RateLimiter
from cohortflow.auth.tokens import TokenService
from cohortflow.campaigns.controls import Controls
from cohortflow.events.relay import SignalRelay
from cohortflow.events.signals import TemporalSignaller
from cohortflow.payload_codec import EncryptionCodec, key_ring
from cohortflow.pseudonymisation import Pseudonymiser
from cohortflow.settings import Settings
from cohortflow.storage.db import Database
from cohortflow.temporal_client import connect

log = structlog.get_logger(__name__)


class StrictBody(BaseModel):
    """A request body: unknown fields are refused by name, text is trimmed."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


class AppState:
    """Per-app dependencies; the Temporal client connects lazily so the API starts alone."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.db = Database(settings.resolved_database_url)
        self.pseudonymiser = Pseudonymiser.from_settings(settings)
        self.codec = EncryptionCodec(key_ring(settings))
        self.client: Client | None = None
        self.tokens = TokenService(self.db)
        self.auth = Authenticator(
            self.tokens, RateLimiter(settings.api_rate_per_second, settings.api_rate_burst)
        )
        # Cookies are Secure outside development, where the API sits behind TLS.
        secure = settings.environment != "development"
        self.inbox = InboxSessions(self.db, self.tokens, secure=secure)
        # Delivers the signals new events and consent changes owe running campaigns (see
        # ``events.relay``).
        self.relay = SignalRelay(
            self.db,
            TemporalSignaller(lambda: connect(settings, tracing=False), retry_seconds=5.0),
        )

    async def temporal(self) -> Client | None:
        """The Temporal client, connected on first use; None while Temporal is unreachable."""
        if self.client is None:
            try:
                self.client = await connect(self.settings)
            except RuntimeError as exc:
                log.warning("temporal unreachable", error=str(exc))
        return self.client

    async def controls(self) -> Controls:
        """Operator controls over the database and (when reachable) Temporal; consent
        changes' signals go out through the app's relay."""
        client = await self.temporal()
        return Controls(self.db, self.settings, self.pseudonymiser, client, self.relay)


def app_state(request: Request) -> AppState:
    """The state :func:`cohortflow.api.app.create_app` attached to the app."""
    state: AppState = request.app.state.cohortflow
    return state


async def _controls(request: Request) -> Controls:
    return await app_state(request).controls()


# At module level: with postponed annotations FastAPI resolves these in the module's globals;
# a local alias inside a factory made every endpoint expect a query parameter (422).
Ctl = Annotated[Controls, Depends(_controls)]
State = Annotated[AppState, Depends(app_state)]
