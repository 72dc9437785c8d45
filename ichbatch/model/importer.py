"""Wrap a user's Keras model file into a bundle (card + the file, with its sha256)."""

from __future__ import annotations

from pathlib import Path

from ..config import LABELS, NAMED_WINDOWS
from ..errors import BundleError
from .bundle import ModelCard, _load_keras_file, write_bundle


def import_keras_model(
    model_file: Path, *, name: str, dest: Path, version: str = "1.0.0", outputs: str | None = None,
    windows: str = "brain,subdural,bone", threshold: float = 0.5, trained_on: str = "",
    intended_use: str = "Research use only. Not for diagnosis.",
) -> Path:
    if model_file.suffix not in (".keras", ".h5"):
        raise BundleError(f"{model_file}: expected a .keras or .h5 file")
    model = _load_keras_file(model_file)  # safe mode: refuses files that carry code
    shape = tuple(model.inputs[0].shape[1:])
    if len(shape) != 3 or shape[0] != shape[1] or shape[2] != 3 or shape[0] is None:
        raise BundleError(f"{model_file}: input shape {shape}; a square (size, size, 3) input is needed")
    n_out = int(model.outputs[0].shape[-1])
    names = tuple(o.strip() for o in outputs.split(",")) if outputs else (("any",) if n_out == 1 else LABELS)
    if len(names) != n_out or not set(names) <= set(LABELS):
        raise BundleError(f"{model_file}: {n_out} output(s), but --outputs names {list(names)}; use labels from {list(LABELS)}")
    try:
        chans = tuple(NAMED_WINDOWS[w.strip()] for w in windows.split(","))
    except KeyError as exc:
        raise BundleError(f"unknown window {exc}; use {sorted(NAMED_WINDOWS)}") from exc
    card = ModelCard(
        name=name, version=version, architecture="keras", input_size=int(shape[0]), windows=chans,
        outputs=names, thresholds={label: threshold for label in names}, trained=True,
        trained_on=trained_on or "not stated by the importer", intended_use=intended_use,
        weights=f"model{model_file.suffix}",
    )
    card.validate()
    return write_bundle(dest / name, card, weights_source=model_file)
