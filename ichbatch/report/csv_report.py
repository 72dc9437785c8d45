"""The results CSV: one row per study, a stable schema (documented in the README).

Rows are committed to the results store (store.py) and the CSV shows exactly what it holds. Cells that a
spreadsheet would run as a formula (text starting with = + - @, tab or carriage return) get a leading ';
numbers we compute are written as they are. Line breaks inside values are quoted, so every reader sees
one row per study.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

from .. import NOT_FOR_DIAGNOSIS
from ..config import LABELS, SUBTYPES
from ..domain import Status, StudyResult
from .files import atomic_write_chunks
from .store import ResultsStore, csv_chunks

COLUMNS: tuple[str, ...] = (
    "study_uid", "accession", "patient_id", "study_date", "series_uid", "series_description",
    "n_slices", "status", "message",
    *(f"prob_{label}" for label in LABELS),
    "flag_any", *(f"flag_{s}" for s in SUBTYPES),
    "key_slices", "key_instance_numbers", "key_z_mm", "key_sop_uids",
    "model", "model_version", "tta", "seconds", "report_pdf", "notice",
    "domain_score", "domain_threshold", *(f"unassessed_prob_{label}" for label in LABELS),
    "source",  # a plain image's path relative to the input root (not Hounsfield units); empty for DICOM
)
NOT_ASSESSED = "not_assessed"
SLICE_COLUMNS: tuple[str, ...] = ("study_uid", "slice", "instance_number", "z_mm", "sop_uid",
                                  *(f"prob_{label}" for label in LABELS))
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
IDENTIFIERS = ("patient_id", "accession")


def neutralise(value: str) -> str:
    return "'" + value if value.startswith(FORMULA_START) else value


def cell(value: object) -> str:
    """Text from headers is neutralised; numbers are ours and stay numbers (negative z included)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return neutralise(value)
    if isinstance(value, bool):
        return str(int(value))
    return str(value)


def pseudonym(value: str, key: bytes) -> str:
    """A keyed hash: stable for one key, not reversible without it."""
    if not value:
        return ""
    return "PSN-" + hmac.new(key, value.encode(), hashlib.sha256).hexdigest()[:16]


def notice(result: StudyResult) -> str:
    trained = " UNTRAINED placeholder weights, scores are meaningless;" if not result.model_trained else ""
    source = f" trained on: {result.model_trained_on};" if result.model_trained and result.model_trained_on else ""
    return f"{NOT_FOR_DIAGNOSIS}; model {result.model} {result.model_version};{trained}{source} see model card"


def row(result: StudyResult, pseudonym_key: bytes | None = None) -> dict[str, str]:
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
    assessed = result.status == Status.OK
    for label in LABELS:
        p = result.study_probs.get(label)
        value = None if p is None else round(float(p), 4)
        # Only an ok study has findings. One the model cannot stand behind shows no score where a
        # finding is read (its score, if any, is kept for research in a column of its own), and its
        # flags say not_assessed rather than a blank that reads like "no".
        out[f"prob_{label}"] = value if assessed else None
        out[f"unassessed_prob_{label}"] = None if assessed else value
        out[f"flag_{label}"] = result.flags.get(label) if assessed else NOT_ASSESSED
    out["domain_score"] = None if result.domain_score is None else round(result.domain_score, 3)
    out["domain_threshold"] = None if result.domain_threshold is None else round(result.domain_threshold, 3)
    keys = result.key_slices
    out["key_slices"] = " ".join(str(k.index) for k in keys)
    out["key_instance_numbers"] = " ".join("?" if k.instance_number is None else str(k.instance_number) for k in keys)
    out["key_z_mm"] = " ".join(f"{k.z_mm:.1f}" for k in keys)
    out["key_sop_uids"] = " ".join(k.sop_uid for k in keys)
    out.update(model=result.model, model_version=result.model_version, tta=result.tta,
               seconds=round(result.seconds, 3), report_pdf=result.report_pdf, notice=notice(result),
               source=result.source)
    if pseudonym_key is not None:
        for col in IDENTIFIERS:
            out[col] = pseudonym(str(out[col]), pseudonym_key)
    return {k: cell(out[k]) for k in COLUMNS}


def slice_rows(result: StudyResult) -> list[dict[str, str]]:
    """Per-slice probabilities (after TTA, before smoothing), one row per scored slice."""
    if result.slice_probs is None:
        return []
    rows = []
    for ident, probs in zip(result.slices, result.slice_probs):
        entry: dict[str, object] = {"study_uid": result.study.study_uid, "slice": ident.index,
                                    "instance_number": ident.instance_number, "z_mm": ident.z_mm,
                                    "sop_uid": ident.sop_uid}
        entry.update({f"prob_{label}": round(float(p), 4) for label, p in zip(result.outputs, probs)})
        rows.append({k: cell(entry.get(k)) for k in SLICE_COLUMNS})
    return rows


def write_slices(path: Path, store: ResultsStore) -> None:
    """Every scored slice of every study in the store, written atomically."""
    atomic_write_chunks(Path(path), csv_chunks(SLICE_COLUMNS, store.slice_rows()))
