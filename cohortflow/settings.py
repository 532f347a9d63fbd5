"""One settings object, read from ``COHORTFLOW_*`` environment variables at entry points."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Literal, get_args
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from cohortflow.errors import Invalid

RoleName = Literal["ingest", "operator", "approver", "admin"]


# Every feature window (90 days at most) must lie inside what retention keeps.
MIN_RETENTION_DAYS = 120


class Settings(BaseSettings):
    """Runtime configuration. Defaults give the embedded, single-machine setup."""

    model_config = SettingsConfigDict(env_prefix="COHORTFLOW_", extra="ignore")

    data_dir: Path = Field(Path(".cohortflow"), description="Where embedded state lives.")
    environment: Literal["development", "production"] = Field(
        "development", description="production refuses one-machine defaults (check_production)."
    )

    temporal_address: str | None = Field(
        None, description="host:port of a Temporal cluster; unset means the embedded dev server."
    )
    temporal_namespace: str = "default"
    temporal_host: str = "127.0.0.1"
    temporal_port: int = Field(7233, ge=1, le=65535)
    temporal_ui_port: int = Field(8233, ge=1, le=65535)
    task_queue: str = "cohortflow-campaigns"
    crm_task_queue: str = "cohortflow-crm"
    crm_rate_limit: int = Field(
        100, ge=1, description="Requests the CRM allows per window, for every process together."
    )
    crm_rate_window_seconds: float = Field(10.0, gt=0, description="The CRM's rate window.")
    crm_batch_linger_ms: int = Field(
        200, ge=0, description="How long a CRM write waits for others to share its batch."
    )
    crm_owned_properties: list[str] = Field(
        default_factory=lambda: ["*"],
        description="Contact properties cohortflow may write (shell-style patterns, JSON list).",
    )
    crm_max_concurrent_activities: int = Field(
        500, ge=1, description="CRM activities one worker runs at once (they mostly wait)."
    )
    worker_workflow_tasks: int = Field(
        10,
        ge=1,
        description="Workflow tasks one worker process runs at once. They share one core (the"
        " GIL): more only makes each slower, while the rest wait on the server, where another"
        " worker may take them.",
    )
    worker_workflow_task_polls: int = Field(
        5,
        ge=1,
        description="Polls for workflow tasks one worker process keeps open at once (the SDK's"
        " max_concurrent_workflow_task_polls; the default is the SDK's).",
    )
    worker_max_cached_workflows: int = Field(
        1000,
        ge=0,
        description="Workflows one worker process keeps in memory between their tasks (the"
        " SDK's max_cached_workflows). Each costs about 0.25-0.3 MB; one left out is replayed"
        " from its history at its next task (about 30 ms of worker CPU), which a waiting"
        " campaign has only when its wait ends or a message reaches it. With 10,000 campaigns"
        " waiting a worker held 0.6 GB at 1000 and 1.5 GB, the ceiling aimed for, at 4000"
        " (bench.memory_at_scale).",
    )

    database_url: str | None = Field(
        None, description="SQLAlchemy async URL; unset means SQLite in the data directory."
    )

    api_host: str = "127.0.0.1"
    api_port: int = Field(8000, ge=1, le=65535)
    api_rate_per_second: float = Field(
        20.0, gt=0, description="Requests a second one API token may make (per API process)."
    )
    api_rate_burst: int = Field(60, ge=1, description="Requests a token may make at once.")
    token: SecretStr | None = Field(
        None,
        description="An API token the CLI acts as (its name and roles) instead of the"
        " local identity.",
    )
    local_identity: str | None = Field(
        None,
        description="Who the CLI acts as on this machine without a token (default: the"
        " operating-system user); recorded in the audit trail.",
    )
    local_roles: list[RoleName] = Field(
        default_factory=lambda: list(get_args(RoleName)),
        description="The local identity's roles (JSON list).",
    )
    public_url: str | None = Field(
        None,
        description="The API's address as operators reach it (https://cohortflow.example);"
        " escalation notices link to the request in the inbox under it.",
    )
    escalation_webhook_url: str | None = Field(
        None,
        description="Where approval escalation notices are POSTed as JSON; unset means they"
        " are only audited and shown in the inbox.",
    )
    escalation_webhook_secret: SecretStr | None = Field(
        None,
        description="Signs each escalation notice: X-Cohortflow-Signature is sha256= the"
        " HMAC-SHA256 of '<X-Cohortflow-Timestamp>.<body>' under this secret.",
    )

    nats_url: str = Field(
        "nats://127.0.0.1:4222", description="The NATS server `cohortflow consume` reads from."
    )
    events_stream: str = Field(
        "COHORTFLOW_EVENTS", description="The JetStream stream of incoming events (made if absent)."
    )
    events_subject: str = Field(
        "cohortflow.events", description="The subject event sources publish to."
    )
    events_consumer: str = Field(
        "cohortflow-ingest", description="The durable pull consumer's name."
    )
    dead_letter_subject: str = Field(
        "cohortflow.dead-letters",
        description="Where events that fail validation go, with their errors (own stream).",
    )
    worker_metrics_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="Where the worker serves Prometheus metrics (the Temporal SDK's and the"
        " campaigns' own) on api_host; unset serves none.",
    )
    consume_metrics_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="Where `cohortflow consume` serves Prometheus metrics (its lag) on"
        " api_host; unset serves none.",
    )
    consume_ack_wait_seconds: float = Field(
        30.0,
        gt=0,
        description="How long a fetched event may stay unacknowledged before"
        " JetStream delivers it again (a consumer that died mid-batch).",
    )

    crm_kind: Literal["sandbox", "hubspot"] = Field(
        "sandbox",
        description="The CRM's wire format: sandbox (our own dialect, the bundled sandbox's own"
        " mode) or hubspot (HubSpot's API; the sandbox serves it too, crm_sandbox_mode=hubspot).",
    )
    crm_url: str | None = Field(None, description="Base URL of the CRM; unset means the sandbox.")
    crm_token: SecretStr | None = Field(
        None, description="Bearer token (HubSpot: the private app's access token)."
    )
    crm_timeout_seconds: float = Field(10.0, gt=0)
    crm_api_paths: Literal["2026-03", "legacy"] = Field(
        "2026-03",
        description="HubSpot: the date-versioned paths (/crm/objects/2026-03/...) or the legacy"
        " v3/v4 ones (/crm/v3/objects/..., /automation/v4/sequences/...).",
    )
    crm_id_property: str = Field(
        "cohortflow_key",
        description="HubSpot: the unique-value contact property holding our customer key"
        " (create it in HubSpot with unique values); contacts are upserted and found by it.",
    )
    crm_sender_email: str = Field(
        "",
        description="HubSpot: the connected inbox sequence e-mails are sent from, when a"
        " campaign step names none.",
    )
    crm_user_id: str = Field(
        "",
        description="HubSpot: the id of the user who enrols contacts in sequences (the userId"
        " HubSpot's enrolment endpoint requires; that user owns the sender inbox).",
    )
    crm_sequence_unenroll_path: str = Field(
        "",
        description="HubSpot documents no unenrolment endpoint: a path on the CRM URL that"
        " takes POST {contactId, sequenceId} to unenrol (the sandbox's hubspot mode serves"
        " /automation/sequences/2026-03/enrollments/unenroll); empty means unenrolling a"
        " contact still enrolled is refused.",
    )
    crm_daily_reset_timezone: str = Field(
        "UTC",
        description="The time zone of the HubSpot account: its daily request limit resets at"
        " midnight there (the sandbox's daily limit too).",
    )
    crm_sandbox_host: str = "127.0.0.1"
    crm_sandbox_port: int = Field(8100, ge=1, le=65535)
    crm_sandbox_db: Path | None = None
    crm_sandbox_rate_limit: int = Field(100, ge=1, description="Requests per rolling window.")
    crm_sandbox_rate_window_seconds: float = Field(10.0, gt=0)
    crm_sandbox_error_rate: float = Field(0.0, ge=0, le=1)
    crm_sandbox_latency_ms: int = Field(0, ge=0)
    crm_sandbox_mode: Literal["own", "hubspot"] = Field(
        "own",
        description="own (our dialect, for crm_kind=sandbox) or hubspot (HubSpot's wire format,"
        " for crm_kind=hubspot; requires crm_token when it is set).",
    )
    crm_sandbox_daily_limit: int | None = Field(
        None, ge=1, description="hubspot mode: requests per day (reset at local midnight)."
    )

    decide_timeout_seconds: float = Field(
        20.0,
        gt=0,
        le=300,
        description="How long a decision waits for its campaign to confirm it before the"
        " operator is told it may still land (503; repeating the decision tells the outcome).",
    )
    event_retention_days: int | None = Field(
        None,
        ge=MIN_RETENTION_DAYS,
        description="Purge raw events older than this many days (hourly, in the worker), their"
        " totals kept for the features; unset keeps every event.",
    )
    temporal_ui_origins: list[str] = Field(
        default_factory=list,
        description="Origins of a Temporal Web UI allowed to decode payloads at the codec"
        " server (JSON list); unset means the embedded UI's.",
    )
    pseudonymisation_key: SecretStr | None = Field(
        None, description="HMAC key for customer keys; unset means a key file in the data dir."
    )
    payload_keys: SecretStr | None = Field(
        None,
        description="Keys sealing workflow payloads in Temporal: a JSON object of key id to"
        " base64 of 32 bytes, the last one sealing (append a key to rotate); unset means a key"
        " file in the data dir.",
    )
    models_dir: Path | None = None
    feature_snapshot_dir: Path | None = Field(
        None,
        description="Where full cohort evaluations keep the columnar feature snapshot; unset"
        " means the data dir. Shared by the processes that evaluate, or each takes its own.",
    )

    log_format: Literal["console", "json"] = "console"
    log_level: str = "INFO"
    otel_console: bool = Field(False, description="Export OpenTelemetry spans to the console.")
    otel_exporter_otlp_endpoint: str | None = Field(
        None,
        description="Base URL of an OTLP/HTTP collector (e.g. http://otel-collector:4318) to"
        " export spans to, at <url>/v1/traces; unset falls back to the standard"
        " OTEL_EXPORTER_OTLP_ENDPOINT, and without either no spans are exported over OTLP.",
    )

    @field_validator("crm_daily_reset_timezone")
    @classmethod
    def _known_time_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {value!r}") from exc
        return value

    @cached_property
    def resolved_database_url(self) -> str:
        """The database URL, defaulting to a SQLite file in the data directory."""
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'cohortflow.db').resolve()}"

    @property
    def resolved_temporal_address(self) -> str:
        """Where clients and workers connect."""
        return self.temporal_address or f"{self.temporal_host}:{self.temporal_port}"

    @property
    def embedded_temporal(self) -> bool:
        """True when cohortflow runs the Temporal dev server itself."""
        return self.temporal_address is None

    @property
    def resolved_crm_url(self) -> str:
        """Base URL of the CRM the connector talks to."""
        return self.crm_url or self.crm_sandbox_url

    @property
    def crm_sandbox_url(self) -> str:
        """Where the bundled sandbox CRM answers."""
        return f"http://{self.crm_sandbox_host}:{self.crm_sandbox_port}"

    def check_production(self) -> None:
        """In production, refuse the defaults that only suit one machine; raise
        :class:`Invalid` naming every offending setting by its variable, on one line.

        A generated pseudonymisation key lives in one data dir, so another replica (or a new
        volume) would mint different customer keys for the same people; an unset CRM URL
        means the sandbox, which nobody reads; an unset token means unauthenticated calls.

        Called by the long-running services, which between them write to the CRM and
        pseudonymise customer ids, and share one configuration: the worker, the HTTP API,
        ``up`` and ``demo``. Each checks all three, so whichever starts first names every
        gap. One-shot jobs (``db``, ``model``, operator commands) and ``crm-sandbox`` are not
        checked: they neither call the CRM nor generate a key (operator commands only read
        an existing one), so a migration or training job runs without the CRM's secret.
        """
        if self.environment != "production":
            return
        problems: list[tuple[str, str]] = []  # (variable, what is wrong with it)
        if self.pseudonymisation_key is None:
            problems.append(("COHORTFLOW_PSEUDONYMISATION_KEY", "must be set"))
        if self.payload_keys is None:
            problems.append(("COHORTFLOW_PAYLOAD_KEYS", "must be set"))
        if self.crm_token is None:
            problems.append(("COHORTFLOW_CRM_TOKEN", "must be set"))
        if self.crm_url is None:
            problems.append(("COHORTFLOW_CRM_URL", "must be set"))
        elif self.crm_url.rstrip("/") == self.crm_sandbox_url:
            problems.append(("COHORTFLOW_CRM_URL", f"must not be the sandbox CRM {self.crm_url}"))
        if not problems:
            return
        clauses = [f"{variable} {what}" for variable, what in problems]
        listed = clauses[0] if len(clauses) == 1 else f"{', '.join(clauses[:-1])} and {clauses[-1]}"
        raise Invalid(f"{listed} when COHORTFLOW_ENVIRONMENT=production", field=problems[0][0])

    @property
    def resolved_crm_sandbox_db(self) -> Path:
        """The sandbox CRM's own SQLite store."""
        return self.crm_sandbox_db or self.data_dir / "crm-sandbox.db"

    @property
    def resolved_models_dir(self) -> Path:
        """The model registry directory."""
        return self.models_dir or self.data_dir / "models"

    @property
    def resolved_feature_snapshot_dir(self) -> Path:
        """The feature snapshot directory."""
        return self.feature_snapshot_dir or self.data_dir / "feature-snapshots"

    @property
    def temporal_db_path(self) -> Path:
        """The embedded dev server's persistent SQLite file."""
        return self.data_dir / "temporal.db"

    @property
    def stack_file(self) -> Path:
        """Written by ``up``/``demo``: where the embedded stack answers, so operator commands
        given only ``--data-dir`` reach it on non-default ports."""
        return self.data_dir / "stack.json"

    @property
    def key_file(self) -> Path:
        """Where a generated pseudonymisation key is kept."""
        return self.data_dir / "pseudonymisation.key"

    @property
    def codec_origins(self) -> frozenset[str]:
        """The Temporal Web UI origins the codec server answers across origins."""
        if self.temporal_ui_origins:
            return frozenset(o.rstrip("/") for o in self.temporal_ui_origins)
        port = self.temporal_ui_port
        hosts = {self.temporal_host, "127.0.0.1", "localhost"}
        return frozenset(f"http://{host}:{port}" for host in hosts)

    @property
    def ui_codec_endpoint(self) -> str:
        """Where the embedded Web UI decodes payloads: the API's cookie-authenticated codec."""
        host = "127.0.0.1" if self.api_host in ("0.0.0.0", "::") else self.api_host
        return f"http://{host}:{self.api_port}/inbox/codec"

    @property
    def payload_key_file(self) -> Path:
        """Where a generated payload key ring is kept."""
        return self.data_dir / "payload-keys.json"
