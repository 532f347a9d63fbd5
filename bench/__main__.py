"""Every bench at a size that fits in about ten minutes here, one after another, then one table.

    python -m bench [--only NAME ...]

Each bench runs in its own process (``python -m bench.NAME`` with the arguments below) and
ends with one JSON line, of which the table shows the ratio against its target. A bench's
own defaults are the sizes its issue measured; these are smaller, for a look after a change.
Ends with one JSON line: every bench's ratio and target, and how many met it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

# (bench, arguments): small sizes, together about ten minutes on two cores. Each is large
# enough that its ratio measures the steady state, not fixed costs: at 200,000 customers a
# cohort evaluation is mostly set-up (0.70, against 0.88 at 2 million), and 100 campaigns at
# a CRM allowing 10 requests per 10 s mostly wait out one window (0.58, against 0.93 at 400).
QUICK: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("campaign_throughput", ("--campaigns", "100")),
    ("scoring", ("--calls", "500")),
    ("cohort_eval", ("--customers", "2000000")),
    ("ingest", ("--events", "5000")),
    ("crm_sync", ("--records", "2000")),
    ("crm_end_to_end", ("--campaigns", "400")),
    ("bulk_decisions", ("--requests", "300")),
    ("chaos", ("--campaigns", "20", "--kills", "3", "--seed", "3")),
    ("load", ("--seconds", "30", "--campaigns", "10")),
    ("consent_latency", ("--revocations", "100", "--events", "60", "--burst", "40")),
    ("memory_at_scale", ("--campaigns", "1000")),
)
# Benches whose target is for a ratio other than ``ratio``.
TARGET_OF = {"campaign_throughput": "ratio_vs_same_effects"}


@dataclass
class Outcome:
    """One bench's run: its JSON line (None if it printed none) and its time."""

    name: str
    figures: dict[str, Any] | None
    seconds: float
    error: str = ""

    @property
    def ratio(self) -> float | None:
        """The ratio its target is for."""
        if self.figures is None:
            return None
        value = self.figures.get(TARGET_OF.get(self.name, "ratio"))
        return float(value) if value is not None else None

    @property
    def met(self) -> bool:
        """Whether that ratio reaches the target (every bench's ratio grows with merit)."""
        target = (self.figures or {}).get("target")
        return self.ratio is not None and target is not None and self.ratio >= float(target)


def run(name: str, args: tuple[str, ...]) -> Outcome:
    """``python -m bench.NAME ARGS``; its last line, parsed."""
    began = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", f"bench.{name}", *args], capture_output=True, text=True
    )
    seconds = time.perf_counter() - began
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        error = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        return Outcome(name, None, seconds, error[:120])
    return Outcome(name, json.loads(lines[-1]), seconds)


def table(outcomes: list[Outcome]) -> str:
    """The outcomes, one row each."""
    rows = [f"{'bench':<20} {'ratio':>8} {'target':>7} {'met':>4} {'seconds':>8}"]
    for o in outcomes:
        if o.figures is None:
            rows.append(
                f"{o.name:<20} {'failed':>8} {'':>7} {'no':>4} {o.seconds:>8.0f}  {o.error}"
            )
            continue
        target = o.figures.get("target", "")
        met = "yes" if o.met else "no"
        rows.append(f"{o.name:<20} {o.ratio:>8} {target:>7} {met:>4} {o.seconds:>8.0f}")
    return "\n".join(rows)


def main(only: list[str]) -> dict[str, Any]:
    """Run the chosen benches (all by default) and print the table; the summary."""
    chosen = [(name, args) for name, args in QUICK if not only or name in only]
    outcomes = []
    for name, args in chosen:
        print(f"running bench.{name} {' '.join(args)} ...", file=sys.stderr, flush=True)
        outcomes.append(run(name, args))
    print(table(outcomes))
    return {
        "bench": "all",
        "ratio": round(sum(o.met for o in outcomes) / len(outcomes), 3),
        "target": 1.0,
        "met": sum(o.met for o in outcomes),
        "benches": len(outcomes),
        "seconds": round(sum(o.seconds for o in outcomes)),
        "ratios": {o.name: o.ratio for o in outcomes},
        "targets": {o.name: (o.figures or {}).get("target") for o in outcomes},
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    names = [name for name, _ in QUICK]
    parser.add_argument("--only", nargs="*", default=[], choices=names, help="run only these")
    print(json.dumps(main(parser.parse_args().only)))
