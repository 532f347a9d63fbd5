"""A directory-based model registry.

Layout under ``root``::

    {name}/champion.json            pointer to the champion version of ``name``
    {name}/challenger.json          pointer to the challenger (scored in shadow), if any
    {name}/{version}/model.json     the booster, in XGBoost's JSON format
    {name}/{version}/meta.json      features, training window, metrics, provenance

Versions are ``{name}-v{n}-{hash8}`` where ``n`` counts registrations of ``name`` and
``hash8`` starts the SHA-256 of ``model.json``. A version directory appears in one
``rename`` of a fully written staging directory, and the JSON pointers are replaced with
``os.replace``, so readers never see a half-written model.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from scoring.train import ClassifierMetrics, QualityReport, TrainedModel, metrics_from_dict

MODEL_FILE = "model.json"
META_FILE = "meta.json"
CHAMPION_FILE = "champion.json"
CHALLENGER_FILE = "challenger.json"

_NAME = re.compile(r"[a-z0-9][a-z0-9_]*")
_VERSION = re.compile(r"(?P<name>[a-z0-9][a-z0-9_]*)-v(?P<number>[0-9]+)-[0-9a-f]{8}")


class ScoringError(Exception):
    """Base class of the errors raised when a model cannot be found, loaded or applied."""


class ModelNotFound(ScoringError):
    """No such model, version or champion in the registry."""


class ModelCorrupt(ScoringError):
    """A registry file is unreadable, not valid JSON or does not match its recorded hash."""


@dataclass(frozen=True)
class ModelInfo:
    """The registry's record of one model version; ``path`` is its directory."""

    name: str
    version: str
    feature_names: tuple[str, ...]
    feature_cutoff: date
    label_end: date
    data_hash: str
    model_sha256: str
    metrics: ClassifierMetrics = field(hash=False)
    n_train: int
    n_test: int
    params: dict[str, str | int | float] = field(hash=False)
    created_at: datetime
    #: Who last made this version champion, and when; None if it never was.
    promoted_by: str | None
    promoted_at: datetime | None
    path: Path
    #: What callers supply, in order; ``feature_names`` beyond these are derived with
    #: ``derived`` (BG/NBD parameters and horizon). Empty for models without derivation.
    input_features: tuple[str, ...] = ()
    derived: dict[str, float] | None = field(default=None, hash=False)
    report: QualityReport | None = field(default=None, hash=False)
    #: Binned feature and score distributions the model was trained to serve (for drift).
    reference: dict[str, Any] | None = field(default=None, hash=False)

    @property
    def model_path(self) -> Path:
        """The booster file, XGBoost JSON."""
        return self.path / MODEL_FILE

    @property
    def inputs(self) -> tuple[str, ...]:
        """The features a caller must supply, in order."""
        return self.input_features or self.feature_names


def _write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        # mkstemp makes owner-only files; workers may run as another user.
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=2, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def _read_json(path: Path) -> dict[str, Any]:
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        # Absence is not corruption: callers turn it into ModelNotFound or None.
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelCorrupt(f"{path}: {exc}") from exc
    if not isinstance(payload, dict):
        raise ModelCorrupt(f"{path}: expected a JSON object")
    return payload


def _meta_payload(info: ModelInfo) -> dict[str, Any]:
    return {
        "name": info.name,
        "version": info.version,
        "feature_names": list(info.feature_names),
        "feature_cutoff": info.feature_cutoff.isoformat(),
        "label_end": info.label_end.isoformat(),
        "data_hash": info.data_hash,
        "model_sha256": info.model_sha256,
        "metrics": info.metrics,
        "n_train": info.n_train,
        "n_test": info.n_test,
        "params": info.params,
        "created_at": info.created_at.isoformat(),
        "promoted_by": info.promoted_by,
        "promoted_at": None if info.promoted_at is None else info.promoted_at.isoformat(),
        "input_features": list(info.input_features),
        "derived": info.derived,
        "report": None if info.report is None else info.report.to_dict(),
        "reference": info.reference,
    }


def _info_from_meta(meta: dict[str, Any], path: Path) -> ModelInfo:
    try:
        metrics: ClassifierMetrics = metrics_from_dict(meta["metrics"])
        promoted_at = meta["promoted_at"]
        # Versions registered before derived features and reports existed lack these keys.
        derived = meta.get("derived")
        report = meta.get("report")
        return ModelInfo(
            name=str(meta["name"]),
            version=str(meta["version"]),
            feature_names=tuple(str(f) for f in meta["feature_names"]),
            feature_cutoff=date.fromisoformat(meta["feature_cutoff"]),
            label_end=date.fromisoformat(meta["label_end"]),
            data_hash=str(meta["data_hash"]),
            model_sha256=str(meta["model_sha256"]),
            metrics=metrics,
            n_train=int(meta["n_train"]),
            n_test=int(meta["n_test"]),
            params=dict(meta["params"]),
            created_at=datetime.fromisoformat(meta["created_at"]),
            promoted_by=meta["promoted_by"],
            promoted_at=None if promoted_at is None else datetime.fromisoformat(promoted_at),
            path=path,
            input_features=tuple(str(f) for f in meta.get("input_features", ())),
            derived=None if derived is None else {str(k): float(v) for k, v in derived.items()},
            report=None if report is None else QualityReport.from_dict(report),
            reference=meta.get("reference"),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelCorrupt(f"{path / META_FILE}: {exc!r}") from exc


def _model_names(root: Path) -> list[str]:
    if not root.is_dir():
        return []
    return sorted(
        entry.name for entry in root.iterdir() if entry.is_dir() and _NAME.fullmatch(entry.name)
    )


def _versions(model_dir: Path, name: str) -> list[tuple[Path, re.Match[str]]]:
    if not model_dir.is_dir():
        return []
    found = []
    for entry in model_dir.iterdir():
        match = _VERSION.fullmatch(entry.name)
        if match is not None and match["name"] == name and entry.is_dir():
            found.append((entry, match))
    return found


def model_name(version: str) -> str:
    """The model a version string belongs to; raise :class:`ModelNotFound` if malformed."""
    match = _VERSION.fullmatch(version)
    if match is None:
        raise ModelNotFound(f"{version!r} is not a model version (e.g. churn-v1-0123abcd)")
    return match["name"]


class ModelRegistry:
    """Models and their champions, stored as files under ``root``."""

    def __init__(self, root: Path) -> None:
        """Use ``root`` (created on first registration) as the registry directory."""
        self.root = root
        # Pointer files read, by path, with the identity of the file they were read from:
        # the score step asks for the champion on every call, and a stat costs a fraction
        # of opening and parsing the file. A pointer is replaced atomically (a new inode).
        self._pointers: dict[Path, tuple[tuple[int, int, int], str]] = {}

    def register(
        self,
        trained: TrainedModel,
        *,
        promoted_by: str | None = None,
        make_champion: bool = True,
    ) -> ModelInfo:
        """Store ``trained`` as a new version and, by default, make it the champion.

        ``promoted_by`` is recorded as the promoter when ``make_champion`` is set.
        """
        name = trained.name
        if not _NAME.fullmatch(name):
            raise ValueError(f"invalid model name {name!r}: use lower-case letters, digits, _")
        if tuple(trained.booster.feature_names or ()) != trained.feature_names:
            raise ValueError("the booster's feature names differ from trained.feature_names")
        model_dir = self.root / name
        model_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=model_dir))
        try:
            staging.chmod(0o755)
            trained.booster.save_model(staging / MODEL_FILE)
            model_sha256 = hashlib.sha256((staging / MODEL_FILE).read_bytes()).hexdigest()
            created_at = datetime.now(UTC)
            while True:
                version = f"{name}-v{self._next_number(name)}-{model_sha256[:8]}"
                info = ModelInfo(
                    name=name,
                    version=version,
                    feature_names=trained.feature_names,
                    feature_cutoff=trained.feature_cutoff,
                    label_end=trained.label_end,
                    data_hash=trained.data_hash,
                    model_sha256=model_sha256,
                    metrics=trained.metrics,
                    n_train=trained.n_train,
                    n_test=trained.n_test,
                    params=trained.params,
                    created_at=created_at,
                    promoted_by=promoted_by if make_champion else None,
                    promoted_at=created_at if make_champion else None,
                    path=model_dir / version,
                    input_features=trained.input_features,
                    derived=trained.derived,
                    report=trained.report,
                    reference=trained.reference,
                )
                _write_json_atomic(staging / META_FILE, _meta_payload(info))
                try:
                    staging.rename(info.path)
                except OSError as exc:
                    # Another process registered the same number first: take the next.
                    if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                        continue
                    raise
                break
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if make_champion:
            self._write_champion(info)
        return info

    def get(self, name: str, version: str) -> ModelInfo:
        """Return the record of ``version`` of ``name``; raise :class:`ModelNotFound`."""
        match = _VERSION.fullmatch(version)
        if not _NAME.fullmatch(name) or match is None or match["name"] != name:
            raise ModelNotFound(f"no model {name!r} version {version!r}")
        path = self.root / name / version
        try:
            meta = _read_json(path / META_FILE)
        except FileNotFoundError as exc:
            raise ModelNotFound(f"no model {name!r} version {version!r}") from exc
        info = _info_from_meta(meta, path)
        if (info.name, info.version) != (name, version):
            raise ModelCorrupt(f"{path / META_FILE} describes {info.name} {info.version}")
        return info

    def champion_version(self, name: str) -> str | None:
        """The champion version of ``name`` (one small file read), or None."""
        return self._pointer(name, CHAMPION_FILE)

    def challenger_version(self, name: str) -> str | None:
        """The challenger version of ``name`` (scored in shadow), or None."""
        return self._pointer(name, CHALLENGER_FILE)

    def _pointer(self, name: str, file_name: str) -> str | None:
        """The version a pointer file (champion or challenger) names, or None."""
        if not _NAME.fullmatch(name):
            return None
        path = self.root / name / file_name
        try:
            stat = path.stat()
            identity = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
            cached = self._pointers.get(path)
            if cached is not None and cached[0] == identity:
                return cached[1]
            pointer = _read_json(path)
        except FileNotFoundError:
            return None
        version = pointer.get("version")
        if not isinstance(version, str):
            raise ModelCorrupt(f"{path}: no version")
        self._pointers[path] = (identity, version)
        return version

    def set_challenger(self, name: str, version: str, by: str) -> ModelInfo:
        """Make ``version`` the one challenger of ``name``; it must not be the champion."""
        info = self.get(name, version)
        if self.champion_version(name) == version:
            raise ValueError(f"{version} is the champion of {name}; it cannot also challenge")
        _write_json_atomic(
            self.root / name / CHALLENGER_FILE,
            {"version": version, "set_by": by, "set_at": datetime.now(UTC).isoformat()},
        )
        return info

    def clear_challenger(self, name: str) -> bool:
        """Stop shadow scoring for ``name``; True if there was a challenger."""
        if not _NAME.fullmatch(name):
            return False
        try:
            (self.root / name / CHALLENGER_FILE).unlink()
        except FileNotFoundError:
            return False
        return True

    def champion(self, name: str) -> ModelInfo | None:
        """The champion of ``name``, or None if none was ever promoted."""
        version = self.champion_version(name)
        return None if version is None else self.get(name, version)

    def promote(self, name: str, version: str, by: str) -> ModelInfo:
        """Make ``version`` the champion of ``name``, recording who did it and when.

        A challenger promoted to champion stops being the challenger.
        """
        info = self.get(name, version)
        promoted = replace(info, promoted_by=by, promoted_at=datetime.now(UTC))
        _write_json_atomic(info.path / META_FILE, _meta_payload(promoted))
        self._write_champion(promoted)
        if self.challenger_version(name) == version:
            self.clear_challenger(name)
        return promoted

    def list(self, name: str | None = None) -> list[ModelInfo]:
        """Every registered version (of ``name`` if given), by name then registration order."""
        if name is not None and not _NAME.fullmatch(name):
            return []
        names = [name] if name is not None else _model_names(self.root)
        infos: list[ModelInfo] = []
        for model_name in names:
            numbered = sorted(
                (int(match["number"]), entry.name)
                for entry, match in _versions(self.root / model_name, model_name)
            )
            infos.extend(self.get(model_name, version) for _, version in numbered)
        return infos

    def _next_number(self, name: str) -> int:
        return 1 + max(
            (int(match["number"]) for _, match in _versions(self.root / name, name)), default=0
        )

    def _write_champion(self, info: ModelInfo) -> None:
        _write_json_atomic(
            self.root / info.name / CHAMPION_FILE,
            {
                "version": info.version,
                "promoted_by": info.promoted_by,
                "promoted_at": None if info.promoted_at is None else info.promoted_at.isoformat(),
            },
        )
