"""Population stability of features and scores against a model's reference distributions.

PSI = Σ (cᵢ - rᵢ) · ln(cᵢ / rᵢ) over the reference's bins (deciles of the reference, plus
one bin for missing values), with current (c) and reference (r) proportions floored at
:data:`EPSILON` so an empty bin does not make it infinite. The usual reading: below 0.1
stable, 0.1-0.2 worth watching, above 0.2 (:data:`DEFAULT_THRESHOLD`) shifted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from scoring.registry import ModelNotFound, ModelRegistry, ScoringError
from scoring.scorer import Scorer
from scoring.train import bin_counts

DEFAULT_THRESHOLD = 0.2
EPSILON = 1e-4
SCORE = "score"


@dataclass(frozen=True)
class DriftRow:
    """PSI of one feature (or of the score, named :data:`SCORE`)."""

    name: str
    psi: float
    flagged: bool


@dataclass(frozen=True)
class DriftReport:
    """PSI per feature and for the score of one model version on one population."""

    model: str
    version: str
    n_reference: int
    n_current: int
    threshold: float
    rows: list[DriftRow]

    @property
    def flagged(self) -> list[str]:
        """Names past the threshold."""
        return [row.name for row in self.rows if row.flagged]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dictionary."""
        return asdict(self) | {"flagged": self.flagged}


def psi(reference: Mapping[str, Any], values: npt.ArrayLike) -> float:
    """PSI of ``values`` against one reference entry (``edges`` and ``proportions``)."""
    edges = np.asarray(reference["edges"], dtype=np.float64)
    expected = np.maximum(np.asarray(reference["proportions"], dtype=np.float64), EPSILON)
    counts = bin_counts(np.asarray(values, dtype=np.float64), edges)
    total = counts.sum()
    if total == 0:
        raise ValueError("no values to compare")
    actual = np.maximum(counts / total, EPSILON)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def drift_report(
    model: str,
    version: str,
    reference: Mapping[str, Any],
    rows: Sequence[Mapping[str, float | None]],
    scores: Sequence[float],
    threshold: float = DEFAULT_THRESHOLD,
    order: Sequence[str] = (),
) -> DriftReport:
    """PSI of every reference feature over ``rows`` and of ``scores``, flagged past ``threshold``.

    A feature absent from a row counts as missing (the reference's NaN bin). Rows come in
    ``order`` first, then any other reference feature.
    """
    result = []
    # Meta JSON is written with sorted keys: report in the model's feature order instead.
    entries = reference["features"]
    for name in [*(n for n in order if n in entries), *(n for n in entries if n not in order)]:
        entry = entries[name]
        column = np.array(
            [np.nan if row.get(name) is None else row[name] for row in rows], dtype=np.float64
        )
        value = psi(entry, column)
        result.append(DriftRow(name, value, value > threshold))
    score_psi = psi(reference["score"], np.asarray(scores, dtype=np.float64))
    result.append(DriftRow(SCORE, score_psi, score_psi > threshold))
    return DriftReport(model, version, int(reference["n"]), len(rows), threshold, result)


def champion_drift(
    registry: ModelRegistry,
    model: str,
    rows: Sequence[Mapping[str, float | None]],
    threshold: float = DEFAULT_THRESHOLD,
) -> DriftReport:
    """Drift of ``rows`` (e.g. the whole feature store) against ``model``'s champion.

    Scores ``rows`` with the champion for the score's PSI. Raises :class:`ModelNotFound`
    without a champion and :class:`ScoringError` without rows or reference distributions.
    """
    info = registry.champion(model)
    if info is None:
        raise ModelNotFound(f"model {model!r} has no champion")
    if info.reference is None:
        raise ScoringError(f"{info.version} has no reference distributions: retrain it")
    if not rows:
        raise ScoringError("no customer features to compare")
    # Drift is about the population as it is: a key a row lacks counts as missing.
    complete = [{name: row.get(name) for name in info.inputs} for row in rows]
    scores = Scorer(registry).score(model, complete, version=info.version, top_k=0).scores
    return drift_report(
        model, info.version, info.reference, complete, scores, threshold, order=info.inputs
    )
