"""Command line: parse, call the library, print. Library errors become clear messages here.

Exit codes: 0 every study ok or skipped; 1 some study failed; 2 usage error (bad option, unknown model);
3 a fatal error that stopped the run (outputs could not be written); 4 nothing to do (no study found).
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from . import NOT_FOR_DIAGNOSIS, __version__
from .config import PHANTOM_KINDS
from .errors import BundleError, ClusterError, IchBatchError, OutputError, OutputLockedError

if TYPE_CHECKING:
    from .net.scp import StorageSCP
    from .study import RunSettings
    from .watch.watcher import WatchSettings
    from .net.deliver import DeliverySettings

EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, EXIT_FATAL, EXIT_NOTHING = 0, 1, 2, 3, 4
CONTEXT = {"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "ICHBATCH"}


def _fatal(message: str, code: int) -> click.ClickException:
    """A ClickException whose exit code is `code` (click keeps the code on the class)."""
    kind = type(f"Exit{code}", (click.ClickException,), {"exit_code": code})
    return kind(message)


def _log_setting(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """Logging options work before and after the subcommand; each one seen reconfigures logging."""
    from .logs import configure

    state = ctx.find_root().meta.setdefault("ichbatch.log", {"verbose": 0, "log_file": None, "log_format": "text"})
    if param.name == "verbose":
        state["verbose"] = max(state["verbose"], value or 0)
    elif value is not None:
        state[str(param.name)] = value
    configure(state["verbose"], state["log_file"], state["log_format"])
    return value


def _logging_options() -> list[click.Option]:
    return [
        click.Option(["-v", "--verbose"], count=True, expose_value=False, callback=_log_setting,
                     help="-v: log each stage; -vv: debug, and the libraries' own messages. No patient identifiers."),
        click.Option(["--log-file"], type=click.Path(dir_okay=False, path_type=Path), expose_value=False,
                     callback=_log_setting, help="Also write the log to this file."),
        click.Option(["--log-format"], type=click.Choice(["text", "json"]), expose_value=False,
                     callback=_log_setting, help="text (ISO time, level, message) or json (one object a line) [default: text]."),
    ]


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, prog_name="ichbatch")
def main() -> None:
    """Flag intracranial hemorrhage on head CT DICOM, in batch. RESEARCH USE ONLY, NOT FOR DIAGNOSIS.

    \b
    Examples:
      ichbatch demo --out demo-output
      ichbatch run /data/studies --out results.csv
      ichbatch synth phantoms --studies 10 --seed 1
    """


def default_model() -> str:
    from .model.locate import default_model as located

    return located()


@dataclass(frozen=True)
class StudyOptions:
    """The options of the study path, the same for `run` and `watch`."""

    model: str | None = None
    tta: int | None = None
    batch_size: int = 16
    device: str = "auto"
    precision: str = "auto"
    runtime: str | None = None
    aggregate: str = "max"
    topk: int = 3
    min_slices: int = 8
    pseudonymize: bool = False
    dicom_out: Path | None = None
    send_to: tuple[str, ...] = ()
    stow_url: tuple[str, ...] = ()
    calling_aet: str = "ICHBATCH"

    def delivery(self) -> DeliverySettings | None:
        """Where results are sent, checked (a usage error names the bad value)."""
        from .net.deliver import DeliverySettings, Destination

        try:
            destinations = tuple(Destination.dimse(t) for t in self.send_to) + tuple(Destination.stow(u) for u in self.stow_url)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--send-to/--stow-url") from exc
        if not 0 < len(self.calling_aet.strip()) <= 16:
            raise click.BadParameter("an AE title has 1 to 16 characters", param_hint="--calling-aet")
        return DeliverySettings(destinations, calling_aet=self.calling_aet.strip()) if destinations else None

    def run_settings(self) -> RunSettings:
        from .config import DEFAULT_RULES
        from .study import RunSettings

        settings = RunSettings(model=self.model or default_model(), tta=self.tta, batch_size=self.batch_size,
                               device=self.device, precision=self.precision, aggregate=self.aggregate,
                               topk=self.topk, rules=replace(DEFAULT_RULES, min_slices=self.min_slices))
        return replace(settings, runtime=self.runtime) if self.runtime else settings

    def check(self) -> None:
        """Everything that can be checked before discovery and before the Keras backend loads."""
        from .model.bundle import read_card, resolve

        try:
            read_card(resolve(self.model or default_model()))
        except BundleError as exc:
            raise click.BadParameter(str(exc), param_hint="--model") from exc
        if self.runtime == "onnx":
            import importlib.util

            if importlib.util.find_spec("tf2onnx") is None:
                raise click.BadParameter("running a Keras bundle in onnxruntime exports it first, which needs "
                                         "tf2onnx: pip install 'ichbatch[onnx]'", param_hint="--runtime")
        if self.pseudonymize:
            _pseudonym_key()
        if self.device == "gpu":
            from .infer import default_device

            if default_device() != "gpu":
                raise click.UsageError("--device gpu was asked for, but the Keras backend sees no GPU")

    def pseudonym_key(self) -> bytes | None:
        return _pseudonym_key() if self.pseudonymize else None


STUDY_OPTIONS = (
    click.option("--model", default=None, help="Bundle name or folder [default: the demo model, else the untrained stand-in]."),
    click.option("--tta", type=click.IntRange(1, 8), default=None, help="Test-time augmentation views per slice [default: 2 on CPU, 8 on GPU]."),
    click.option("--batch-size", type=click.IntRange(1, 4096), default=16, show_default=True, help="Slices per model call."),
    click.option("--device", type=click.Choice(["auto", "cpu", "gpu"]), default="auto", show_default=True),
    click.option("--precision", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto", show_default=True, help="Compute dtype; auto is bfloat16 on a GPU, float32 on a CPU (there heat maps in bfloat16 where the CPU computes it natively)."),
    click.option("--runtime", type=click.Choice(["auto", "keras", "onnx"]), default=None,
                 help="Who runs a Keras bundle's network: onnx is onnxruntime, from an export made once and cached "
                      "(1.3x faster on a CPU; needs ichbatch[onnx]). [default: $ICHBATCH_RUNTIME, else auto: onnx on "
                      "a CPU when tf2onnx is installed, else keras]. ONNX bundles always run in onnxruntime."),
    click.option("--aggregate", "aggregate", type=click.Choice(["max", "topk"]), default="max", show_default=True, help="Slice-to-study rule (README: Aggregation)."),
    click.option("--topk", type=click.IntRange(1, 100), default=3, show_default=True, help="k for --aggregate topk."),
    click.option("--min-slices", type=click.IntRange(1, 10000), default=8, show_default=True, help="Fewest axial slices a usable series has."),
    click.option("--pseudonymize", is_flag=True, help="Replace patient ID and accession in the CSV by a keyed hash (key from ICHBATCH_PSEUDONYM_KEY)."),
    click.option("--dicom-out", type=click.Path(file_okay=False, path_type=Path), help="Also write DICOM results in the original study: TID 1500 SR, key-object selection, key images (Secondary Capture) and the report (Encapsulated PDF) [default with --send-to/--stow-url: dicom/ beside the results]."),
    click.option("--send-to", multiple=True, metavar="AET@HOST:PORT", help="Send the DICOM results by C-STORE (repeatable); kept and resent later when the PACS is down (README: Sending results)."),
    click.option("--stow-url", multiple=True, metavar="URL", help="Send the DICOM results by DICOMweb STOW-RS to this service root (repeatable)."),
    click.option("--calling-aet", default="ICHBATCH", show_default=True, help="Our AE title when sending."),
)


def study_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add the study-path options; the command receives them as one StudyOptions argument `study`."""
    names = [f.name for f in fields(StudyOptions)]

    @functools.wraps(fn)
    def wrapper(**kwargs: Any) -> Any:
        study = StudyOptions(**{n: kwargs.pop(n) for n in names})
        return fn(study=study, **kwargs)

    for option in reversed(STUDY_OPTIONS):
        wrapper = option(wrapper)
    return wrapper


@main.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Results CSV; its store (<name>.ichbatch.sqlite) sits beside it. Rows for studies already in it are replaced.")
@click.option("--reports", type=click.Path(file_okay=False, path_type=Path), help="Folder for the PDF reports [default: 'reports' beside the CSV].")
@click.option("--no-reports", is_flag=True, help="Write the CSV only.")
@click.option("--report-writers", type=click.IntRange(0, 256), default=None,
              help="Processes that write each study's PDF, JSON and DICOM files while the model goes on; 0: the "
                   "run's own thread writes them [default: a quarter of the cores, at least 1; the local engine only].")
@click.option("--resume", is_flag=True, help="Skip studies whose result is already complete in the store (same study, same instances, same model).")
@click.option("--slices", "slices_csv", type=click.Path(dir_okay=False, path_type=Path), help="Also write per-slice probabilities of every study in the store to this CSV.")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="ray: decoding in Ray tasks and one model per GPU (or per two CPUs) in actors, across a cluster "
                   "(needs ichbatch[ray]; README: Running on a Ray cluster).")
@click.option("--address", default=None, metavar="ADDR",
              help="With --engine ray: the cluster to join (auto, HOST:PORT or ray://HOST:PORT) [default: start a "
                   "one-machine cluster bound to 127.0.0.1 for this run].")
@click.option("--studies-per-call", type=click.IntRange(1, 256), default=None, metavar="N",
              help="With --engine ray: studies a model replica scores in one call, their slices sharing the model's "
                   "batches and their heat maps made together; a replica lost mid-call redoes the group [default: 8 "
                   "with GPUs, 4 without].")
@study_options
def run(inputs: tuple[Path, ...], out: Path, reports: Path | None, no_reports: bool, report_writers: int | None,
        resume: bool, slices_csv: Path | None, engine: str, address: str | None, studies_per_call: int | None,
        study: StudyOptions) -> None:
    """Process every study found under INPUTS (folders or files, nested, any file names).

    \b
    Examples:
      ichbatch run /data/export --out results.csv
      ichbatch run a/ b/ --out results.csv --reports pdfs --tta 4 --slices slices.csv
      ichbatch run /archive --out results.csv --resume      # after a crash or Ctrl-C: only what is left
      ichbatch run /shared/archive --out /shared/results.csv --engine ray --address auto
    """
    if address and engine != "ray":
        raise click.BadParameter("is for --engine ray", param_hint="--address")
    if studies_per_call is not None and engine != "ray":
        raise click.BadParameter("is for --engine ray; the local engine groups the studies that queue",
                                 param_hint="--studies-per-call")
    if report_writers is not None and engine == "ray":
        raise click.BadParameter("is for the local engine; on Ray, CPU tasks write the reports",
                                 param_hint="--report-writers")
    folder = None if no_reports else (reports or out.parent / "reports")
    sys.exit(_run(list(inputs), out, folder, study, slices_csv=slices_csv, resume=resume,
                  cluster=_cluster(address, studies_per_call) if engine == "ray" else None, writers=report_writers))


def _cluster(address: str | None, group: int | None) -> Any:
    import importlib.util

    from .distributed import RaySettings

    if importlib.util.find_spec("ray") is None:
        raise click.BadParameter("needs Ray: pip install 'ichbatch[ray]'", param_hint="--engine ray")
    return RaySettings(address=address, group=group or 0)


def _run(inputs: list[Path], out: Path, reports: Path | None, study: StudyOptions, *,
         slices_csv: Path | None = None, resume: bool = False, cluster: Any = None, writers: int | None = None) -> int:
    from .domain import Status
    from .errors import ExistingFileError
    from .pipeline import process_folder
    from .progress import TerminalProgress
    from .report.csv_report import write_slices
    from .report.outputs import OutputSettings, OutputWriter
    from .report.store import files_csv_path

    study.check()
    _check_writable(out.parent)
    if reports is not None and reports.exists() and not reports.is_dir():
        raise click.BadParameter(f"{reports} is a file; the reports go in a folder", param_hint="--reports")
    delivery = study.delivery()
    dicom_out = study.dicom_out or (out.parent / "dicom" if delivery else None)
    outputs = OutputSettings(csv=out, reports=reports, dicom_out=dicom_out, pseudonym_key=study.pseudonym_key(),
                             delivery=delivery)
    if writers is not None:
        outputs = replace(outputs, writers=writers)
    try:
        writer = OutputWriter(outputs)
    except (ExistingFileError, OutputLockedError) as exc:
        raise click.UsageError(str(exc)) from exc
    except OutputError as exc:
        raise _fatal(str(exc), EXIT_FATAL) from exc
    progress = TerminalProgress()
    try:
        with progress, writer:
            if cluster is None:
                summary = process_folder(inputs, study.run_settings(), sink=writer, progress=progress.update,
                                         resume=writer if resume else None)
            else:
                from .distributed import process_folder_ray

                summary = process_folder_ray(inputs, study.run_settings(), cluster, sink=writer,
                                             progress=progress.update, resume=writer if resume else None)
            if slices_csv:
                write_slices(slices_csv, writer.store)
            issues = writer.store.file_issue_count()
            writer.deliver()  # a last try for what a PACS refused during the run
            undelivered = writer.deliveries.pending() if writer.deliveries else 0
    except BundleError as exc:
        raise _fatal(f"model: {exc}", EXIT_USAGE) from exc
    except OutputError as exc:
        raise _fatal(f"{exc} (results written so far are intact; rerun with --resume)", EXIT_FATAL) from exc
    except ClusterError as exc:
        raise _fatal(f"{exc} (results written so far are intact; rerun with --resume)", EXIT_FATAL) from exc
    if summary.studies == 0 and summary.resumed == 0:
        click.echo(f"nothing to do: no DICOM study found under {', '.join(map(str, inputs))} ({issues} other file(s), "
                   f"see {files_csv_path(out).name}); {out} has the header only. {NOT_FOR_DIAGNOSIS}.", err=True)
        return EXIT_NOTHING
    ok, unassessed, skipped, failed = (summary.count(s) for s in Status)
    resumed = f"{summary.resumed} already complete (--resume); " if resume else ""
    click.echo(
        f"{summary.studies} studies: {ok} ok, {unassessed} not assessed (outside the model's domain), "
        f"{skipped} skipped, {failed} failed; {resumed}"
        f"{issues} file(s) not used (see {files_csv_path(out).name}); "
        f"{summary.n_slices} slices in {summary.seconds:.1f} s ({summary.slices_per_second:.1f} slices/s). "
        f"Results: {out}. {NOT_FOR_DIAGNOSIS}.",
        err=True,
    )
    if undelivered:
        click.echo(f"{undelivered} DICOM result(s) not yet delivered: kept in {outputs.dicom_out} and queued; the next "
                   f"run, watch or 'ichbatch status {out.parent} --retry' sends them.", err=True)
    return EXIT_PARTIAL if failed or undelivered else EXIT_OK


def _pseudonym_key() -> bytes:
    key = os.environ.get("ICHBATCH_PSEUDONYM_KEY", "")
    if len(key) < 16:
        raise click.UsageError("--pseudonymize needs a secret of at least 16 characters in ICHBATCH_PSEUDONYM_KEY")
    return key.encode()


def _check_writable(folder: Path) -> None:
    folder = folder if str(folder) else Path(".")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _fatal(f"cannot create output folder {folder}: {exc.strerror}", EXIT_FATAL) from exc
    if not os.access(folder, os.W_OK):
        raise _fatal(f"output folder {folder} is not writable", EXIT_FATAL)


@main.command()
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--studies", type=click.IntRange(1, 10000), default=4, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--slices", "n_slices", type=click.IntRange(8, 400), default=24, show_default=True)
@click.option("--size", type=click.IntRange(64, 1024), default=256, show_default=True, help="Rows and columns.")
@click.option("--phantoms", type=click.Choice(PHANTOM_KINDS), default="anatomy", show_default=True,
              help="anatomy: the MNI template brain with skull, skull base, face and lesions placed by anatomy (what "
                   "the demo model is trained on; README: Phantoms); anatomy-v2: the same heads with the scanner's "
                   "blur tail and bone glare and the deep veins; anatomy-v3: those with the skull's partial volume across the "
                   "slice as a continuum; ellipse: quick geometric heads, for tests.")
def synth(out: Path, studies: int, seed: int, n_slices: int, size: int, phantoms: str) -> None:
    """Write generated head-CT phantom studies (DICOM) and a manifest.json of their truth.

    \b
    Example:
      ichbatch synth phantoms --studies 10 --seed 1
    """
    from .progress import TerminalProgress
    from .synth import synth_studies

    with TerminalProgress() as progress:
        manifest = synth_studies(out, studies, seed=seed, n_slices=n_slices, size=size, progress=progress.update,
                                 phantoms=phantoms)
    positives = sum(s["labels"]["any"] for s in manifest["studies"])
    click.echo(f"wrote {studies} phantom studies ({positives} with hemorrhage) to {out}; truth in {out / 'manifest.json'}")


@main.command()
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), default=Path("demo-output"), show_default=True)
@click.option("--studies", type=click.IntRange(1, 100), default=4, show_default=True)
@click.option("--model", default=None, help="Bundle name or folder [default: the shipped demo model].")
@click.option("--phantoms", type=click.Choice(PHANTOM_KINDS), default="anatomy", show_default=True,
              help="Which generator makes the studies (see `ichbatch synth`).")
def demo(out: Path, studies: int, model: str | None, phantoms: str) -> None:
    """Generate phantom studies in OUT/studies and run the pipeline on them with the shipped model.

    \b
    Example:
      ichbatch demo --out demo-output
    """
    from .synth import synth_studies

    options = StudyOptions(model=model)
    options.check()
    synth_studies(out / "studies", studies, seed=2026, phantoms=phantoms)
    for truth in ("manifest.json", "lesion_masks.npz"):  # beside the studies, so the run does not list them as unused
        os.replace(out / "studies" / truth, out / truth)
    click.echo(f"generated {studies} phantom studies in {out / 'studies'} (truth: {out / 'manifest.json'})", err=True)
    code = _run([out / "studies"], out / "results.csv", out / "reports", options)
    click.echo(f"CSV: {out / 'results.csv'}  PDF reports: {out / 'reports'}", err=True)
    sys.exit(code)


WATCH_OPTIONS = (
    click.option("--quiet-seconds", type=click.FloatRange(0), default=30.0, show_default=True, help="A study is ready when no file of it changed for this long."),
    click.option("--rescan-seconds", type=click.FloatRange(0.1), default=10.0, show_default=True, help="Full rescan interval (catches missed events)."),
    click.option("--max-attempts", type=click.IntRange(1, 100), default=3, show_default=True, help="Attempts before a study is marked failed."),
    click.option("--after", type=click.Choice(["leave", "move", "delete"]), default="leave", show_default=True, help="What to do with a study's input files once its outputs are written."),
    click.option("--archive", type=click.Path(file_okay=False, path_type=Path), help="Where --after move puts input files."),
    click.option("--settle-seconds", type=click.FloatRange(0), default=300.0, show_default=True, help="With --after move/delete: how long a processed study's files stay, so that late slices join it; then its result is final."),
    click.option("--log-uids", is_flag=True, help="Name studies by StudyInstanceUID in the log (default: a short hash, no identifiers)."),
)


def watch_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(WATCH_OPTIONS):
        fn = option(fn)
    return fn


@main.command()
@click.argument("incoming", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder for results.csv, results.html, reports/ and the ledger.")
@click.option("--poll", is_flag=True, help="Poll the folder instead of using file events (network shares).")
@watch_options
@study_options
def watch(incoming: Path, out: Path, poll: bool, study: StudyOptions, **options: Any) -> None:
    """Process each study that arrives in INCOMING exactly once, through restarts. Stop with Ctrl-C or SIGTERM.

    \b
    Examples:
      ichbatch watch /pacs/export --out /results
      ichbatch watch /mnt/share --out /results --poll --quiet-seconds 120 --after move --archive /done
    """
    settings = _watch_settings(incoming, out, study, poll=poll, **options)
    _serve(settings, study, f"watching {incoming} (quiet period {settings.quiet_seconds:g} s)")


@main.command()
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder for results, the ledger and the spool of received files.")
@click.option("--port", type=click.IntRange(1, 65535), default=11112, show_default=True)
@click.option("--aet", default="ICHBATCH", show_default=True, help="Our AE title (the called AE title senders must use).")
@click.option("--bind", default="127.0.0.1", show_default=True, help="Address to listen on; 0.0.0.0 for every interface.")
@click.option("--allow", multiple=True, metavar="AET", help="Calling AE titles allowed to send (repeatable or comma-separated); others are rejected at association [default: any].")
@click.option("--spool", type=click.Path(file_okay=False, path_type=Path), help="Where received instances are kept until processed [default: OUT/spool].")
@click.option("--network-timeout", type=click.FloatRange(1, 3600), default=30.0, show_default=True, help="ACSE, DIMSE and idle-connection timeout in seconds.")
@watch_options
@study_options
def listen(out: Path, port: int, aet: str, bind: str, allow: tuple[str, ...], spool: Path | None, network_timeout: float,
           study: StudyOptions, **options: Any) -> None:
    """Receive studies over DICOM (C-STORE of CT and Enhanced CT; C-ECHO) and process each once it is complete,
    as watch does, through restarts. Stop with Ctrl-C or SIGTERM.

    \b
    Examples:
      ichbatch listen --out /results --port 11112 --aet ICHBATCH --allow PACS --bind 0.0.0.0
      ichbatch listen --out /results --allow PACS --send-to PACS@pacs.example.org:104
    """
    from .net.scp import ListenSettings, StorageSCP, allowed_list

    spool = spool or out / "spool"
    try:
        listen_settings = ListenSettings(spool=spool, port=port, ae_title=aet, bind=bind, allowed=allowed_list(allow),
                                         timeout_seconds=network_timeout)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    spool.mkdir(parents=True, exist_ok=True)
    settings = _watch_settings(spool, out, study, poll=False, **options)
    scp = StorageSCP(listen_settings)
    _serve(settings, study, f"listening as {aet} on {bind}:{port}", scp)


def _watch_settings(incoming: Path, out: Path, study: StudyOptions, *, poll: bool, quiet_seconds: float,
                    rescan_seconds: float, max_attempts: int, after: str, archive: Path | None, settle_seconds: float,
                    log_uids: bool) -> WatchSettings:
    from .watch.watcher import WatchSettings

    try:  # WatchSettings checks its own values (--after move without --archive, ranges)
        return WatchSettings(incoming=incoming, out=out, run=study.run_settings(), quiet_seconds=quiet_seconds,
                             rescan_seconds=rescan_seconds, poll=poll, max_attempts=max_attempts, after=after,
                             archive=archive, settle_seconds=settle_seconds, dicom_out=study.dicom_out, log_uids=log_uids,
                             pseudonym_key=study.pseudonym_key(), delivery=study.delivery())
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc


def _serve(settings: WatchSettings, study: StudyOptions, what: str, scp: StorageSCP | None = None) -> None:
    """Run the watcher (and the SCP feeding it) until SIGINT/SIGTERM."""
    from .errors import ExistingFileError
    from .watch.watcher import Watcher

    study.check()
    _check_writable(settings.out)
    if logging.getLogger("ichbatch").getEffectiveLevel() > logging.INFO:
        logging.getLogger("ichbatch").setLevel(logging.INFO)  # a server's log: one line per study
    try:
        watcher = Watcher(settings)
    except BundleError as exc:
        raise _fatal(f"model: {exc}", EXIT_USAGE) from exc
    except (ExistingFileError, OutputLockedError) as exc:
        raise click.UsageError(str(exc)) from exc
    if scp is not None:
        try:
            scp.start()
        except OSError as exc:
            watcher.close()
            raise _fatal(f"cannot listen on {scp.settings.bind}:{scp.settings.port}: {exc.strerror or exc}", EXIT_FATAL) from exc
    click.echo(f"{what}; results in {settings.out}. {NOT_FOR_DIAGNOSIS}.", err=True)
    try:
        watcher.run()
    finally:
        if scp is not None:
            scp.stop()  # received files stay in the spool; the ledger picks them up on the next start
    click.echo("stopped; state is kept in the ledger", err=True)


@main.command()
@click.argument("out", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--last", type=click.IntRange(1, 1000), default=10, show_default=True, help="How many recent studies to list.")
@click.option("--uids", is_flag=True, help="Show StudyInstanceUIDs instead of short hashes.")
@click.option("--retry", is_flag=True, help="Send the undelivered DICOM results now (failed ones too).")
def status(out: Path, last: int, uids: bool, retry: bool) -> None:
    """Print a results folder's state: the watch ledger (counts by status, the last studies, failures with
    reasons) and the deliveries to the PACS (sent, pending and failed, with the last error).

    \b
    Examples:
      ichbatch status /results
      ichbatch status /results --retry
    """
    from .watch.ledger import FAILED, Ledger
    from .watch.watcher import LEDGER_NAME, study_tag

    queues = sorted(out.glob("*_deliveries.sqlite"))
    if not (out / LEDGER_NAME).exists() and not queues:
        raise click.UsageError(f"{out} has neither a {LEDGER_NAME} nor deliveries; is it the --out folder of "
                               "'ichbatch watch' or 'listen', or the folder of a run's results CSV?")
    if (out / LEDGER_NAME).exists():
        ledger = Ledger(out / LEDGER_NAME)
        counts = ledger.counts()
        click.echo("studies: " + (", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "none"))
        click.echo(f"last {last}:")
        for row in ledger.studies(limit=last):
            click.echo(f"  {study_tag(row.study_uid, uids)}  {row.status.value:10}  v{row.version}  attempts {row.attempts}")
        failures = ledger.studies(FAILED, limit=1000)
        if failures:
            click.echo("failures:")
            for row in failures:
                click.echo(f"  {study_tag(row.study_uid, uids)}  {row.message}")
        ledger.close()
    for db in queues:
        _delivery_status(db, retry, uids)


def _delivery_status(db: Path, retry: bool, uids: bool) -> None:
    from .net.deliver import Deliveries, DeliverySettings, Destination
    from .watch.watcher import study_tag

    probe = Deliveries(db, DeliverySettings(()))
    labels = sorted({d for d, _ in probe.counts()})
    if retry:  # the destinations are those the queue names
        probe.close()
        probe = Deliveries(db, DeliverySettings(tuple(Destination.from_label(d) for d in labels)))
        probe.retry_now()
        sent, unsent = probe.deliver_due()
        click.echo(f"retried: {sent} sent, {unsent} not sent")
    counts = probe.counts()
    click.echo(f"deliveries ({db.name}):")
    for label in labels:
        states = ", ".join(f"{counts.get((label, s), 0)} {s}" for s in ("sent", "pending", "failed"))
        click.echo(f"  {label}: {states}")
    for label, state, study_uid, path, attempts, error in probe.unsent(limit=50):
        kind = Path(path).stem.rsplit("_", 1)[-1]  # sr, kos, report, key1...
        click.echo(f"  {state:7}  {label}  {study_tag(study_uid, uids)} {kind}  attempts {attempts}  {error}")
    probe.close()


@main.command()
@click.option("--source", type=click.Choice(["phantoms", "rsna", "folder"]), required=True, help="phantoms: generated; rsna: stage_2_train.csv + ID_*.dcm; folder: hemorrhage/ and normal/ images.")
@click.option("--data", type=click.Path(exists=True, file_okay=False, path_type=Path), help="Folder of .dcm files (rsna) or of class folders (folder).")
@click.option("--labels", "labels_csv", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="RSNA stage_2_train.csv (rsna).")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Bundle folder to write (e.g. models/my-model).")
@click.option("--name", default=None, help="Bundle name [default: the --out folder's name].")
@click.option("--version", "version", default="1.0.0", show_default=True, help="Bundle version for the card.")
@click.option("--input-size", type=click.IntRange(32, 1024), default=224, show_default=True)
@click.option("--epochs", type=click.IntRange(1, 1000), default=30, show_default=True)
@click.option("--batch-size", type=click.IntRange(1, 1024), default=32, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-4, show_default=True, help="Learning rate (5e-4 also works well from scratch).")
@click.option("--init", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Start from these weights (weights.npz or .weights.h5): two-stage fine-tuning.")
@click.option("--init-schedule", type=click.Choice(["transfer", "continue"]), default="transfer", show_default=True,
              help="With --init: transfer = head for 5 epochs at 1e-3, then conv5 at 1e-4; continue = every layer at --lr (to train a bundle of ours further).")
@click.option("--vertical-flip/--no-vertical-flip", default=False, show_default=True,
              help="Also flip images vertically when augmenting (not in the recipe: real heads are not upside down).")
@click.option("--val-fraction", type=click.FloatRange(0.05, 0.5), default=0.2, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--phantom-studies", type=click.IntRange(2, 100000), default=200, show_default=True)
@click.option("--phantom-slices", type=click.IntRange(8, 400), default=24, show_default=True)
@click.option("--phantoms", type=click.Choice(PHANTOM_KINDS), default="anatomy", show_default=True,
              help="--source phantoms: which generator (README: Phantoms); anatomy is what the demo model is "
                   "trained on, ellipse is quick and for tests.")
@click.option("--screenshots", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="--source phantoms: this share of slices is seen as screenshots (unknown window, 8 bit, JPEG, "
                   "text, crops, borders); a model trained so accepts plain images (its card says so).")
@click.option("--workers", type=click.IntRange(0, 256), default=0, show_default=True,
              help="Worker processes that decode (--source rsna) or generate (--source phantoms) studies "
                   "(0: one per core, at most 8).")
@click.option("--cache", type=click.Path(file_okay=False, path_type=Path),
              help="--source rsna: keep the decoded slices here (size x size x 3 bytes each) so later epochs and "
                   "later trainings read them instead of decoding.")
@click.option("--checkpoints", type=click.Path(file_okay=False, path_type=Path),
              help="Training state after every epoch; the same command run again resumes there [default: "
                   "OUT.checkpoints beside the bundle; removed once the bundle is written].")
@click.option("--max-minutes", type=click.FloatRange(min=0, min_open=True),
              help="Stop fitting at the end of the last epoch that fits in this many minutes (generating or "
                   "loading the data not counted; an epoch that alone would overrun is cut where the time runs "
                   "out); the best epoch's weights are kept and the bundle is written.")
def train(source: str, data: Path | None, labels_csv: Path | None, out: Path, name: str | None, version: str, input_size: int,
          epochs: int, batch_size: int, lr: float, init: Path | None, init_schedule: str, vertical_flip: bool,
          val_fraction: float, seed: int, phantom_studies: int, phantom_slices: int, phantoms: str,
          screenshots: float, workers: int, cache: Path | None, checkpoints: Path | None,
          max_minutes: float | None) -> None:
    """Train the ResNet50 bundle and write it with its card, training curves and validation metrics.

    \b
    Examples:
      ichbatch train --source phantoms --out models/my-phantom-model --epochs 10
      ichbatch train --source rsna --data rsna/stage_2_train --labels rsna/stage_2_train.csv --out models/rsna \\
          --cache /scratch/rsna-cache          # stops? the same command resumes from the last epoch
      ichbatch train --source folder --data images/ --out models/binary --init models/x/weights.npz
    """
    from .train import TrainSettings, load_data
    from .train import train as run_training

    settings = TrainSettings(source=source, out=out, name=name or out.name, version=version, data=data, labels_csv=labels_csv,
                             input_size=input_size, epochs=epochs, batch_size=batch_size, lr=lr, init=init,
                             val_fraction=val_fraction, seed=seed, phantom_studies=phantom_studies,
                             phantom_slices=phantom_slices, init_schedule=init_schedule, vertical_flip=vertical_flip,
                             workers=workers, cache=cache, checkpoints=checkpoints, phantoms=phantoms,
                             screenshots=screenshots, command=_command_line(), started=time.time(),
                             max_minutes=max_minutes)
    from .progress import TerminalProgress

    stage = {"phantoms": "generating phantoms", "rsna": "reading the index (headers)"}.get(source, "reading images")
    try:
        with TerminalProgress() as progress:
            loaded = load_data(settings, lambda done, total: progress.update(stage, done, total))
        run_training(settings, loaded, echo=lambda m: click.echo(m, err=True))
    except IchBatchError as exc:
        raise _fatal(str(exc), EXIT_USAGE) from exc


def _command_line() -> str:
    """The current command with the options given on its line or in the environment (for a card's record
    of how a bundle was made); logging options left out."""
    import shlex

    from click.core import ParameterSource

    ctx = click.get_current_context()
    words = ["ichbatch", ctx.info_name or ""]
    for param in ctx.command.params:
        if not isinstance(param, click.Option) or not param.name or param.name in ("verbose", "log_file", "log_format"):
            continue
        if ctx.get_parameter_source(param.name) not in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT):
            continue
        value = ctx.params[param.name]
        if param.is_flag:
            words.append(param.opts[0] if value else (param.secondary_opts or [""])[0])
        else:
            words += [param.opts[0], str(value)]
    return shlex.join(w for w in words if w)


@main.command()
@click.argument("predictions", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--labels", "labels", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Wide CSV, RSNA stage_2_train.csv, or a synth manifest.json.")
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), default=Path("evaluation"), show_default=True)
@click.option("--model", default=None, help="Take decision thresholds from this bundle's card [default: 0.5].")
@click.option("--target-sensitivity", type=click.FloatRange(0.01, 1.0), default=0.95, show_default=True)
def evaluate(predictions: Path, labels: Path, out: Path, model: str | None, target_sensitivity: float) -> None:
    """Score predictions (a --slices CSV or a results CSV) against labels; writes metrics.json and plots.

    \b
    Example:
      ichbatch synth holdout --studies 50 --seed 777
      ichbatch run holdout --out holdout.csv --slices holdout_slices.csv --no-reports
      ichbatch evaluate holdout_slices.csv --labels holdout/manifest.json --out evaluation
    """
    import json

    from .evaluate import evaluate_files, plot
    from .report.files import atomic_write_bytes

    thresholds = None
    if model:
        from .model.bundle import read_card, resolve

        try:
            thresholds = read_card(resolve(model)).thresholds
        except BundleError as exc:
            raise click.BadParameter(str(exc), param_hint="--model") from exc
    try:
        result = evaluate_files(predictions, labels, thresholds, target_sensitivity)
    except IchBatchError as exc:
        raise _fatal(str(exc), EXIT_USAGE) from exc
    except (ValueError, KeyError, UnicodeDecodeError) as exc:  # a file that is not what it claims to be
        raise _fatal(f"cannot evaluate {predictions.name} against {labels.name}: {type(exc).__name__}: {exc}",
                     EXIT_USAGE) from exc
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "metrics.json", json.dumps(result, indent=1).encode())
    plot(result, out)
    for level in ("slice", "study"):
        if level in result:
            click.echo(f"{level} level (n={result[level]['n']}):")
            for name, m in result[level]["labels"].items():
                at = m["at_card_threshold"]
                click.echo(f"  {name:17s} AUC {_with_ci(m['auc'], m['auc_ci95'])}  PR AUC {_with_ci(m['pr_auc'], m['pr_auc_ci95'])}"
                           f"  sens {_with_ci(at['sensitivity'], at['sensitivity_ci95'])}"
                           f"  spec {_with_ci(at['specificity'], at['specificity_ci95'])} at {at['threshold']:g}")
    click.echo(f"({result['method']})")
    click.echo(f"metrics: {out / 'metrics.json'}; plots: {out}")


def _with_ci(value: float | None, ci: list[float] | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}" + (f" ({ci[0]:.3f}-{ci[1]:.3f})" if ci else "")


@main.group()
def models() -> None:
    """Model bundles: list, show, import, export, fit-domain, calibrate."""


@models.command("list")
def models_list() -> None:
    """List the installed bundles (ICHBATCH_MODELS, the checkout's models/, ./models)."""
    from .model.bundle import list_bundles, read_card

    rows = list_bundles()
    if not rows:
        click.echo("no model bundles found")
    for name, path in rows:
        try:
            card = read_card(path)
            click.echo(f"{name}\t{card.version}\t{card.architecture}\t{'trained' if card.trained else 'UNTRAINED'}\t{path}")
        except BundleError as exc:
            click.echo(f"{name}\tINVALID\t{exc}")


@models.command("show")
@click.argument("name")
def models_show(name: str) -> None:
    """Print a bundle's card."""
    import json

    from .model.bundle import read_card, resolve

    try:
        card = read_card(resolve(name))
    except BundleError as exc:
        raise _fatal(str(exc), EXIT_USAGE) from exc
    click.echo(json.dumps(card.to_json(), indent=2))


@models.command("import")
@click.argument("model_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--card", "card_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="For .onnx: the card (JSON or YAML, fields as in model.json) that says how to feed the model and read its outputs.")
@click.option("--name", default=None, help="Bundle name (folder name) [.onnx: default the card's name].")
@click.option("--dest", type=click.Path(file_okay=False, path_type=Path), default=Path("models"), show_default=True)
@click.option("--version", "version", default="1.0.0", show_default=True, help="Keras files only (an ONNX card has its own).")
@click.option("--outputs", default=None, help="Keras files only: comma-separated labels of the model's outputs, in order [default: 'any' for one output, else all six].")
@click.option("--windows", default="brain,subdural,bone", show_default=True, help="Keras files only: three of brain, subdural, bone, one per input channel.")
@click.option("--threshold", type=click.FloatRange(0, 1), default=0.5, show_default=True, help="Keras files only.")
@click.option("--trained-on", default="", help="Keras files only: what the model was trained on (goes on the card and every report).")
@click.option("--intended-use", default="Research use only. Not for diagnosis.", show_default=True, help="Keras files only.")
def models_import(model_file: Path, card_file: Path | None, name: str | None, dest: Path, version: str,
                  outputs: str | None, windows: str, threshold: float, trained_on: str, intended_use: str) -> None:
    """Make a bundle from a model file: an ONNX model with its card, or a Keras model (.keras or .h5,
    loaded in safe mode).

    \b
    An ONNX model is checked against its card (input shape and layout, channel count, outputs, a test
    input) and refused with the mismatch named. See the README's "Bring your own model".
      ichbatch models import rsna.onnx --card rsna-card.yaml
    A Keras model trained on 224x224 images scaled by 1/255:
      ichbatch models import colab_model.h5 --name colab-binary --windows brain,brain,brain
    """
    try:
        if model_file.suffix.lower() == ".onnx":
            folder = _import_onnx(model_file, card_file, name, dest)
        else:
            from .model.importer import import_keras_model

            if name is None:
                raise BundleError("--name is needed for a Keras model")
            folder = import_keras_model(model_file, name=name, dest=dest, version=version, outputs=outputs,
                                        windows=windows, threshold=threshold, trained_on=trained_on,
                                        intended_use=intended_use)
    except (BundleError, ValueError) as exc:
        raise _fatal(str(exc), EXIT_USAGE) from exc
    click.echo(f"bundle written to {folder}")


def _import_onnx(model_file: Path, card_file: Path | None, name: str | None, dest: Path) -> Path:
    from .model.onnx_import import import_onnx, read_card_file

    if card_file is None:
        raise BundleError("an ONNX model needs --card: a card that says how to feed it (see the README)")
    data = read_card_file(card_file)
    if name:
        data["name"] = name
    if not isinstance(data.get("name"), str) or not data["name"] or "/" in data["name"]:
        raise BundleError(f"{card_file}: the card needs a name (a folder name), or pass --name")
    return import_onnx(model_file, data, dest / data["name"])


@models.command("export")
@click.argument("bundle")
@click.option("--format", "fmt", type=click.Choice(["onnx"]), default="onnx", show_default=True)
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Bundle folder to write.")
@click.option("--layout", type=click.Choice(["nhwc", "nchw"]), default="nhwc", show_default=True,
              help="nchw: NCHW input with ImageNet mean/std normalisation, as PyTorch models take.")
def models_export(bundle: str, fmt: str, out: Path, layout: str) -> None:
    """Export a Keras bundle as a complete ONNX bundle (needs ichbatch[onnx]); `ichbatch run --model OUT`
    runs it as it is."""
    from .model.backend import import_backend
    from .model.onnx_export import export_onnx

    import_backend()
    try:
        folder = export_onnx(bundle, out, layout)
    except (BundleError, ValueError) as exc:
        raise _fatal(str(exc), EXIT_USAGE) from exc
    click.echo(f"bundle written to {folder}")


@models.command("fit-domain")
@click.argument("bundle")
@click.argument("data", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--fitted-on", required=True, help="What DATA is, in words (goes on the card), e.g. 'held-out phantoms, seed 101'.")
@click.option("--tta", type=click.IntRange(1, 8), default=None, help="TTA views, as in the runs it will check [default: as run on this device].")
@click.option("--dims", type=click.IntRange(2, 512), default=64, show_default=True, help="Principal components of the pooled features.")
@click.option("--quantile", type=click.FloatRange(0.5, 1.0), default=0.99, show_default=True, help="Quantile of held-out study scores that sets the threshold.")
@click.option("--margin", type=click.FloatRange(1.0), default=1.25, show_default=True, help="Factor on that quantile.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the fit/held-out split of the studies.")
def models_fit_domain(bundle: str, data: tuple[Path, ...], fitted_on: str, tta: int | None, dims: int, quantile: float,
                      margin: float, seed: int) -> None:
    """Fit the feature-space domain check of BUNDLE on DATA (DICOM studies like its training data).

    Half the studies fit the feature space, the other half set the threshold. Studies scoring above it
    at run time are reported as not assessed.

    \b
    Example:
      ichbatch models fit-domain models/my-model /data/heldout --fitted-on "200 held-out training studies"
    """
    from .fitting import fit_bundle_domain
    from .model.bundle import resolve

    try:
        card = fit_bundle_domain(bundle, list(data), fitted_on, tta=tta, dims=dims, quantile=quantile,
                                 margin=margin, seed=seed)
    except (BundleError, ValueError) as exc:
        raise _fatal(str(exc), EXIT_USAGE) from exc
    assert card.domain is not None
    click.echo(f"domain check written to {resolve(bundle)}: threshold {card.domain['threshold']:.3f}, "
               f"{card.domain['held_out_outside']:.1%} of {card.domain['held_out_studies']} held-out studies above it")


@models.command("calibrate")
@click.argument("bundle")
@click.argument("data", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--labels", "labels", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Slice labels of DATA: a synth manifest.json or a CSV with study_uid, slice and one 0/1 column per label.")
@click.option("--fitted-on", required=True, help="What DATA is, in words (goes on the card).")
@click.option("--tta", type=click.IntRange(1, 8), default=None, help="TTA views, as in the runs [default: as run on this device].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the split that measures the calibration error.")
def models_calibrate(bundle: str, data: tuple[Path, ...], labels: Path, fitted_on: str, tta: int | None, seed: int) -> None:
    """Fit Platt scaling per label of BUNDLE on labelled held-out studies DATA; the card's thresholds then
    apply to calibrated scores. The card records the calibration error before and after.

    \b
    Example:
      ichbatch synth heldout --studies 60 --seed 101
      ichbatch models calibrate models/my-model heldout --labels heldout/manifest.json --fitted-on "60 held-out phantoms"
    """
    from .fitting import calibrate_bundle
    from .model.bundle import resolve

    try:
        card = calibrate_bundle(bundle, list(data), labels, fitted_on, tta=tta, seed=seed)
    except (BundleError, ValueError) as exc:
        raise _fatal(str(exc), EXIT_USAGE) from exc
    assert card.calibration is not None
    for label in card.outputs:
        click.echo(f"{label:17s} ECE {card.calibration['ece_before'][label]:.3f} -> {card.calibration['ece_after'][label]:.3f}")
    click.echo(f"calibration written to the card of {resolve(bundle)}")


def _finish_options(group: click.Group) -> None:
    """Every command takes the logging options, and every option's help names its environment variable."""
    for command in group.commands.values():
        command.params.extend(_logging_options())
        if isinstance(command, click.Group):
            _finish_options(command)
    for command in [group, *_all_commands(group)]:
        for param in command.params:
            if isinstance(param, click.Option):
                param.show_envvar = True


def _all_commands(group: click.Group) -> list[click.Command]:
    found: list[click.Command] = []
    for command in group.commands.values():
        found.append(command)
        if isinstance(command, click.Group):
            found.extend(_all_commands(command))
    return found


main.params.extend(_logging_options())
_finish_options(main)


if __name__ == "__main__":  # pragma: no cover
    main()
