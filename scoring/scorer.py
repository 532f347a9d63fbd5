"""Batch scoring with registered models, with per-row top feature contributions."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

import numpy as np
import numpy.typing as npt
import xgboost as xgb

from scoring.registry import ModelCorrupt, ModelInfo, ModelNotFound, ModelRegistry, ScoringError

__all__ = [
    "BatchScores",
    "FeatureMismatch",
    "ModelCorrupt",
    "ModelNotFound",
    "Scorer",
    "ScoringError",
]


class FeatureMismatch(ScoringError):
    """The model's features disagree with the registry, or an input row lacks one."""


@dataclass(frozen=True)
class BatchScores:
    """Scores of one batch, in input order.

    ``scores`` are probabilities; ``contributions`` holds, per row, up to ``top_k``
    (feature, SHAP value) pairs in margin (log-odds) units, largest absolute value first.
    """

    model: str
    version: str
    scores: list[float]
    contributions: list[list[tuple[str, float]]]


@dataclass(frozen=True)
class _LoadedModel:
    info: ModelInfo
    booster: xgb.Booster
    row_values: Callable[[Mapping[str, float | None]], Any]


def _load(info: ModelInfo) -> _LoadedModel:
    try:
        content = info.model_path.read_bytes()
    except OSError as exc:
        raise ModelCorrupt(f"{info.version}: cannot read {info.model_path}: {exc}") from exc
    if hashlib.sha256(content).hexdigest() != info.model_sha256:
        raise ModelCorrupt(f"{info.version}: {info.model_path} does not match its recorded hash")
    booster = xgb.Booster()
    try:
        booster.load_model(info.model_path)
    except xgb.core.XGBoostError as exc:
        raise ModelCorrupt(f"{info.version}: not a valid XGBoost JSON model: {exc}") from exc
    if tuple(booster.feature_names or ()) != info.feature_names:
        raise FeatureMismatch(
            f"{info.version}: booster features {booster.feature_names} differ from the "
            f"registry's {list(info.feature_names)}"
        )
    return _LoadedModel(info, booster, itemgetter(*info.feature_names))


class Scorer:
    """Scores rows with registry models; each (name, version) is loaded once and kept.

    Safe to share between threads: loading is serialised and XGBoost's prediction on a
    tree booster is thread-safe.
    """

    def __init__(self, registry: ModelRegistry) -> None:
        """Score with the models of ``registry``."""
        self._registry = registry
        self._models: dict[tuple[str, str], _LoadedModel] = {}
        self._lock = threading.Lock()

    def model(self, name: str, version: str | None = None) -> ModelInfo:
        """Load (or fetch from cache) ``version`` of ``name``, the champion if None.

        Raises :class:`ModelNotFound`, :class:`ModelCorrupt` or :class:`FeatureMismatch`.
        """
        return self._loaded(name, version).info

    def score(
        self,
        name: str,
        rows: Sequence[Mapping[str, float | None]],
        version: str | None = None,
        top_k: int = 3,
    ) -> BatchScores:
        """Score ``rows`` (feature name → value; None is missing) with ``name``.

        ``version`` None means the current champion. Keys beyond the model's features are
        ignored; a row without one of them raises :class:`FeatureMismatch`.
        """
        if top_k < 0:
            raise ValueError("top_k must be >= 0")
        loaded = self._loaded(name, version)
        info = loaded.info
        if not rows:
            return BatchScores(info.name, info.version, [], [])
        matrix = self._matrix(loaded, rows)
        scores = loaded.booster.inplace_predict(matrix).astype(np.float64).tolist()
        contributions: list[list[tuple[str, float]]]
        if top_k == 0:
            contributions = [[] for _ in rows]
        else:
            contributions = self._top_contributions(loaded, matrix, top_k)
        return BatchScores(info.name, info.version, scores, contributions)

    def _loaded(self, name: str, version: str | None) -> _LoadedModel:
        if version is None:
            version = self._registry.champion_version(name)
            if version is None:
                raise ModelNotFound(f"model {name!r} has no champion")
        key = (name, version)
        with self._lock:
            loaded = self._models.get(key)
            if loaded is None:
                loaded = _load(self._registry.get(name, version))
                self._models[key] = loaded
        return loaded

    @staticmethod
    def _matrix(
        loaded: _LoadedModel, rows: Sequence[Mapping[str, float | None]]
    ) -> npt.NDArray[np.float32]:
        names = loaded.info.feature_names
        try:
            values = [loaded.row_values(row) for row in rows]
        except KeyError as exc:
            missing = sorted({f for row in rows for f in names if f not in row})
            raise FeatureMismatch(
                f"{loaded.info.version}: input rows lack features {missing}"
            ) from exc
        try:
            # float32 conversion turns None into NaN, XGBoost's missing value.
            matrix = np.array(values, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise ScoringError(f"feature values must be numbers or None: {exc}") from exc
        return matrix.reshape(len(rows), len(names))

    @staticmethod
    def _top_contributions(
        loaded: _LoadedModel, matrix: npt.NDArray[np.float32], top_k: int
    ) -> list[list[tuple[str, float]]]:
        names = loaded.info.feature_names
        dmatrix = xgb.DMatrix(matrix, feature_names=list(names))
        # The last column is the bias, not a feature.
        contribs = loaded.booster.predict(dmatrix, pred_contribs=True)[:, :-1]
        order = np.argsort(-np.abs(contribs), axis=1, kind="stable")[:, :top_k]
        top_values = np.take_along_axis(contribs, order, axis=1).astype(np.float64).tolist()
        top_names = np.asarray(names, dtype=object)[order].tolist()
        return [
            list(zip(row_names, row_values, strict=True))
            for row_names, row_values in zip(top_names, top_values, strict=True)
        ]
