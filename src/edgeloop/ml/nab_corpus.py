"""Reading a NAB corpus from disk: data files, labelled windows, profiles, reference results.

The layout is NAB's: ``data/<category>/<file>.csv`` (``timestamp,value``),
``labels/combined_windows.json``, ``config/profiles.json`` and, for comparisons,
``reference/scores/<detector>_<profile>_scores.csv`` and
``reference/raw/<detector>/<category>/<detector>_<file>.csv``.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from edgeloop.core.errors import ValidationError
from edgeloop.ml.nab import PROFILES, CostMatrix, FileLabels, window_rows

WINDOWS_FILE = "labels/combined_windows.json"
PROFILES_FILE = "config/profiles.json"


@dataclass(frozen=True, kw_only=True)
class NabFile:
    """One data file: its corpus name (``category/file.csv``), readings and labels."""

    name: str
    timestamps: NDArray[np.datetime64]
    values: NDArray[np.float64]
    labels: FileLabels

    @property
    def category(self) -> str:
        """The folder the file sits in (``realKnownCause``, ...)."""
        return self.name.split("/", 1)[0]


@dataclass(frozen=True, kw_only=True)
class NabCorpus:
    """The files of a NAB corpus in name order, and the windows labelled over all of them."""

    root: Path
    files: tuple[NabFile, ...]
    windows: int  # labelled windows in the corpus: the perfect score counts each once

    def by_name(self, name: str) -> NabFile:
        """The file called ``category/file.csv``."""
        for item in self.files:
            if item.name == name:
                return item
        raise KeyError(name)


@dataclass(frozen=True, kw_only=True)
class ReferenceRow:
    """One row of a NAB score table: a detector's result on one file."""

    detector: str
    profile: str
    file: str
    threshold: float
    score: float
    tp: int
    tn: int
    fp: int
    fn: int
    total: int


def load_corpus(root: Path) -> NabCorpus:
    """Read every data file under ``root/data`` with its windows from the labels file."""
    root = Path(root)
    windows_path = root / WINDOWS_FILE
    labelled = _read_json(windows_path)
    if not isinstance(labelled, dict):
        raise ValidationError(
            "expected an object of file name -> windows", source=str(windows_path)
        )
    data_dir = root / "data"
    paths = sorted(data_dir.glob("*/*.csv"))
    if not paths:
        raise ValidationError(
            "no data files (data/<category>/<file>.csv); is this a NAB corpus?", source=str(root)
        )
    files = []
    for path in paths:
        name = path.relative_to(data_dir).as_posix()
        if name not in labelled:
            raise ValidationError(f"{name} has no entry in the labels", source=str(windows_path))
        timestamps, values = read_series(path)
        try:
            bounds = [
                (np.datetime64(start, "us"), np.datetime64(end, "us"))
                for start, end in labelled[name]
            ]
        except (TypeError, ValueError) as err:
            raise ValidationError(
                f"windows must be [start, end] timestamp pairs: {err}",
                source=str(windows_path),
                field=name,
            ) from err
        labels = FileLabels(rows=len(values), windows=window_rows(timestamps, bounds))
        files.append(NabFile(name=name, timestamps=timestamps, values=values, labels=labels))
    named = {item.name for item in files}
    windows = sum(len(spans) for name, spans in labelled.items() if name in named)
    return NabCorpus(root=root, files=tuple(files), windows=windows)


def read_series(path: Path) -> tuple[NDArray[np.datetime64], NDArray[np.float64]]:
    """A ``timestamp,value`` CSV file as timestamps and float values, in file order.

    Timestamps are not required to increase: NAB's files repeat an hour at a clock change.
    """
    stamps: list[str] = []
    values: list[float] = []
    for line, row in _rows(path, ("timestamp", "value")):
        try:
            values.append(float(row["value"]))
        except ValueError as err:
            raise ValidationError(
                f"not a number: {row['value']!r}", source=f"{path}:{line}"
            ) from err
        stamps.append(row["timestamp"])
    try:
        timestamps = np.array(stamps, dtype="datetime64[us]")
    except ValueError as err:
        raise ValidationError(f"bad timestamp: {err}", source=str(path)) from err
    return timestamps, np.array(values, dtype=np.float64)


def load_profiles(root: Path) -> dict[str, CostMatrix]:
    """The scoring profiles of ``config/profiles.json``."""
    path = Path(root) / PROFILES_FILE
    raw = _read_json(path)
    profiles = {}
    try:
        for name, body in raw.items():
            matrix = body["CostMatrix"]
            profiles[name] = CostMatrix(
                tp_weight=float(matrix["tpWeight"]),
                fn_weight=float(matrix["fnWeight"]),
                fp_weight=float(matrix["fpWeight"]),
                tn_weight=float(matrix.get("tnWeight", 1.0)),
            )
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        raise ValidationError(
            f"expected {{profile: {{CostMatrix: {{tpWeight, fnWeight, fpWeight}}}}}}: {err!r}",
            source=str(path),
        ) from err
    return profiles


def check_profiles(root: Path) -> dict[str, CostMatrix]:
    """The corpus's profiles, refused unless they are the ones edgeloop scores with."""
    profiles = load_profiles(root)
    if profiles != PROFILES:
        raise ValidationError(
            f"profiles differ from NAB's ({sorted(profiles)}); edgeloop scores with NAB's own",
            source=str(Path(root) / PROFILES_FILE),
        )
    return profiles


def load_reference_scores(root: Path, detector: str, profile: str) -> list[ReferenceRow]:
    """A scoreboard detector's per-file rows from ``reference/scores`` (no totals row)."""
    path = Path(root) / "reference" / "scores" / f"{detector}_{profile}_scores.csv"
    rows = []
    fields = ("Detector", "Profile", "File", "Threshold", "Score", "TP", "TN", "FP", "FN")
    for line, row in _rows(path, (*fields, "Total_Count")):
        if not row["File"] or row["File"] == "Totals":
            continue
        try:
            rows.append(
                ReferenceRow(
                    detector=row["Detector"],
                    profile=row["Profile"],
                    file=row["File"],
                    threshold=float(row["Threshold"]),
                    score=float(row["Score"]),
                    tp=int(row["TP"]),
                    tn=int(row["TN"]),
                    fp=int(row["FP"]),
                    fn=int(row["FN"]),
                    total=int(row["Total_Count"]),
                )
            )
        except ValueError as err:
            raise ValidationError(str(err), source=f"{path}:{line}") from err
    return rows


def reference_detectors(root: Path) -> list[str]:
    """The detectors with a score table for every profile under ``reference/scores``."""
    folder = Path(root) / "reference" / "scores"
    names = {
        p.name.removesuffix("_standard_scores.csv") for p in folder.glob("*_standard_scores.csv")
    }
    return sorted(
        name
        for name in names
        if all((folder / f"{name}_{profile}_scores.csv").is_file() for profile in PROFILES)
    )


def load_raw_scores(root: Path, detector: str, name: str) -> NDArray[np.float64]:
    """The ``anomaly_score`` column of a reference detector's raw output for one file."""
    category, file = name.split("/", 1)
    path = Path(root) / "reference" / "raw" / detector / category / f"{detector}_{file}"
    scores = []
    for line, row in _rows(path, ("anomaly_score",)):
        try:
            scores.append(float(row["anomaly_score"]))
        except ValueError as err:
            raise ValidationError(str(err), source=f"{path}:{line}") from err
    return np.array(scores, dtype=np.float64)


def _rows(path: Path, required: tuple[str, ...]) -> Iterator[tuple[int, dict[str, str]]]:
    try:
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            missing = [name for name in required if name not in (reader.fieldnames or ())]
            if missing:
                raise ValidationError(f"missing column(s) {', '.join(missing)}", source=str(path))
            for row in reader:
                yield reader.line_num, row
    except OSError as err:
        raise ValidationError(f"cannot read: {err.strerror}", source=str(path)) from err


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with path.open() as handle:
            parsed = json.load(handle)
    except OSError as err:
        raise ValidationError(f"cannot read: {err.strerror}", source=str(path)) from err
    except json.JSONDecodeError as err:
        raise ValidationError(f"not JSON: {err}", source=str(path)) from err
    if not isinstance(parsed, dict):
        raise ValidationError("expected a JSON object", source=str(path))
    return parsed


def default_root(start: Path | None = None) -> Path | None:
    """Where the NAB corpus is: ``$EDGELOOP_NAB``, else ``../shared/nab`` beside the checkout.

    The checkout is the first folder holding a ``pyproject.toml`` at or above ``start`` (the
    working directory) or above this package. None when neither has a corpus.
    """
    configured = os.environ.get("EDGELOOP_NAB")
    if configured:
        return Path(configured)
    for origin in (start or Path.cwd(), Path(__file__).resolve()):
        for folder in (origin, *origin.parents):
            if (folder / "pyproject.toml").is_file():
                candidate = folder.parent / "shared" / "nab"
                if (candidate / WINDOWS_FILE).is_file():
                    return candidate
                break
    return None
