"""The sandbox CRM: a real HTTP server with its own SQLite store, for tests and demos."""

from cohortflow.crm.sandbox.app import SandboxConfig, create_app, serve

__all__ = ["SandboxConfig", "create_app", "serve"]
