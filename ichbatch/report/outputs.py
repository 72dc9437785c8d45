"""All outputs of one study, in a safe order: PDF and thumbnail, DICOM objects, then the CSV row.

The CSV row comes last, so a row never points at a report that was not written. `run` and `watch` both
call this; each file is written atomically.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..domain import Status, StudyResult
from ..errors import OutputError
from .csv_report import write_results
from .html_index import write_thumbnail
from .pdf_report import render_pdf, write_pdf


@dataclass(frozen=True)
class OutputSettings:
    csv: Path
    reports: Path | None = None
    dicom_out: Path | None = None
    pseudonym_key: bytes | None = None


def write_study_outputs(result: StudyResult, settings: OutputSettings) -> None:
    """Raises OutputError only when the CSV itself cannot be written; report failures go in the row."""
    if settings.reports is not None:
        try:
            result.report_pdf = str(write_pdf(result, settings.reports))
            write_thumbnail(result, settings.reports)
        except OutputError as exc:
            result.status, result.message = Status.FAILED, f"report not written: {exc}"
    if settings.dicom_out is not None and result.status == Status.OK:
        from .dicom_out import write_dicom_outputs

        try:
            write_dicom_outputs(result, render_pdf(result), settings.dicom_out)
        except (OutputError, OSError, ValueError) as exc:
            result.status, result.message = Status.FAILED, f"DICOM outputs not written: {exc}"
    write_results(settings.csv, [result], settings.pseudonym_key)
