"""Workflow code stays deterministic and light: the campaign package imports the Temporal SDK,
the standard library and its own modules, nothing else (docs/architecture.md)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CAMPAIGN = ROOT / "workflows" / "campaign"
FORBIDDEN = ("sqlalchemy", "xgboost", "pandas", "numpy", "httpx", "cohortflow", "scoring")


def imported(path: Path) -> set[str]:
    """Every module a file imports, by its full name."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_the_campaign_package_imports_only_the_sdk_the_standard_library_and_itself() -> None:
    modules = sorted(CAMPAIGN.glob("*.py"))
    assert {p.stem for p in modules} >= {"workflow", "interpreter", "state", "contract"}
    for path in modules:
        for name in imported(path):
            top = name.split(".")[0]
            allowed = top in sys.stdlib_module_names or top == "temporalio"
            assert allowed or name.startswith("workflows.campaign"), f"{path.name}: {name}"


def test_importing_workflows_pulls_in_no_storage_scoring_or_settings() -> None:
    code = (
        "import json, sys; import workflows.campaign.workflow, workflows.launch; "
        "print(json.dumps(sorted(sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    loaded = json.loads(result.stdout)
    offenders = [m for m in loaded if m.split(".")[0] in FORBIDDEN]
    assert offenders == []
    assert "workflows.campaign.interpreter" in loaded
