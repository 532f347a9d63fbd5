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

from scoring.bgnbd import BgNbdParams
from scoring.features import BGNBD_FEATURE_NAMES, bgnbd_columns
from scoring.registry import ModelCorrupt, ModelInfo, ModelNotFound, ModelRegistry, ScoringError

__all__ = [
    "BatchScores",
    "Columns",
    "FeatureMismatch",
    "ModelCorrupt",
    "ModelNotFound",
    "Rows",
    "Scorer",
    "ScoringError",
]


#: One mapping per customer (the campaign path).
Rows = Sequence[Mapping[str, float | None]]
#: One 1-D array per feature, all of one length (the batch path).
Columns = Mapping[str, npt.ArrayLike]


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
class _Derivation:
    """How a hybrid model's BG/NBD columns follow from three input columns."""

    params: BgNbdParams
    horizon_days: float
    frequency: int
    tenure_days: int
    age_days: int

    def columns(self, inputs: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        return bgnbd_columns(
            inputs[:, self.frequency],
            inputs[:, self.tenure_days],
            inputs[:, self.age_days],
            self.params,
            self.horizon_days,
        )


@dataclass(frozen=True)
class _LoadedModel:
    info: ModelInfo
    booster: xgb.Booster
    # The same trees held to one thread, for one row: a second thread has nothing to share
    # out, and waiting at OpenMP's barrier for a busy core cost tens of milliseconds at p99.
    one_row: xgb.Booster
    #: Feature names as an object array, to index by each row's contribution order.
    names: npt.NDArray[np.object_]
    row_values: Callable[[Mapping[str, float | None]], Any]
    derivation: _Derivation | None


def _derivation(info: ModelInfo) -> _Derivation | None:
    inputs = info.inputs
    extra = info.feature_names[len(inputs) :]
    if info.feature_names[: len(inputs)] != inputs:
        raise FeatureMismatch(f"{info.version}: model features do not start with its inputs")
    if not extra:
        return None
    if extra != BGNBD_FEATURE_NAMES or info.derived is None:
        raise FeatureMismatch(f"{info.version}: cannot derive features {list(extra)}")
    try:
        d = info.derived
        return _Derivation(
            params=BgNbdParams(d["r"], d["alpha"], d["a"], d["b"], 0.0, 0),
            horizon_days=d["horizon_days"],
            frequency=inputs.index("frequency"),
            tenure_days=inputs.index("tenure_days"),
            age_days=inputs.index("age_days"),
        )
    except (KeyError, ValueError) as exc:
        raise FeatureMismatch(f"{info.version}: incomplete derivation: {exc!r}") from exc


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
    one_row = booster.copy()
    one_row.set_param({"nthread": 1})
    names = np.asarray(info.feature_names, dtype=object)
    return _LoadedModel(info, booster, one_row, names, itemgetter(*info.inputs), _derivation(info))


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

    def challenger_version(self, name: str) -> str | None:
        """The version of ``name`` that scores in shadow, or None (one small file read)."""
        return self._registry.challenger_version(name)

    def score(
        self,
        name: str,
        rows: Rows | Columns,
        version: str | None = None,
        top_k: int = 3,
    ) -> BatchScores:
        """Score ``rows`` with ``name``; ``version`` None means the current champion.

        ``rows`` is either a sequence of rows (feature name → value, None is missing), as a
        campaign scores one customer, or columns (feature name → 1-D array, NaN is
        missing), as batch scoring reads a feature store: columns skip building a matrix
        row by row. Names beyond the model's features are ignored; a missing one raises
        :class:`FeatureMismatch`.
        """
        if top_k < 0:
            raise ValueError("top_k must be >= 0")
        loaded = self._loaded(name, version)
        info = loaded.info
        if isinstance(rows, Mapping):
            matrix = self._column_matrix(loaded, rows)
        elif rows:
            matrix = self._row_matrix(loaded, rows)
        else:
            return BatchScores(info.name, info.version, [], [])
        if matrix.shape[0] == 0:
            return BatchScores(info.name, info.version, [], [])
        n_inputs = len(info.inputs)
        if loaded.derivation is not None:
            # The matrices leave room for the derived columns: no copy to widen them.
            matrix[:, n_inputs:] = loaded.derivation.columns(matrix[:, :n_inputs])
        predicted, contribs = _predict(loaded, matrix, contributions=top_k > 0)
        scores = predicted.astype(np.float64).tolist()
        contributions: list[list[tuple[str, float]]]
        if contribs is None:
            # One shared empty list, read-only like the rest of BatchScores: 100,000 fresh
            # lists cost as much as the prediction itself (allocation and GC).
            contributions = [[]] * len(scores)
        else:
            contributions = _top_contributions(loaded, contribs, top_k)
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
    def _row_matrix(loaded: _LoadedModel, rows: Rows) -> npt.NDArray[np.float32]:
        names = loaded.info.inputs
        try:
            values = [loaded.row_values(row) for row in rows]
        except KeyError as exc:
            missing = sorted({f for row in rows for f in names if f not in row})
            raise FeatureMismatch(
                f"{loaded.info.version}: input rows lack features {missing}"
            ) from exc
        try:
            # float32 conversion turns None into NaN, XGBoost's missing value.
            inputs = np.array(values, dtype=np.float32).reshape(len(rows), len(names))
        except (TypeError, ValueError) as exc:
            raise ScoringError(f"feature values must be numbers or None: {exc}") from exc
        if len(loaded.info.feature_names) == len(names):
            return inputs
        matrix = np.empty((len(rows), len(loaded.info.feature_names)), dtype=np.float32)
        matrix[:, : len(names)] = inputs
        return matrix

    @staticmethod
    def _column_matrix(loaded: _LoadedModel, columns: Columns) -> npt.NDArray[np.float32]:
        names = loaded.info.inputs
        missing = [f for f in names if f not in columns]
        if missing:
            raise FeatureMismatch(f"{loaded.info.version}: input columns lack {missing}")
        arrays = [np.asarray(columns[f]) for f in names]
        if any(a.ndim != 1 for a in arrays) or len({len(a) for a in arrays}) != 1:
            raise ScoringError("feature columns must be 1-D numbers of one length")
        # Derived columns, if any, are written into the spare room by the caller.
        matrix = np.empty((len(arrays[0]), len(loaded.info.feature_names)), dtype=np.float32)
        try:
            for i, array in enumerate(arrays):
                # Assignment casts to float32 in place: no intermediate copy per column.
                matrix[:, i] = array
        except (TypeError, ValueError) as exc:
            raise ScoringError(f"feature columns must be numbers: {exc}") from exc
        return matrix


def _predict(
    loaded: _LoadedModel, matrix: npt.NDArray[np.float32], contributions: bool
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32] | None]:
    """Probabilities for ``matrix`` and, if asked, XGBoost's ``pred_contribs`` (SHAP values,
    the bias last)."""
    if matrix.shape[0] > 1:
        scores = loaded.booster.inplace_predict(matrix)
        if not contributions:
            return scores, None
        dmatrix = xgb.DMatrix(matrix, feature_names=list(loaded.info.feature_names))
        return scores, loaded.booster.predict(dmatrix, pred_contribs=True)
    # One row (a campaign's customer), on the one-thread booster.
    if not contributions:
        return loaded.one_row.inplace_predict(matrix), None
    # Building a DMatrix costs about what a prediction does, so one serves both; its scores
    # equal inplace_predict's bit for bit (tested). Names are left off and not validated:
    # the layout is the booster's by construction, checked at load.
    dmatrix = xgb.DMatrix(matrix, nthread=1)
    return (
        loaded.one_row.predict(dmatrix, validate_features=False),
        loaded.one_row.predict(dmatrix, pred_contribs=True, validate_features=False),
    )


def _top_contributions(
    loaded: _LoadedModel, contribs: npt.NDArray[np.float32], top_k: int
) -> list[list[tuple[str, float]]]:
    """Per row, the ``top_k`` (feature, SHAP value) pairs of XGBoost's ``pred_contribs``
    output, largest absolute value first (ties in feature order)."""
    # The last column is the bias, not a feature.
    contribs = contribs[:, :-1]
    order = np.argsort(-np.abs(contribs), axis=1, kind="stable")[:, :top_k]
    top_values = np.take_along_axis(contribs, order, axis=1).astype(np.float64).tolist()
    top_names = loaded.names[order].tolist()
    return [
        list(zip(row_names, row_values, strict=True))
        for row_names, row_values in zip(top_names, top_values, strict=True)
    ]
