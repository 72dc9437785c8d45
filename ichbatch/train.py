"""`ichbatch train`: fit the ResNet50 bundle on RSNA-layout DICOM, a folder of class images, or phantoms.

Recipe (from the ResNet50 projects we learn from): Adam, batch 32, 224 px, lr 1e-4; with --init, two
stages (frozen backbone for 5 epochs at 1e-3, then conv5 unfrozen for up to 25 epochs at 1e-4);
augmentation rotation 20 degrees, shifts 0.15, zoom 0.2, horizontal flip, brightness 0.8-1.2; weight
1.5 on positive slices; EarlyStopping(patience 5, best restored), ReduceLROnPlateau(0.5, 3, 1e-7); a
split by patient or study so that no study is in both training and validation.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import LABELS, SUBTYPES
from .eligibility import Eligibility
from .errors import IchBatchError
from .infer import default_workers
from .report.files import atomic_write_bytes
from .train_stream import SliceCache, SliceReader, batches, hu_to_channels, steps

log = logging.getLogger(__name__)
SOURCES = ("phantoms", "rsna", "folder")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass
class TrainData:
    """A training source: small per-slice records; the images in memory (phantoms, image folders, small by
    construction) or as one DICOM file per slice, decoded as training reads them (RSNA, any size)."""

    x: np.ndarray | None  # (n, size, size, 3) uint8: the three windows (or the image) scaled to 0..255
    y: np.ndarray  # (n, outputs) float32 0/1
    groups: np.ndarray  # (n,) patient or study key for the split
    outputs: tuple[str, ...]
    description: str
    paths: np.ndarray | None = None  # (n,) DICOM files, when x is None

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class TrainSettings:
    source: str
    out: Path
    name: str
    data: Path | None = None
    labels_csv: Path | None = None
    input_size: int = 224
    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-4
    init: Path | None = None
    val_fraction: float = 0.2
    seed: int = 0
    phantom_studies: int = 200
    phantom_slices: int = 24
    version: str = "1.0.0"
    workers: int = 0  # decoder or generator processes; 0: one per core, at most 8
    cache: Path | None = None  # decoded slices kept here after the first epoch (file sources)
    checkpoints: Path | None = None  # state after every epoch, to resume a long training [default: beside --out]
    phantoms: str = "anatomy"  # or "ellipse" (ichbatch.synth: quick, for tests)
    screenshots: float = 0.0  # share of phantom slices seen as 8-bit screenshots (ichbatch.screenshots)
    vertical_flip: bool = False  # off in the recipe: real heads are never upside down
    init_schedule: str = "transfer"  # with init: "transfer" (the two-stage recipe) or "continue" (all layers)
    command: str = ""  # the command line, for the card's record of how the bundle was made
    started: float = 0.0  # time.time() when the command started (data generation or loading included)
    max_minutes: float | None = None  # fitting stops at the last epoch that ends within this budget,
    # or within an epoch when that epoch alone would overrun it

    @property
    def transfer(self) -> bool:
        """The recipe's two stages (head, then conv5) rather than every layer training throughout."""
        return self.init is not None and self.init_schedule == "transfer"


@dataclass(frozen=True)
class PhantomJob:
    """One generated training study: its generator, and the seed stream it draws from."""

    kind: str
    seed: int
    index: int
    n_slices: int


def generate_phantom(job: PhantomJob) -> tuple[np.ndarray, np.ndarray]:
    """A worker's study: HU slices and, per slice, which subtypes it shows (as 0/1 in SUBTYPES order).
    Each study has its own random stream ([seed, index]), so the data do not depend on the workers."""
    from .synth import _generator, draw_subtypes

    rng = np.random.default_rng([job.seed, job.index])
    ph = _generator(job.kind)(rng, n_slices=job.n_slices, size=256, subtypes=draw_subtypes(rng))
    present = np.array([[int(ph.masks[t][s].any()) if t in ph.masks else 0 for t in SUBTYPES]
                        for s in range(ph.hu.shape[0])], np.int8)
    return ph.hu, present


def _generation_failed(job: PhantomJob, reason: str) -> None:
    """A worker that died or ran out of time: load_phantoms stops with an error."""
    return None


def load_phantoms(settings: TrainSettings, progress: Callable[[int, int], None] | None = None) -> TrainData:
    """Generated studies in memory (made in worker processes); with `screenshots`, that share of slices
    seen as screenshots instead."""
    from .screenshots import screenshot_channels
    from .workers import IsolatedPool, WorkerLimits

    shots = np.random.default_rng([settings.seed, 1])  # its own stream: the heads do not depend on it
    xs, ys, groups = [], [], []
    jobs = (PhantomJob(settings.phantoms, settings.seed, i, settings.phantom_slices)
            for i in range(settings.phantom_studies))
    # A 256 px anatomy study takes a few seconds and about 1.5 GB while it is made.
    limits = WorkerLimits(memory_mb=6144, seconds=600)
    workers = settings.workers or default_workers()
    with IsolatedPool(generate_phantom, _generation_failed, workers, limits) as pool:
        for i, made in enumerate(pool.map(jobs, depth=2 * workers)):
            if made is None:
                raise IchBatchError(f"generating phantom study {i} failed in its worker process (out of memory "
                                    f"or time?); nothing was trained")
            hu, present = made
            for s in range(hu.shape[0]):
                as_image = shots.random() < settings.screenshots
                xs.append(screenshot_channels(hu[s], settings.input_size, shots) if as_image
                          else hu_to_channels(hu[s], settings.input_size))
                ys.append([int(present[s].any()), *present[s].tolist()])
                groups.append(f"phantom-{i}")
            if progress:
                progress(i + 1, settings.phantom_studies)
    shown = f", {settings.screenshots:.0%} of slices as screenshots" if settings.screenshots else ""
    return TrainData(np.stack(xs), np.asarray(ys, np.float32), np.asarray(groups), LABELS,
                     f"{settings.phantom_studies} generated {settings.phantoms} phantom studies (ichbatch.synth, "
                     f"seed {settings.seed}{shown})")


def read_rsna_labels(path: Path) -> dict[str, dict[str, int]]:
    """stage_2_train.csv rows `ID_<image>_<label>,Label` -> image id -> label -> 0/1."""
    labels: dict[str, dict[str, int]] = {}
    pattern = re.compile(r"^(ID_[0-9a-fA-F]+)_(" + "|".join(LABELS) + r")$")
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            match = pattern.match(row.get("ID", ""))
            if not match:
                raise IchBatchError(f"{path}: row ID {row.get('ID')!r} is not ID_<image>_<label>")
            labels.setdefault(match.group(1), {})[match.group(2)] = int(float(row["Label"]))
    return labels


def load_rsna(settings: TrainSettings, progress: Callable[[int, int], None] | None = None) -> TrainData:
    """The index only (file, labels, patient per slice): the pixels are decoded as training reads them."""
    import pydicom

    if settings.data is None or settings.labels_csv is None:
        raise IchBatchError("--source rsna needs --data (folder of ID_*.dcm) and --labels (stage_2_train.csv)")
    labels = read_rsna_labels(settings.labels_csv)
    paths, ys, groups, missing = [], [], [], 0
    for n, (image_id, lab) in enumerate(sorted(labels.items()), 1):
        if progress and n % 256 == 0:
            progress(n, len(labels))
        path = settings.data / f"{image_id}.dcm"
        if not path.exists():
            missing += 1
            continue
        head = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientID", "StudyInstanceUID"])
        paths.append(str(path))
        ys.append([lab.get(label, 0) for label in LABELS])
        groups.append(str(head.get("PatientID") or head.get("StudyInstanceUID") or image_id))
    del labels
    if not paths:
        raise IchBatchError(f"none of the labelled images were found in {settings.data}")
    if missing:
        log.warning("%d labelled images have no file in %s", missing, settings.data)
    return TrainData(None, np.asarray(ys, np.uint8).astype(np.float32), np.asarray(groups), LABELS,
                     f"RSNA-layout data: {len(paths)} slices from {len(set(groups))} patients/studies",
                     paths=np.asarray(paths))


def load_folder(settings: TrainSettings) -> TrainData:
    """data/hemorrhage/* and data/normal/* images -> a binary 'any' model."""
    import cv2

    if settings.data is None:
        raise IchBatchError("--source folder needs --data with hemorrhage/ and normal/ sub-folders")
    xs, ys, groups = [], [], []
    for cls, value in (("hemorrhage", 1), ("normal", 0)):
        folder = settings.data / cls
        if not folder.is_dir():
            raise IchBatchError(f"{folder} is missing: --source folder expects hemorrhage/ and normal/")
        for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            img = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if img is None:
                log.warning("%s: not a readable image; skipped", path.name)
                continue
            rgb = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
            xs.append(cv2.resize(rgb, (settings.input_size,) * 2, interpolation=cv2.INTER_AREA))
            ys.append([value])
            groups.append(path.stem.split("_")[0])  # a shared prefix keeps one patient's images together
    if not xs:
        raise IchBatchError(f"no images found under {settings.data}/hemorrhage or /normal")
    return TrainData(np.stack(xs), np.asarray(ys, np.float32), np.asarray(groups), ("any",),
                     f"image folder {settings.data.name}: {len(xs)} images")


def group_split(groups: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks (train, val): every group lands wholly on one side."""
    unique = np.unique(groups)
    if len(unique) < 2:
        raise IchBatchError("need at least two patients/studies to make a train/validation split")
    rng = np.random.default_rng(seed)
    rng.shuffle(unique)
    n_val = min(len(unique) - 1, max(1, int(round(val_fraction * len(unique)))))
    val = np.isin(groups, unique[:n_val])
    return ~val, val


def _augmenter(seed: int, vertical_flip: bool = False):  # type: ignore[no-untyped-def]
    import keras

    class Brightness(keras.layers.Layer):
        """Multiply by a factor in [0.8, 1.2] during training (ImageDataGenerator's brightness_range)."""

        def __init__(self, **kwargs) -> None:  # type: ignore[no-untyped-def]
            super().__init__(**kwargs)
            self.gen = keras.random.SeedGenerator(seed)

        def call(self, x, training=None):  # type: ignore[no-untyped-def]
            if not training:
                return x
            f = keras.random.uniform((keras.ops.shape(x)[0], 1, 1, 1), 0.8, 1.2, seed=self.gen)
            return keras.ops.clip(x * f, 0.0, 1.0)

    return [
        keras.layers.RandomFlip("horizontal_and_vertical" if vertical_flip else "horizontal", seed=seed),
        keras.layers.RandomRotation(20 / 360, fill_mode="constant", seed=seed),
        keras.layers.RandomTranslation(0.15, 0.15, fill_mode="constant", seed=seed),
        keras.layers.RandomZoom(0.2, fill_mode="constant", seed=seed),
        Brightness(),
    ]


def _training_model(base, size: int, seed: int, vertical_flip: bool = False):  # type: ignore[no-untyped-def]
    import keras

    inp = keras.Input((size, size, 3), dtype="uint8")
    x = keras.layers.Rescaling(1 / 255)(inp)
    for layer in _augmenter(seed, vertical_flip):
        x = layer(x)
    return keras.Model(inp, base(x))


def train(settings: TrainSettings, data: TrainData, echo: Callable[[str], None] = print) -> Path:
    """Fit, evaluate on the validation split, write the bundle with its card, curves and metrics.

    The slices stream from a SliceReader (memory does not grow with the data set); after every epoch
    the training state is saved in the checkpoint folder, and the same command run again resumes there.
    """
    import keras

    from .evaluate import evaluate_arrays
    from .model.bundle import ModelCard, write_bundle
    from .model.resnet import build_resnet50

    keras.utils.set_random_seed(settings.seed)
    tr, va = group_split(data.groups, settings.val_fraction, settings.seed)
    echo(f"{data.description}; {tr.sum()} training and {va.sum()} validation slices, split by patient/study")
    base = build_resnet50(settings.input_size, len(data.outputs), seed=settings.seed)
    if settings.init:
        _load_init(base, settings.init)
    if not settings.transfer:
        # With every layer training the weights move fast; with Keras' default 0.99 the moving statistics
        # lag so far behind that validation (which uses them) sees a different network from training.
        _set_bn_momentum(base, 0.9)
    model = _training_model(base, settings.input_size, settings.seed, settings.vertical_flip)
    weights = np.where(data.y[:, 0] > 0, 1.5, 1.0).astype(np.float32)  # positives count 1.5 times
    tr_idx, va_idx = np.flatnonzero(tr), np.flatnonzero(va)
    checkpoints = settings.checkpoints or settings.out.with_name(settings.out.name + ".checkpoints")
    # Two readers: Keras may read ahead into the next training epoch while validation runs.
    key = _cache_key(settings, data)
    train_reader, val_reader = _reader(settings, data, key), _reader(settings, data, key)
    try:
        history = _fit(settings, base, model, checkpoints, echo, (
            batches(train_reader, tr_idx, data.y, weights, settings.batch_size, settings.seed),
            steps(len(tr_idx), settings.batch_size),
            batches(val_reader, va_idx, data.y, None, settings.batch_size, None),
            steps(len(va_idx), settings.batch_size)))
        order = np.random.default_rng(settings.seed).permutation(tr_idx)[:BN_BATCHES * settings.batch_size]
        recalibrate_from(base, (x for x, _ in batches(train_reader, np.sort(order), data.y, None,
                                                      settings.batch_size, None, epochs=1)))
        val_pred, domain_x, domain_groups = _validate(base, val_reader, va_idx, data, settings.batch_size)
        _report_unreadable(train_reader, val_reader, echo)
    finally:
        train_reader.close()
        val_reader.close()
    metrics = evaluate_arrays(data.y[va_idx], val_pred, data.outputs, groups=data.groups[va_idx])
    card = ModelCard(
        name=settings.name, version=settings.version, input_size=settings.input_size, outputs=data.outputs,
        thresholds={label: 0.5 for label in data.outputs}, trained=True,
        trained_on=data.description + " - " + ("synthetic phantoms: for demonstrating the pipeline only"
                                               if settings.source == "phantoms" else "user data"),
        seed=settings.seed, metrics={"validation": _summary(metrics), "epochs_run": len(history.get("loss", [])),
                                     "training": training_record(settings)},
        # Trained on screenshots too: it may be run on plain images (the card says so; run checks it).
        eligibility=Eligibility(windowed_images=settings.screenshots > 0),
    )
    card = _with_calibration(card, data.y[va_idx], val_pred, data.groups[va_idx], echo)
    folder = write_bundle(settings.out, card, base)
    _plot_curves(history, folder / "training_curves.png")
    _fit_domain(folder, base, domain_x, domain_groups, echo)
    shutil.rmtree(checkpoints, ignore_errors=True)  # the bundle is written: nothing left to resume
    echo(f"bundle written to {folder}; validation: {card.metrics['validation']}")
    return folder


def training_record(settings: TrainSettings) -> dict[str, str]:
    """How the bundle was made, for its card: command, starting weights, machine and backend, wall time."""
    import platform

    import keras

    from .infer import default_device

    record = {"command": settings.command or "(library call)",
              "machine": ", ".join([" ".join(filter(None, (platform.machine(), platform.processor()))),
                                    f"{os.cpu_count()} cores",
                                    f"Keras {keras.__version__} on {keras.backend.backend()} ({default_device()})"]),
              "starting_point": f"weights from {settings.init.name} in {settings.init.parent.name}" if settings.init
                                else "random initialisation"}
    if settings.started:
        import time

        record["wall_minutes"] = f"{(time.time() - settings.started) / 60:.0f}"
    return record


BN_BATCHES = 64  # training batches that precise BN averages over
# On TensorFlow, a fit of at most this many training steps in all runs eagerly: tracing ResNet50's training
# step into a graph costs about 25 s of CPU per stage (the optimizer's update of every variable is built in
# Python), while an eager step costs about 1.4 s more than a traced one (benchmarks/small_fit.py: break-even
# near 18 steps). Not on JAX: there an eager first step compiles op by op and took as long as compiling
# the whole step (37 s).
EAGER_STEPS = 12
DOMAIN_SLICES = 4096  # validation slices (whole studies) whose features fit the domain check


def _cache_key(settings: TrainSettings, data: TrainData) -> str:
    """Names the cache file after the file list and size, hashed once for both readers."""
    if data.paths is None or settings.cache is None:
        return ""
    digest = hashlib.sha256("\n".join(data.paths.tolist()).encode()).hexdigest()[:16]
    return f"slices-{digest}-{settings.input_size}"


def _reader(settings: TrainSettings, data: TrainData, cache_key: str) -> SliceReader:
    if data.x is not None:
        return SliceReader(settings.input_size, images=data.x)
    assert data.paths is not None
    cache = None
    if settings.cache is not None:
        cache = SliceCache(settings.cache, cache_key, len(data), settings.input_size)
    return SliceReader(settings.input_size, paths=data.paths, workers=settings.workers or default_workers(),
                       cache=cache)


def _fit(settings: TrainSettings, base, model, checkpoints: Path,  # type: ignore[no-untyped-def]
         echo: Callable[[str], None], data: tuple) -> dict[str, list[float]]:
    """The recipe's stages; a stage that finished in an earlier run of the same command is not run again."""
    import keras

    train_batches, train_steps, val_batches, val_steps = data
    history: dict[str, list[float]] = {}
    budget = _time_budget(settings.max_minutes, echo) if settings.max_minutes else None
    checkpoints.mkdir(parents=True, exist_ok=True)
    stages = _stages(settings)
    total = sum(epochs for epochs, _, _ in stages) * train_steps
    eager = keras.backend.backend() == "tensorflow" and total <= EAGER_STEPS
    if eager:
        echo(f"{total} training step{'s' if total > 1 else ''} in all: run eagerly, "
             "as tracing them into a graph would take longer than the steps")
    for i, (epochs, lr, trainable) in enumerate(stages):
        done, log_file = checkpoints / f"stage{i}.weights.h5", checkpoints / f"stage{i}.history.json"
        _set_trainable(base, trainable)
        if done.exists() and log_file.exists():
            base.load_weights(done)
            stage_history = json.loads(log_file.read_text())
            echo(f"stage {i + 1}: finished in an earlier run; resumed from {checkpoints}")
        else:
            model.compile(optimizer=keras.optimizers.Adam(lr), loss="binary_crossentropy",
                          metrics=[keras.metrics.AUC(multi_label=True, name="auc")], run_eagerly=eager)
            backup = keras.callbacks.BackupAndRestore(str(checkpoints / f"stage{i}"), delete_checkpoint=False)
            with _quiet_retracing(eager):
                h = model.fit(train_batches, steps_per_epoch=train_steps, validation_data=val_batches,
                              validation_steps=val_steps, epochs=epochs, verbose=2, shuffle=False,  # batches() shuffles
                              callbacks=[backup, *_callbacks(checkpoints / f"best{i}.weights.h5"),
                                         _heartbeat(echo), *([budget] if budget else [])])
            stage_history = {key: [float(v) for v in values] for key, values in h.history.items()}
            base.save_weights(checkpoints / f"stage{i}.tmp.weights.h5")
            os.replace(checkpoints / f"stage{i}.tmp.weights.h5", done)
            atomic_write_bytes(log_file, json.dumps(stage_history).encode())
        for key, values in stage_history.items():
            history.setdefault(key, []).extend(values)
        if budget and budget.spent:
            break
    return history


@contextmanager
def _quiet_retracing(eager: bool) -> Iterator[None]:
    """Run eagerly on TensorFlow, the AUC metric's vectorized map is traced afresh each step, and TensorFlow
    warns of that on every step; expected and harmless there, so those warnings are dropped meanwhile."""
    def drop(record: logging.LogRecord) -> bool:
        return "triggered tf.function retracing" not in record.getMessage()

    tf_log = logging.getLogger("tensorflow")
    if eager:
        tf_log.addFilter(drop)
    try:
        yield
    finally:
        tf_log.removeFilter(drop)


def _time_budget(minutes: float, echo: Callable[[str], None]):  # type: ignore[no-untyped-def]
    """A Keras callback that ends fitting at an epoch's end when one more epoch would overrun the budget
    (a lent GPU or a queue slot has a fixed time); the best epoch's weights are kept as always. An epoch
    that is itself longer than what is left (the first one, with its compiling, on a slow machine or a
    large data set) is cut at the step where the budget runs out, so the budget holds whatever the data."""
    import keras

    class Budget(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.deadline = time.monotonic() + 60 * minutes
            self.spent = False
            self.epoch_started = time.monotonic()
            self.epoch = 0

        def on_epoch_begin(self, epoch, logs=None):  # type: ignore[no-untyped-def]
            self.epoch_started, self.epoch = time.monotonic(), epoch

        def on_train_batch_end(self, batch, logs=None):  # type: ignore[no-untyped-def]
            if not self.spent and time.monotonic() > self.deadline:
                self.spent = self.model.stop_training = True
                steps = self.params.get("steps")
                echo(f"stopping in epoch {self.epoch + 1} after step {batch + 1}{f' of {steps}' if steps else ''}: "
                     f"the {minutes:g}-minute budget is spent (--max-minutes); that part-epoch is validated as usual")

        def on_epoch_end(self, epoch, logs=None):  # type: ignore[no-untyped-def]
            now = time.monotonic()
            if not self.spent and now + (now - self.epoch_started) > self.deadline:
                self.spent = self.model.stop_training = True
                echo(f"stopping after epoch {epoch + 1}: another epoch would pass the {minutes:g}-minute budget "
                     "(--max-minutes)")

    return Budget()


def _heartbeat(echo: Callable[[str], None], every: float = 60.0):  # type: ignore[no-untyped-def]
    """A line now and then within a long epoch: Keras' per-epoch lines (verbose=2, right for a log file)
    say nothing until an epoch ends, and the first one, which compiles, can take many minutes."""
    import keras

    class Heartbeat(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):  # type: ignore[no-untyped-def]
            self.started = self.last = time.monotonic()
            self.epoch = epoch

        def on_train_batch_end(self, batch, logs=None):  # type: ignore[no-untyped-def]
            now = time.monotonic()
            if now - self.last >= every:
                self.last = now
                steps = self.params.get("steps")
                echo(f"epoch {self.epoch + 1}: step {batch + 1}{f' of {steps}' if steps else ''}, "
                     f"{now - self.started:.0f} s into the epoch")

    return Heartbeat()


def _validate(base, reader: SliceReader, va_idx: np.ndarray, data: TrainData,  # type: ignore[no-untyped-def]
              batch_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Predictions for every validation slice, and the images of the first whole studies (up to
    DOMAIN_SLICES slices) for the domain check; one pass over the validation slices."""
    keep = _whole_groups(data.groups[va_idx], DOMAIN_SLICES)
    preds, kept = [], []
    start = 0
    for x, _ in batches(reader, va_idx, data.y, None, batch_size, None, epochs=1):
        preds.append(np.asarray(base.predict_on_batch(x.astype(np.float32) / 255.0)))
        kept.extend(x[keep[start:start + len(x)]])
        start += len(x)
    domain_x = np.stack(kept) if kept else np.zeros((0, reader.size, reader.size, 3), np.uint8)
    return np.concatenate(preds), domain_x, data.groups[va_idx][keep]


def _whole_groups(groups: np.ndarray, limit: int) -> np.ndarray:
    """A mask over the slices: the groups in order of first appearance while their slices fit in the limit."""
    keep = np.zeros(len(groups), bool)
    for g in dict.fromkeys(groups.tolist()):
        mask = groups == g
        if keep.sum() + mask.sum() > limit and keep.any():
            break
        keep |= mask
    return keep


def _report_unreadable(train_reader: SliceReader, val_reader: SliceReader, echo: Callable[[str], None]) -> None:
    errors = train_reader.errors + val_reader.errors
    if errors:
        echo(f"{errors} slice reads failed and trained as black images; first: "
             f"{train_reader.first_error or val_reader.first_error}")


def _with_calibration(card, y: np.ndarray, p: np.ndarray, groups: np.ndarray,  # type: ignore[no-untyped-def]
                      echo: Callable[[str], None]):
    """Platt scaling on the validation studies (which training never saw); the thresholds then apply
    to calibrated scores. Fewer than 4 validation studies: no calibration, and the card says so by its absence."""
    from dataclasses import replace

    from .model.calibration import fit_calibration

    studies = [(y[groups == g], p[groups == g]) for g in np.unique(groups)]
    if len(studies) < 4:
        echo(f"no calibration: {len(studies)} validation studies, at least 4 are needed")
        return card
    fit = fit_calibration(studies, card.outputs)
    return replace(card, calibration=fit.card_entry(f"the validation split of the training data ({len(studies)} studies)"))


def _fit_domain(folder: Path, base, x_uint8: np.ndarray, groups: np.ndarray,  # type: ignore[no-untyped-def]
                echo: Callable[[str], None]) -> None:
    """The domain check from the validation studies' pooled features (the unaugmented view, as at run time)."""
    from .infer import feature_model
    from .model.bundle import attach_domain
    from .model.domain_check import fit_domain

    studies = np.unique(groups)
    if len(studies) < 4:
        echo(f"no domain check: {len(studies)} validation studies, at least 4 are needed "
             "(fit one later with `ichbatch models fit-domain`)")
        return
    _, feats = feature_model(base).predict(x_uint8.astype(np.float32) / 255.0, batch_size=64, verbose=0)
    fit = fit_domain([np.asarray(feats)[groups == g] for g in studies])
    attach_domain(folder, fit.check, {**fit.summary(),
                                      "fitted_on": f"the validation split of the training data ({len(studies)} studies)"})
    echo(f"domain check fitted on {len(studies)} validation studies: threshold {fit.check.threshold:.3f}")


def _set_bn_momentum(base, momentum: float) -> None:  # type: ignore[no-untyped-def]
    import keras

    for layer in base.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = momentum


def recalibrate_batchnorm(base, x_uint8: np.ndarray, batch_size: int, seed: int,  # type: ignore[no-untyped-def]
                          max_batches: int = BN_BATCHES) -> None:
    """"Precise BN" over up to max_batches batches drawn from an array (see recalibrate_from)."""
    order = np.random.default_rng(seed).permutation(len(x_uint8))
    n_batches = max(1, min(max_batches, len(order) // batch_size))
    recalibrate_from(base, (x_uint8[order[i * batch_size:(i + 1) * batch_size]] for i in range(n_batches)))


def recalibrate_from(base, x_batches: Iterable[np.ndarray]) -> None:  # type: ignore[no-untyped-def]
    """"Precise BN": replace each BatchNormalization layer's moving statistics by their average over
    un-augmented training batches (uint8), with the final weights (no weight changes)."""
    import keras

    bns = [layer for layer in base.layers if isinstance(layer, keras.layers.BatchNormalization)]
    if not bns:
        return
    saved = [layer.momentum for layer in bns]
    for i, x in enumerate(x_batches):
        if not len(x):
            continue
        for layer in bns:
            layer.momentum = i / (i + 1)  # running mean of the per-batch statistics
        base(x.astype(np.float32) / 255.0, training=True)
    for layer, momentum in zip(bns, saved):
        layer.momentum = momentum


def _stages(settings: TrainSettings) -> list[tuple[int, float, str]]:
    if settings.transfer:  # head first, then the last block
        return [(min(5, settings.epochs), 1e-3, "head"), (max(settings.epochs - 5, 1), 1e-4, "conv5")]
    return [(settings.epochs, settings.lr, "all")]


def _set_trainable(base, which: str) -> None:  # type: ignore[no-untyped-def]
    for layer in base.layers:
        if which == "all":
            layer.trainable = True
        elif which == "head":
            layer.trainable = layer.name.startswith("ich_")
        else:
            layer.trainable = layer.name.startswith(("conv5_", "ich_"))


def _callbacks(best: Path) -> list:
    import keras

    return [
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=5, restore_best_weights=True),
        keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=3, min_lr=1e-7),
        keras.callbacks.ModelCheckpoint(str(best), monitor="val_loss", save_best_only=True, save_weights_only=True),
    ]


def _load_init(base, path: Path) -> None:  # type: ignore[no-untyped-def]
    from .model.bundle import load_npz_weights

    if path.suffix == ".npz":
        load_npz_weights(base, path)
    elif path.name.endswith(".weights.h5"):
        base.load_weights(path)
    else:
        raise IchBatchError(f"--init {path}: expected a bundle's weights.npz or a .weights.h5 file")


def _summary(metrics: dict) -> dict:
    out = {}
    for level in ("slice", "study"):
        if level in metrics:
            out[level] = {label: m.get("auc") for label, m in metrics[level]["labels"].items()}
            out[level]["weighted_log_loss"] = metrics[level].get("weighted_log_loss")
    return out


def _plot_curves(history: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, key in zip(axes, ("loss", "auc")):
        for prefix in ("", "val_"):
            if prefix + key in history:
                ax.plot(range(1, len(history[prefix + key]) + 1), history[prefix + key], label=prefix + key)
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def load_data(settings: TrainSettings, progress: Callable[[int, int], None] | None = None) -> TrainData:
    """The source's data; progress(done, total) while phantoms are generated or RSNA headers indexed."""
    if settings.source == "phantoms":
        return load_phantoms(settings, progress)
    if settings.source == "rsna":
        return load_rsna(settings, progress)
    return load_folder(settings)


__all__ = ["TrainSettings", "TrainData", "load_data", "train", "group_split", "read_rsna_labels"]
