"""cohortflow: durable, segment-triggered CRM automation on Temporal."""

__version__ = "0.1.0"
