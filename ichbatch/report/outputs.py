"""All outputs of one study, in a safe order: PDF, JSON and thumbnail, DICOM objects, then the store commit
(which shows the CSV row), then the study's page of the HTML index.

The store commit comes last among the files, so a row never points at a report that was not written;
the key slices are read again and drawn here, where they are used (a run without reports never reads
them again); the PDF is rendered once and used for the file and the DICOM copy. `run` and `watch` both write
through OutputWriter; each file is written atomically. A stream of studies (write_many, write_groups) has
its files written in processes of their own, several studies at once, and committed here in order, the
studies that are ready together in one transaction (commit_many).
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..domain import FileIssue, Status, StudyImages, StudyResult
from ..net.deliver import Deliveries, DeliverySettings
from ..decode import draw_key_images
from ..errors import DecodeError, DiskFullError, OutputError
from .csv_report import COLUMNS, cell, row, slice_rows
from .files import OutputLock, atomic_write_bytes, remove_stale_temp_files
from .html_index import INDEX_SECONDS, HtmlIndex, write_thumbnail
from .json_report import write_json
from .pdf_report import pdf_name, render_pdf
from .store import ResultsStore, StudyEntry
from ..workers import IsolatedPool, WorkerLimits

log = logging.getLogger(__name__)


def default_writers() -> int:
    """A quarter of the cores, at least one: a study's files cost about as much CPU as decoding a few
    of its slices, and the decoders and the model want the rest."""
    return max(1, (os.cpu_count() or 1) // 4)


@dataclass(frozen=True)
class OutputSettings:
    csv: Path
    reports: Path | None = None
    dicom_out: Path | None = None
    pseudonym_key: bytes | None = None
    rebuild_seconds: float = 30.0  # how often a replaced row may rewrite the whole CSV
    index_page_size: int = 250
    index_seconds: float = INDEX_SECONDS  # the HTML index's pages are written at most this often (and at the end)
    delivery: DeliverySettings | None = None  # where the DICOM outputs are sent (needs dicom_out)
    writers: int = field(default_factory=default_writers)  # processes for write_many; 0: on the calling thread

    def __post_init__(self) -> None:
        if self.delivery is not None and self.dicom_out is None:
            raise ValueError("sending results needs DICOM outputs: give dicom_out")

    @property
    def deliveries_db(self) -> Path:
        return Path(self.csv).with_name(Path(self.csv).stem + "_deliveries.sqlite")


class OutputWriter:
    """Writes each study's outputs and commits it to the results store; one per output CSV."""

    def __init__(self, settings: OutputSettings, run_id: str | None = None) -> None:
        self.settings = settings
        self.run_id = run_id or uuid.uuid4().hex[:12]
        self.lock = OutputLock(settings.csv)  # before anything is read or cleaned: one writer at a time
        try:
            self._remove_stale_temp_files()
            self.store = ResultsStore(settings.csv, COLUMNS, settings.rebuild_seconds)
        except BaseException:
            self.lock.release()
            raise
        try:  # renders the index whole where a killed run left it behind
            self.index = HtmlIndex(self.store, settings.csv, settings.index_page_size, settings.index_seconds)
        except BaseException:
            self.store.db.close()  # the store as it is: its CSV views are brought up to date next time
            self.lock.release()
            raise
        self.deliveries = Deliveries(settings.deliveries_db, settings.delivery) if settings.delivery else None
        self._writers: IsolatedPool[FilesJob, StudyFiles] | None = None  # started by the first write_many

    def _remove_stale_temp_files(self) -> None:
        """A killed run or watcher can leave the temp file of an atomic write; the real file is untouched."""
        csv = Path(self.settings.csv)
        remove_stale_temp_files(csv.parent, [csv.name, csv.stem + "_files.csv", csv.stem + ".html"])
        remove_stale_temp_files(csv.with_name(csv.stem + "_pages"), ["page-"])
        remove_stale_temp_files(self.settings.reports, ["study_"])
        remove_stale_temp_files(self.settings.dicom_out, ["study_"])

    def close(self) -> None:
        if self._writers is not None:
            self._writers.close()
        try:
            self.store.flush()
            self.index.ensure()
            self.store.close()
        finally:
            if self.deliveries is not None:
                self.deliveries.close()
            self.lock.release()

    def __enter__(self) -> OutputWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def is_complete(self, study_uid: str, instances_digest: str, model: str) -> bool:
        return self.store.is_complete(study_uid, instances_digest, model)

    def record_file_issue(self, issue: FileIssue) -> None:
        # Paths and messages hold file names and header text: neutralised like every other CSV cell.
        self.store.put_file_issue(cell(issue.path), issue.status.value, cell(issue.message))

    def forget_file_issue(self, path: str) -> None:
        self.store.forget_file_issue(cell(path))

    def write(self, result: StudyResult, images: StudyImages) -> StudyResult:
        """Raises OutputError only when the store or CSV cannot be written; report failures go in the row."""
        return self.commit(write_study_files(result, images, self.settings))

    def write_many(self, studies: Iterable[tuple[StudyResult, StudyImages]]) -> Iterator[StudyResult]:
        """write() for a stream of studies, each yielded once committed, in order."""
        return self.write_groups([study] for study in studies)

    def write_groups(self, groups: Iterable[Sequence[tuple[StudyResult, StudyImages]]]) -> Iterator[StudyResult]:
        """write_many for studies that come in groups (those finished at the same time), each yielded once
        committed, in order. Their files are written in `settings.writers` processes, several studies at
        once: rendering a PDF holds the interpreter lock for tens of ms, which beside a GPU stalls the
        threads that feed the model. A writer process that dies fails its study's reports, with the
        reason, not the run. Studies whose files are written by then are committed together (commit_many);
        without files to write, each group is."""
        settings = self.settings
        if not settings.writers or (settings.reports is None and settings.dicom_out is None):
            for group in groups:  # nothing to write but the rows: no processes for that
                yield from self.commit_many([write_study_files(result, images, settings) for result, images in group])
            return
        if self._writers is None:  # the decoders' limits: a writer reads the key slices' files again
            self._writers = IsolatedPool(write_files_job, files_not_written, settings.writers, WorkerLimits.from_env(),
                                         role=("report writer", "study"))
        jobs = (FilesJob(result, images, settings) for group in groups for result, images in group)
        for ready in self._writers.map_ready(jobs, depth=2 * settings.writers):
            yield from self.commit_many(ready)

    def commit(self, files: StudyFiles) -> StudyResult:
        """A study whose files are written (here or by a Ray task): see commit_many."""
        return self.commit_many([files])[0]

    def commit_many(self, written: Sequence[StudyFiles]) -> list[StudyResult]:
        """Studies whose files are written: queue their DICOM results for sending, then record them in the
        store in one transaction, which shows their CSV rows, then their pages of the index."""
        results = [files.result for files in written]
        if self.deliveries is not None:  # queued before any send: a PACS that is down loses nothing
            queued = [(files.result.study.study_uid, list(files.dicom)) for files in written if files.dicom]
            for study_uid, paths in queued:
                self.deliveries.enqueue(study_uid, paths)
            if queued:
                self.deliver()
        self.index.will_change()
        self.store.put_studies([
            StudyEntry(row(result, self.settings.pseudonym_key), result.instances_digest,
                       f"{result.model} {result.model_version}", tuple(files.outputs), self.run_id,
                       tuple(slice_rows(result)))
            for result, files in zip(results, written)])
        for result in results:
            self.index.update(result.study.study_uid)
        return results

    def flush(self) -> None:
        """Bring the CSV views and the HTML index up to date (an idle watcher; close does it too)."""
        self.store.flush()
        self.index.flush()

    def deliver(self) -> tuple[int, int]:
        """Send the queued DICOM outputs that are due; (sent, not sent). Never raises for the network."""
        if self.deliveries is None:
            return 0, 0
        try:
            return self.deliveries.deliver_due()
        except Exception as exc:  # the queue's own database; the files and the queue stay as they are
            log.error("deliveries not attempted (%s: %s); will retry", type(exc).__name__, exc)
            return 0, 0


@dataclass(frozen=True)
class StudyFiles:
    """What writing one study's files gave: its result (FAILED when a report could not be written), every
    file written, and the DICOM ones among them (to be sent)."""

    result: StudyResult
    outputs: tuple[str, ...]
    dicom: tuple[Path, ...] = ()


@dataclass(frozen=True)
class FilesJob:
    """One study's files to write, in a writer process."""

    result: StudyResult
    images: StudyImages
    settings: OutputSettings


def write_files_job(job: FilesJob) -> StudyFiles:
    """In a writer process, under the workers' memory cap: a study whose files need more than that is
    that study's failure, as a slice too big to decode is, not an error that ends the run."""
    try:
        return write_study_files(job.result, job.images, job.settings)
    except MemoryError:
        log.error("a study's report needed more memory than a report writer may use")
        cap = WorkerLimits.from_env().memory_mb
        return files_not_written(job, f"it needed more memory than a report writer may use ({cap} MB, "
                                      "ICHBATCH_DECODE_MEMORY_MB)")


def files_not_written(job: FilesJob, reason: str) -> StudyFiles:
    """What a study whose writer process died records: failed, and why."""
    return StudyFiles(replace(job.result, status=Status.FAILED, report_pdf="", message=f"report not written: {reason}"), ())


def write_study_files(result: StudyResult, images: StudyImages, settings: OutputSettings) -> StudyFiles:
    """PDF, JSON, thumbnail and DICOM objects of one study: everything but the store, so it can run
    wherever the output folders are seen (the Ray engine runs it in CPU tasks). Its key slices are drawn
    here first, where they are used. Raises DiskFullError."""
    outputs: list[str] = []
    if settings.reports is not None or settings.dicom_out is not None:
        result, images = _drawn(result, images)
    result, pdf = _write_report(result, images, settings, outputs)
    dicom: list[Path] = []
    if settings.dicom_out is not None and result.status in (Status.OK, Status.NOT_ASSESSED) \
            and not result.source:  # a plain image has no DICOM study to join
        result = _write_dicom(result, images, pdf, settings.dicom_out, dicom)
        outputs.extend(str(p) for p in dicom)
    return StudyFiles(result, tuple(outputs), tuple(dicom))


def _drawn(result: StudyResult, images: StudyImages) -> tuple[StudyResult, StudyImages]:
    """The study's key images; a key slice that cannot be read again fails the study, with the reason, as
    a slice that cannot be decoded does (its report then says why)."""
    try:
        return result, draw_key_images(images)
    except DecodeError as exc:
        log.error("a study's key images could not be made")  # the path is in the row, not the log (PHI)
        return replace(result, status=Status.FAILED, message=f"{type(exc).__name__}: {exc}"), StudyImages()


def _write_report(result: StudyResult, images: StudyImages, settings: OutputSettings,
                  outputs: list[str]) -> tuple[StudyResult, bytes | None]:
    """The PDF, rendered once: written to the reports folder and, when asked, wrapped in DICOM."""
    folder = settings.reports
    if folder is None and settings.dicom_out is None:
        return result, None
    if folder is not None:
        result = replace(result, report_pdf=str(Path(folder) / pdf_name(result.study.study_uid)))
    pdf = render_pdf(result, images)
    if folder is None:
        return result, pdf
    try:
        atomic_write_bytes(Path(result.report_pdf), pdf)
        outputs.append(result.report_pdf)
        outputs.append(str(write_json(result, folder, settings.pseudonym_key)))
        thumb = write_thumbnail(result, images, folder)
        if thumb is not None:
            outputs.append(str(thumb))
    except DiskFullError:
        raise  # not the study's fault: the caller waits and retries
    except OutputError as exc:
        return replace(result, status=Status.FAILED, report_pdf="", message=f"report not written: {exc}"), None
    return result, pdf


def _write_dicom(result: StudyResult, images: StudyImages, pdf: bytes | None, folder: Path,
                 written: list[Path]) -> StudyResult:
    from .dicom_out import write_dicom_outputs

    try:
        written.extend(write_dicom_outputs(result, images, pdf, folder))
    except DiskFullError:
        raise
    except (OutputError, OSError, ValueError) as exc:
        return replace(result, status=Status.FAILED, message=f"DICOM outputs not written: {exc}")
    return result
