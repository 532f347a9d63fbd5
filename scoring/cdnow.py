"""The CDNOW transaction log shipped with cohortflow (see cohortflow/data/README.md)."""

from __future__ import annotations

import gzip
from importlib.resources import files
from pathlib import Path

import pandas as pd

_FILE_NAME = "CDNOW_master.txt.gz"
_COLUMNS = ("customer_id", "date", "cds", "amount")


def cdnow_path() -> Path:
    """Return the path of the shipped ``CDNOW_master.txt.gz`` inside the installed package."""
    resource = files("cohortflow").joinpath("data", _FILE_NAME)
    if not isinstance(resource, Path):
        raise FileNotFoundError(f"{_FILE_NAME} is not on the file system (zipped install?)")
    return resource


def _header_lines(path: Path) -> int:
    # The shipped copy starts with a column header; the original release has none.
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="ascii") as handle:
        first = handle.readline().split()
    return 0 if first and first[0].isdigit() else 1


def load_transactions(path: Path | None = None) -> pd.DataFrame:
    """Load a CDNOW-format transaction log (the shipped one by default).

    Returns one row per record with columns ``customer_id`` (str, zero-padded as in the
    file), ``date`` (datetime64), ``cds`` (int64) and ``amount`` (float64), in file order.
    """
    source = cdnow_path() if path is None else path
    frame = pd.read_csv(
        source,
        sep=r"\s+",
        header=None,
        names=list(_COLUMNS),
        skiprows=_header_lines(source),
        dtype={"customer_id": str, "date": str, "cds": "int64", "amount": "float64"},
    )
    frame["date"] = pd.to_datetime(frame["date"], format="%Y%m%d")
    return frame
