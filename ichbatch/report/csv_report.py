"""The results CSV: one row per study, a stable schema (documented in the README).

Re-running over the same studies replaces their rows; every write is atomic. Cells that a spreadsheet
would run as a formula (starting with = + - @, tab or carriage return) are neutralised with a leading '.
"""

from __future__ import annotations

import hashlib
import hmac
import io
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from .. import NOT_FOR_DIAGNOSIS
from ..config import LABELS, SUBTYPES
from ..domain import FileIssue, StudyResult
from ..errors import OutputError
from .files import atomic_write_bytes

COLUMNS: tuple[str, ...] = (
    "study_uid", "accession", "patient_id", "study_date", "series_uid", "series_description",
    "n_slices", "status", "message",
    *(f"prob_{label}" for label in LABELS),
    "flag_any", *(f"flag_{s}" for s in SUBTYPES),
    "key_slices", "model", "model_version", "tta", "seconds", "report_pdf", "notice",
)
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
IDENTIFIERS = ("patient_id", "accession")


def neutralise(value: object) -> object:
    if isinstance(value, str) and value.startswith(FORMULA_START):
        return "'" + value
    return value


def pseudonym(value: str, key: bytes) -> str:
    """A keyed hash: stable for one key, not reversible without it."""
    if not value:
        return ""
    return "PSN-" + hmac.new(key, value.encode(), hashlib.sha256).hexdigest()[:16]


def notice(result: StudyResult) -> str:
    trained = " UNTRAINED placeholder weights, scores are meaningless;" if not result.model_trained else ""
    source = f" trained on: {result.model_trained_on[:120]};" if result.model_trained and result.model_trained_on else ""
    return f"{NOT_FOR_DIAGNOSIS}; model {result.model} {result.model_version};{trained}{source} see model card"


def row(result: StudyResult, pseudonym_key: bytes | None = None) -> dict[str, object]:
    study = result.study
    out: dict[str, object] = {
        "study_uid": study.study_uid,
        "accession": study.accession,
        "patient_id": study.patient_id,
        "study_date": study.study_date,
        "series_uid": result.series_uid,
        "series_description": result.series_description,
        "n_slices": result.n_slices,
        "status": result.status.value,
        "message": result.message,
    }
    for label in LABELS:
        p = result.study_probs.get(label)
        out[f"prob_{label}"] = "" if p is None else round(float(p), 4)
    for label in LABELS:
        f = result.flags.get(label)
        out[f"flag_{label}"] = "" if f is None else int(f)
    out["key_slices"] = " ".join(str(k + 1) for k in result.key_slices)  # 1-based, in z order
    out.update(model=result.model, model_version=result.model_version, tta=result.tta,
               seconds=round(result.seconds, 3), report_pdf=result.report_pdf, notice=notice(result))
    if pseudonym_key is not None:
        for col in IDENTIFIERS:
            out[col] = pseudonym(str(out[col]), pseudonym_key)
    return {k: neutralise(v) for k, v in out.items()}


def write_results(path: Path, results: Iterable[StudyResult], pseudonym_key: bytes | None = None) -> pd.DataFrame:
    """Merge rows into the CSV at path: a study already there is replaced, never duplicated."""
    new = pd.DataFrame([row(r, pseudonym_key) for r in results], columns=list(COLUMNS))
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path} is a folder, not a CSV file")
    if path.exists() and path.stat().st_size > 0:
        try:
            old = pd.read_csv(path, dtype=str, keep_default_na=False)
        except (OSError, pd.errors.ParserError) as exc:
            raise OutputError(f"cannot read the existing {path} to merge into it: {exc}") from exc
        old = old[~old["study_uid"].isin(set(new["study_uid"]))]
        new = pd.concat([old.reindex(columns=list(COLUMNS), fill_value=""), new.astype(str)], ignore_index=True)
    buf = io.StringIO()
    new.to_csv(buf, index=False)
    atomic_write_bytes(path, buf.getvalue().encode("utf-8"))
    return new


def write_slices(path: Path, results: Iterable[StudyResult]) -> None:
    """Per-slice probabilities (after TTA, before smoothing), one row per slice of every ok study."""
    rows = []
    for r in results:
        if r.slice_probs is None:
            continue
        for k, probs in enumerate(r.slice_probs):
            entry: dict[str, object] = {"study_uid": r.study.study_uid, "slice": k + 1, "z_mm": round(r.slice_z[k], 3)}
            entry.update({f"prob_{label}": round(float(p), 4) for label, p in zip(r.outputs, probs)})
            rows.append(entry)
    buf = io.StringIO()
    pd.DataFrame(rows).to_csv(buf, index=False)
    atomic_write_bytes(Path(path), buf.getvalue().encode("utf-8"))


def write_file_issues(path: Path, issues: Iterable[FileIssue]) -> None:
    """Every file that was not used, with its status and reason (the per-file record of a run)."""
    frame = pd.DataFrame([{"path": i.path, "status": i.status.value, "message": i.message} for i in issues],
                         columns=["path", "status", "message"])
    buf = io.StringIO()
    frame.to_csv(buf, index=False)
    atomic_write_bytes(Path(path), buf.getvalue().encode("utf-8"))
