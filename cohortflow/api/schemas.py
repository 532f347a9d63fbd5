"""JSON Schemas of the request bodies routes read themselves, for the OpenAPI document.

The events routes parse their bodies by hand (each event is validated alone, gzip is
inflated first) and the cohort route takes any object and answers with its own paths; their
real schemas go into the document so clients and fuzzers see what is read.
"""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter

_REF = "#/components/schemas/{model}"


def body_schema(described: Any) -> dict[str, Any]:
    """The JSON Schema of ``described`` (a type pydantic knows), its models under ``$defs``
    but referred to as components: :func:`lift_definitions` moves them there."""
    schema: dict[str, Any] = TypeAdapter(described).json_schema(ref_template=_REF)
    return schema


def lift_definitions(document: dict[str, Any]) -> dict[str, Any]:
    """``document`` with the ``$defs`` of every request body schema moved to its components."""
    components = document.setdefault("components", {}).setdefault("schemas", {})
    for methods in document.get("paths", {}).values():
        for operation in methods.values():
            content = operation.get("requestBody", {}).get("content", {})
            for media in content.values():
                for name, definition in media.get("schema", {}).pop("$defs", {}).items():
                    if components.setdefault(name, definition) != definition:
                        raise ValueError(f"two different schemas named {name} in the document")
    return document
