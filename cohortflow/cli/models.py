"""Model commands: train, list, show, promote (champion or challenger), compare, drift."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import typer
from rich.table import Column, Table

from cohortflow.cli.common import DataDir, err, out, print_line, run, settings_for
from cohortflow.errors import Conflict, Invalid, NotFound

if TYPE_CHECKING:
    # Only types: scoring pulls in XGBoost and pandas, too slow for every command's start.
    from cohortflow.settings import Settings
    from scoring.registry import ModelInfo, ModelRegistry
    from scoring.train import TrainConfig

models_app = typer.Typer(
    help="Scoring models: train, list, show, promote, compare, drift.", no_args_is_help=True
)

ModelName = Annotated[
    Literal["churn", "propensity"], typer.Option("--model", help="churn or propensity.")
]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON object instead.")]
VersionArg = Annotated[str, typer.Argument(help="A model version, e.g. churn-v2-0123abcd.")]


def _registry(data_dir: Path | None) -> ModelRegistry:
    from scoring.registry import ModelRegistry

    return ModelRegistry(settings_for(data_dir=data_dir).resolved_models_dir)


def _get(registry: ModelRegistry, version: str) -> ModelInfo:
    from scoring.registry import ModelNotFound, model_name

    try:
        return registry.get(model_name(version), version)
    except ModelNotFound as exc:
        raise NotFound(str(exc)) from exc


@models_app.command("train")
def train(
    model: ModelName = "churn",
    data_dir: DataDir = None,
    transactions: Annotated[
        Path | None,
        typer.Option(help="A CDNOW-format transaction log (default: the shipped one)."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of boosting and bootstrap.")] = 42,
    split: Annotated[
        str | None,
        typer.Option(
            help="Another time split, TRAIN_FEATURES,TEST_FEATURES,TEST_LABELS (ISO dates; the"
            " training labels end at TEST_FEATURES), e.g. 1997-07-31,1997-12-31,1998-06-30."
            " Default: the model's own.",
        ),
    ] = None,
    promote: Annotated[
        bool, typer.Option("--promote/--no-promote", help="Make the new version champion.")
    ] = True,
    operator: Annotated[str, typer.Option("--operator", help="Who promotes.")] = "cli",
    if_missing: Annotated[
        bool,
        typer.Option(
            "--if-missing",
            help="Do nothing when the model already has a champion (for deployment jobs).",
        ),
    ] = False,
    json_output: Json = False,
) -> None:
    """Train a model with the strict time split, print its quality report, register it."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from scoring.cdnow import load_transactions
    from scoring.train import TrainConfig, train_model

    registry = _registry(data_dir)
    champion = registry.champion(model)
    if if_missing and champion is not None:
        print_line(f"{model} has champion {champion.version}; nothing trained")
        return
    config = _config(TrainConfig, model, seed, split)
    # Progress goes to stderr so --json leaves stdout to the one JSON object.
    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=err
    ) as progress:
        task = progress.add_task("loading transactions", total=None)

        def stage(message: str) -> None:
            progress.update(task, description=message)
            progress.console.print(f"  {message}", markup=False, highlight=False)

        try:
            rows = load_transactions(transactions)
        except (OSError, ValueError) as exc:
            raise Invalid(f"cannot read transactions: {exc}", field="transactions") from exc
        trained = train_model(rows, config, stage)
        progress.update(task, description="registering")
        info = registry.register(trained, promoted_by=operator, make_champion=promote)
    if json_output:
        assert trained.report is not None  # train_model always reports
        payload = {"version": info.version, "champion": promote} | trained.report.to_dict()
        print_line(json.dumps(payload, sort_keys=True))
        return
    if trained.report is not None:
        print_line(trained.report.to_text())
    state = "champion" if promote else "not promoted"
    print_line(f"registered {info.version} ({state}) in {registry.root}")


def _config(kind: type[TrainConfig], model: str, seed: int, split: str | None) -> TrainConfig:
    """The model's configuration, on ``split`` when given (refused by name when malformed)."""
    dates: dict[str, date] = {}
    if split is not None:
        try:
            train_features, test_features, test_labels = (
                date.fromisoformat(part.strip()) for part in split.split(",")
            )
        except ValueError as exc:
            raise Invalid(
                "split: needs TRAIN_FEATURES,TEST_FEATURES,TEST_LABELS as ISO dates",
                field="split",
            ) from exc
        dates = {
            "train_feature_cutoff": train_features,
            "train_label_end": test_features,
            "feature_cutoff": test_features,
            "label_end": test_labels,
        }
    try:
        return kind.for_model(model, seed=seed, **dates)
    except ValueError as exc:
        raise Invalid(f"split: {exc}", field="split") from exc


@models_app.command("list")
def list_models(
    model: Annotated[str | None, typer.Option("--model", help="Only this model.")] = None,
    data_dir: DataDir = None,
    json_output: Json = False,
) -> None:
    """Every registered version with its holdout metrics; marks champion and challenger."""
    registry = _registry(data_dir)
    infos = registry.list(model)
    roles = {
        name: (registry.champion_version(name), registry.challenger_version(name))
        for name in {i.name for i in infos}
    }

    def role(info: ModelInfo) -> str:
        champion, challenger = roles[info.name]
        if info.version == champion:
            return "champion"
        return "challenger" if info.version == challenger else ""

    if json_output:
        print_line(
            json.dumps(
                [
                    {
                        "version": i.version,
                        "role": role(i) or None,
                        "created_at": i.created_at.isoformat(),
                        "auroc": i.metrics["auroc"],
                        "brier": i.metrics["brier"],
                        "promoted_by": i.promoted_by,
                    }
                    for i in infos
                ]
            )
        )
        return
    if not infos:
        print_line("no models registered")
        return
    table = Table("role", "created", "AUROC", "Brier", "promoted by")
    # Versions are what operators copy into promote and compare: never wrap or cut them.
    table.columns.insert(
        0, Column("version", no_wrap=True, min_width=max(len(i.version) for i in infos))
    )
    for i in infos:
        table.add_row(
            i.version,
            role(i),
            i.created_at.strftime("%Y-%m-%d"),
            f"{i.metrics['auroc']:.4f}",
            f"{i.metrics['brier']:.4f}",
            i.promoted_by or "",
        )
    out.print(table)


@models_app.command("show")
def show(version: VersionArg, data_dir: DataDir = None, json_output: Json = False) -> None:
    """One version: features, training window, data hash, metrics and its quality report."""
    info = _get(_registry(data_dir), version)
    if json_output:
        meta = json.loads((info.path / "meta.json").read_text(encoding="utf-8"))
        meta.pop("reference", None)
        print_line(json.dumps(meta, sort_keys=True))
        return
    lines = [
        f"{info.version}  created {info.created_at.isoformat()}",
        f"  features ({len(info.feature_names)}): {', '.join(info.feature_names)}",
        f"  feature cut-off {info.feature_cutoff}, labels to {info.label_end}",
        f"  data sha256 {info.data_hash}",
        f"  model sha256 {info.model_sha256}",
        f"  promoted by {info.promoted_by or '-'} at "
        f"{info.promoted_at.isoformat() if info.promoted_at else '-'}",
    ]
    if info.report is not None:
        lines += ["", info.report.to_text()]
    print_line("\n".join(lines))


@models_app.command("promote")
def promote(
    version: VersionArg,
    challenger: Annotated[
        bool,
        typer.Option(
            "--challenger", help="Make it the challenger (scored in shadow, never acted on)."
        ),
    ] = False,
    data_dir: DataDir = None,
) -> None:
    """Make a version the champion (exactly one per model) or the challenger, as this
    command's identity (COHORTFLOW_TOKEN or the local identity, an admin), on record in the
    audit trail."""
    registry = _registry(data_dir)
    info = _get(registry, version)
    settings = settings_for(data_dir=data_dir)
    role = "challenger" if challenger else "champion"

    def change(by: str) -> None:
        if not challenger:
            registry.promote(info.name, version, by=by)
            return
        try:
            registry.set_challenger(info.name, version, by=by)
        except ValueError as exc:
            raise Conflict(str(exc)) from exc

    by = run(lambda: _promoted(settings, info, role, change))
    shadow = " (scored in shadow)" if challenger else ""
    print_line(f"{version} is now the {role} of {info.name}{shadow} (by {by})")


async def _promoted(
    settings: Settings, info: ModelInfo, role: str, change: Callable[[str], None]
) -> str:
    """Check who asks, make the change, and record it; the identity's name."""
    from cohortflow.audit.actions import record_action
    from cohortflow.auth import policy
    from cohortflow.cli.common import identity_of, ready
    from cohortflow.storage.db import Database
    from workflows.campaign.contract import AuditKind

    await ready(settings)
    db = Database(settings.resolved_database_url)
    try:
        who = await identity_of(settings, db)
        policy.require(who, policy.ADMIN, "promote models")
        # The audit row commits only once the registry has changed.
        async with db.transaction() as session:
            change(who.name)
            subject = f"model:{info.name}"
            await record_action(
                session,
                AuditKind.MODEL_PROMOTED,
                subject,
                who.name,
                version=info.version,
                role=role,
            )
    finally:
        await db.dispose()
    return who.name


@models_app.command("clear-challenger")
def clear_challenger(model: ModelName = "churn", data_dir: DataDir = None) -> None:
    """Stop shadow scoring for a model."""
    cleared = _registry(data_dir).clear_challenger(model)
    print_line(f"challenger of {model} cleared" if cleared else f"{model} had no challenger")


@models_app.command("compare")
def compare(
    version_a: VersionArg,
    version_b: VersionArg,
    data_dir: DataDir = None,
    json_output: Json = False,
) -> None:
    """Two versions' holdout metrics side by side (B minus A in the last column)."""
    registry = _registry(data_dir)
    a, b = _get(registry, version_a), _get(registry, version_b)
    keys = ("auroc", "pr_auc", "brier", "precision_at_10pct", "base_rate")
    rows = [(k, float(a.metrics[k]), float(b.metrics[k])) for k in keys]  # type: ignore[literal-required]
    if json_output:
        print_line(
            json.dumps(
                {
                    "a": a.version,
                    "b": b.version,
                    "metrics": {k: {"a": va, "b": vb, "diff": vb - va} for k, va, vb in rows},
                    "same_data": a.data_hash == b.data_hash,
                }
            )
        )
        return
    table = Table("metric", a.version, b.version, "B - A")
    for key, va, vb in rows:
        table.add_row(key, f"{va:.4f}", f"{vb:.4f}", f"{vb - va:+.4f}")
    table.add_row("feature cut-off", str(a.feature_cutoff), str(b.feature_cutoff), "")
    table.add_row("label end", str(a.label_end), str(b.label_end), "")
    table.add_row("features", str(len(a.feature_names)), str(len(b.feature_names)), "")
    out.print(table)
    if a.data_hash != b.data_hash:
        print_line("note: trained on different data (data hashes differ)")


@models_app.command("drift")
def drift(
    model: ModelName = "churn",
    threshold: Annotated[
        float, typer.Option(min=0.0, help="Flag a PSI above this (0.2: shifted).")
    ] = 0.2,
    data_dir: DataDir = None,
    json_output: Json = False,
) -> None:
    """PSI of every feature and of the score: the feature store now vs the model's training.

    Exits 0 whether or not something is flagged: the flags are the output.
    """
    from cohortflow.model_drift import store_drift

    settings = settings_for(data_dir=data_dir)
    registry = _registry(data_dir)
    report = run(lambda: store_drift(settings.resolved_database_url, registry, model, threshold))
    if json_output:
        print_line(json.dumps(report.to_dict(), sort_keys=True))
        return
    title = f"{report.version}: {report.n_current} customers now vs {report.n_reference} trained"
    table = Table("feature", "PSI", "flag", title=title)
    for row in report.rows:
        table.add_row(row.name, f"{row.psi:.4f}", "DRIFT" if row.flagged else "")
    out.print(table)
    flagged = report.flagged
    print_line(
        f"{len(flagged)} past PSI {report.threshold:g}: {', '.join(flagged)}"
        if flagged
        else f"nothing past PSI {report.threshold:g}"
    )
