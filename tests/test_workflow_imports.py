"""Workflow code stays deterministic and light: it imports nothing with side effects."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = ("sqlalchemy", "xgboost", "pandas", "numpy", "httpx", "cohortflow", "scoring")


def test_importing_workflows_pulls_in_no_storage_scoring_or_settings() -> None:
    code = (
        "import json, sys; import workflows.campaign, workflows.messages; "
        "print(json.dumps(sorted(sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    loaded = json.loads(result.stdout)
    offenders = [m for m in loaded if m.split(".")[0] in FORBIDDEN]
    assert offenders == []
    assert "workflows.campaign" in loaded
