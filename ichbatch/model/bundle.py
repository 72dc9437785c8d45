"""Model bundles: a folder with a model.json card and the weights it names, checked by sha256.

Two kinds of weights:
- architecture "resnet50": the network is built from code and its weights come from an .npz of float16
  arrays (no pickle, no code in the file). A card with "weights": null is an untrained stand-in that is
  initialised from its seed and says so in every output.
- architecture "keras": a user's .keras/.h5 model, loaded with Keras safe mode (no lambda code).
- architecture "onnx": a model.onnx run with onnxruntime (onnx_model.py), imported by onnx_import.py.

The card also says how to feed the model and read its outputs (inputs.py): layout, channels, range and
mean/std normalisation, slice context, output activation and which outputs are which labels.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..config import DEFAULT_WINDOWS, LABELS, Window
from ..eligibility import Eligibility
from ..errors import BundleError
from ..limits import MAX_INPUT_SIZE
from .domain_check import DomainCheck
from .gradcam import FLIPS, METHODS
from .inputs import ACTIVATIONS, InputSpec, normalisation_problems, spec_from_card
from .locate import CARD, DEFAULT_MODEL, list_bundles, models_dirs, resolve

DOMAIN_FILE = "domain.npz"
__all__ = ["CARD", "DEFAULT_MODEL", "Bundle", "ModelCard", "list_bundles", "load_bundle", "models_dirs", "read_card",
           "resolve", "write_bundle", "attach_domain", "update_card"]



@dataclass(frozen=True)
class ModelCard:
    name: str
    version: str
    architecture: str = "resnet50"  # or "keras", "onnx"
    input_size: int = 224
    windows: tuple[Window, ...] = DEFAULT_WINDOWS
    # "unit": each window scaled to [0, 1]; or {"range": [lo, hi], "mean": [...], "std": [...]} (inputs.py)
    normalisation: str | dict[str, Any] = "unit"
    channels: str = "windows"  # or "hu": one channel per slice, (HU - hu_scale.offset) / hu_scale.scale
    hu_scale: dict[str, float] | None = None
    layout: str = "nhwc"  # or "nchw" (ONNX models from PyTorch)
    context: int = 0  # 2.5D: slices s-k..s+k as channels
    context_spacing_mm: float | None = None  # expected spacing of those slices; None: the series' own
    context_order: str = "slice-major"  # or "window-major"
    labels: tuple[str, ...] = LABELS
    outputs: tuple[str, ...] = LABELS  # the labels the model gives, in order
    output_map: tuple[int, ...] | None = None  # which raw output each of `outputs` is; None: the first ones
    output_activation: str = "sigmoid"  # what the model's outputs are (inputs.ACTIVATIONS)
    thresholds: dict[str, float] = field(default_factory=lambda: {label: 0.5 for label in LABELS})
    trained: bool = True
    trained_on: str = ""
    intended_use: str = "Research and demonstration only. Not for diagnosis."
    weights: str | None = "weights.npz"
    weights_sha256: str | None = None
    seed: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    cam_layer: str | None = None  # Grad-CAM layer for the report maps; None: the last convolutional one
    cam_augment: tuple[str, ...] = ()  # flips the report maps are averaged over (gradcam.FLIPS)
    cam_method: str = "gradcam"  # or "hirescam" (gradcam.METHODS)
    eligibility: Eligibility = field(default_factory=Eligibility)  # which studies the model may be run on
    # The feature-space domain check (domain_check.py): {"file", "sha256", "threshold", ...how it was fitted}.
    domain: dict[str, Any] | None = None
    # Platt parameters per output, {"params": {label: [a, b]}, ...}, from `ichbatch models calibrate`.
    calibration: dict[str, Any] | None = None
    # ONNX heat maps (onnx_import.py): {"method": "cam", "features", "file", "sha256", ...} or {"method": "occlusion"}
    cam: dict[str, Any] | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelCard:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise BundleError(f"model.json has unknown field(s) {sorted(unknown)}")
        data = dict(data)
        try:
            data["windows"] = tuple(Window(**w) for w in data.get("windows", [asdict(w) for w in DEFAULT_WINDOWS]))
            for key in ("labels", "outputs", "cam_augment", "output_map"):
                if data.get(key) is not None:
                    data[key] = tuple(data[key])
            data["eligibility"] = Eligibility.from_json(data.get("eligibility"))
            card = cls(**data)
        except TypeError as exc:
            raise BundleError(f"model.json: a field is missing or of the wrong kind ({exc})") from exc
        except ValueError as exc:
            raise BundleError(f"model.json: {exc}") from exc
        card.validate()
        return card

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["windows"] = [asdict(w) for w in self.windows]
        data["labels"], data["outputs"] = list(self.labels), list(self.outputs)
        data["cam_augment"] = list(self.cam_augment)
        data["output_map"] = None if self.output_map is None else list(self.output_map)
        data["eligibility"] = self.eligibility.to_json()
        return data

    def validate(self) -> None:
        problems = self._type_problems()
        if problems:
            raise BundleError(f"model.json of {self.name!r}: " + "; ".join(problems))
        if self.architecture not in ("resnet50", "keras", "onnx"):
            raise BundleError(f"unknown architecture {self.architecture!r}; expected 'resnet50', 'keras' or 'onnx'")
        if not set(self.outputs) <= set(self.labels):
            raise BundleError(f"outputs {list(self.outputs)} are not all among labels {list(self.labels)}")
        if self.architecture == "resnet50" and (len(self.windows) != 3 or self.input_spec.n_channels != 3):
            raise BundleError(f"a resnet50 bundle takes 3 channel windows and no context. Received: {self.input_spec.describe()}")
        if self.architecture != "onnx" and self.layout != "nhwc":
            raise BundleError("layout 'nchw' is for ONNX models; Keras models here take NHWC input")
        if not set(self.cam_augment) <= set(FLIPS):
            raise BundleError(f"cam_augment {list(self.cam_augment)}: expected some of {sorted(FLIPS)}")
        if self.cam_method not in METHODS:
            raise BundleError(f"cam_method {self.cam_method!r}: expected one of {list(METHODS)}")
        if self.domain is not None and not (isinstance(self.domain, dict) and isinstance(self.domain.get("file"), str)
                                            and isinstance(self.domain.get("sha256"), str)):
            raise BundleError("domain must name its file and sha256 (written by `ichbatch models fit-domain`)")
        if self.calibration is not None and not _valid_calibration(self.calibration, self.outputs):
            raise BundleError("calibration must hold params {label: [a, b]} with a > 0 for outputs of the model")
        if self.weights is None and (self.trained or self.architecture != "resnet50"):
            raise BundleError(f"bundle {self.name}: no weights file, but the card does not say it is untrained")

    def _type_problems(self) -> list[str]:
        """Every value that a file could get wrong, each with one message (ranges before allocation)."""
        problems = normalisation_problems(self.normalisation)
        if not problems:
            problems += self.input_spec.problems()
        if self.output_activation not in ACTIVATIONS:
            problems.append(f"output_activation must be one of {list(ACTIVATIONS)}. Received: {self.output_activation!r}")
        if self.output_map is not None and (
                len(self.output_map) != len(self.outputs)
                or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.output_map)):
            problems.append(f"output_map must give one output index (0 or more) for each of outputs {list(self.outputs)}. "
                            f"Received: {self.output_map!r}")
        if self.hu_scale is not None and not (isinstance(self.hu_scale, dict) and set(self.hu_scale) <= {"offset", "scale"}
                                              and all(isinstance(v, (int, float)) for v in self.hu_scale.values())):
            problems.append(f"hu_scale must be {{'offset': number, 'scale': number}}. Received: {self.hu_scale!r}")
        if self.context_spacing_mm is not None and not (isinstance(self.context_spacing_mm, (int, float))
                                                        and self.context_spacing_mm > 0):
            problems.append(f"context_spacing_mm must be a number above 0, or null. Received: {self.context_spacing_mm!r}")
        for name in ("name", "version", "architecture", "trained_on", "intended_use", "cam_method"):
            if not isinstance(getattr(self, name), str):
                problems.append(f"{name} must be text. Received: {getattr(self, name)!r}")
        if not isinstance(self.trained, bool):
            problems.append(f"trained must be true or false. Received: {self.trained!r}")
        if isinstance(self.input_size, bool) or not isinstance(self.input_size, int) \
                or not 32 <= self.input_size <= MAX_INPUT_SIZE:
            problems.append(f"input_size must be a whole number from 32 to {MAX_INPUT_SIZE}. Received: {self.input_size!r}")
        for w in self.windows:
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (w.center, w.width)) \
                    or not w.width > 0:
                problems.append(f"window {w.name!r} needs a number center and a width above 0. "
                                f"Received: center {w.center!r}, width {w.width!r}")
        if not isinstance(self.thresholds, dict):
            problems.append(f"thresholds must map labels to numbers between 0 and 1. Received: {self.thresholds!r}")
        else:
            for label, value in self.thresholds.items():
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
                    problems.append(f"threshold for {label!r} must be a number between 0 and 1 (not 0 or 1). "
                                    f"Received: {value!r}")
                if label not in self.labels:
                    problems.append(f"threshold for {label!r}, which is not among the labels {list(self.labels)}")
        return problems

    @property
    def key(self) -> str:
        """What --resume compares: a result from another model or version is not reused."""
        return f"{self.name} {self.version}"

    @property
    def input_spec(self) -> InputSpec:
        return spec_from_card(self)

    @property
    def raw_outputs(self) -> tuple[int, ...]:
        """The model's output index for each of `outputs`."""
        return self.output_map if self.output_map is not None else tuple(range(len(self.outputs)))

    def output_index(self, label: str) -> int:
        return self.raw_outputs[self.outputs.index(label)]

    @property
    def display_name(self) -> str:
        return f"{self.name} {self.version}" + ("" if self.trained else " (UNTRAINED)")


@dataclass
class Bundle:
    card: ModelCard
    path: Path
    model: Any  # keras.Model, or onnx_model.OnnxNetwork
    domain: DomainCheck | None = None


def read_card(folder: Path) -> ModelCard:
    try:
        data = json.loads((folder / CARD).read_text())
    except FileNotFoundError as exc:
        raise BundleError(f"{folder}: missing {CARD}") from exc
    except json.JSONDecodeError as exc:
        raise BundleError(f"{folder / CARD}: not valid JSON ({exc})") from exc
    return ModelCard.from_json(data)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_bundle(name_or_path: str, precision: str = "float32") -> Bundle:
    """precision: the compute dtype ("float32", or "bfloat16"/"float16" as mixed precision: variables
    stay float32, the sigmoid head always computes in float32)."""
    import keras

    folder = resolve(name_or_path)
    card = read_card(folder)
    if card.weights is not None:
        _verify(folder, card)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float32" if precision == "float32" else f"mixed_{precision}")
    try:
        if card.architecture == "resnet50":
            model = _load_resnet(folder, card)
        elif card.architecture == "onnx":
            from .onnx_model import OnnxNetwork

            model = OnnxNetwork.load(folder, card)
        else:
            model = _load_keras_file(folder / str(card.weights))
    finally:
        keras.config.set_dtype_policy(previous)
    if card.architecture != "onnx":  # OnnxNetwork.load checks its own shapes
        _check_model_shape(model, card)
    return Bundle(card, folder, model, _load_domain(folder, card))


def _load_domain(folder: Path, card: ModelCard) -> DomainCheck | None:
    if card.domain is None:
        return None
    return DomainCheck.load(checked_file(folder, card, card.domain, "domain-check file"))


def checked_file(folder: Path, card: ModelCard, entry: dict[str, Any], what: str) -> Path:
    """A side file a card names as {"file", "sha256"}: present, and the file the card describes."""
    path = folder / str(entry.get("file", ""))
    if not path.is_file():
        raise BundleError(f"bundle {card.name}: {what} {path} is missing")
    if sha256(path) != entry.get("sha256"):
        raise BundleError(f"bundle {card.name}: {path.name} does not match the sha256 in the card")
    return path


def _valid_calibration(entry: Any, outputs: tuple[str, ...]) -> bool:
    params = entry.get("params") if isinstance(entry, dict) else None
    if not isinstance(params, dict) or not set(params) <= set(outputs):
        return False
    return all(isinstance(v, list) and len(v) == 2 and all(isinstance(x, (int, float)) for x in v) and v[0] > 0
               for v in params.values())


def update_card(folder: Path, **changes: Any) -> ModelCard:
    """Rewrite a bundle's card with changes, validated, atomically."""
    from ..report.files import atomic_write_bytes

    card = ModelCard.from_json({**read_card(Path(folder)).to_json(), **changes})
    atomic_write_bytes(Path(folder) / CARD, (json.dumps(card.to_json(), indent=2) + "\n").encode())
    return card


def attach_domain(folder: Path, check: DomainCheck, summary: dict[str, Any]) -> ModelCard:
    """Write the domain check into a bundle and its card, atomically (a copy renamed into place)."""
    folder = Path(folder)
    card = read_card(folder)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        staged = tmp / folder.name
        shutil.copytree(folder, staged)
        check.save(staged / DOMAIN_FILE)
        card = ModelCard(**{**card.__dict__, "domain": {"file": DOMAIN_FILE, "sha256": sha256(staged / DOMAIN_FILE),
                                                         **summary}})
        (staged / CARD).write_text(json.dumps(card.to_json(), indent=2) + "\n")
        old = tmp / "previous"
        os.replace(folder, old)
        os.replace(staged, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return card


def _verify(folder: Path, card: ModelCard) -> None:
    weights = folder / str(card.weights)
    if not weights.is_file():
        raise BundleError(f"bundle {card.name}: weights file {weights} is missing")
    if not card.weights_sha256:
        raise BundleError(f"bundle {card.name}: the card has no weights_sha256 to check {weights.name} against")
    actual = sha256(weights)
    if actual != card.weights_sha256:
        raise BundleError(
            f"bundle {card.name}: {weights.name} has sha256 {actual[:16]}..., the card says "
            f"{card.weights_sha256[:16]}...; the file is corrupt or not the one the card describes"
        )


def _load_resnet(folder: Path, card: ModelCard):  # type: ignore[no-untyped-def]
    from .resnet import build_resnet50

    model = build_resnet50(card.input_size, len(card.outputs), seed=card.seed)
    if card.weights is not None:
        load_npz_weights(model, folder / card.weights)
    return model


def _load_keras_file(path: Path):  # type: ignore[no-untyped-def]
    import keras

    try:
        return keras.saving.load_model(path, compile=False, safe_mode=True)
    except ValueError as exc:
        if "safe_mode" in str(exc) or "lambda" in str(exc).lower():
            raise BundleError(f"{path}: refused to load a model that contains code (Keras safe mode)") from exc
        raise BundleError(f"{path}: not a loadable Keras model ({exc})") from exc
    except Exception as exc:
        raise BundleError(f"{path}: not a loadable Keras model ({type(exc).__name__}: {exc})") from exc


def _check_model_shape(model, card: ModelCard) -> None:  # type: ignore[no-untyped-def]
    in_shape = tuple(model.inputs[0].shape[1:])
    spec = card.input_spec
    if in_shape != spec.shape():
        raise BundleError(f"bundle {card.name}: model input {in_shape} does not match the card's "
                          f"{spec.shape()} ({spec.describe()})")
    n_out = int(model.outputs[0].shape[-1])
    wanted = len(card.outputs) if card.output_map is None else max(card.output_map) + 1
    if n_out < wanted or (card.output_map is None and n_out != wanted):
        raise BundleError(f"bundle {card.name}: model has {n_out} outputs, the card maps {list(card.outputs)} "
                          f"to output(s) {list(card.raw_outputs)}")
    if card.cam_layer and card.cam_layer not in {layer.name for layer in model.layers}:
        raise BundleError(f"bundle {card.name}: cam_layer {card.cam_layer!r} is not a layer of the model")


def save_npz_weights(model, path: Path) -> None:  # type: ignore[no-untyped-def]
    """All variables as float16, keyed by order and path (small, and safe to load: no pickle)."""
    arrays = {f"{i:04d}|{v.path}": np.asarray(v.numpy(), np.float16) for i, v in enumerate(model.weights)}
    with open(path, "wb") as fh:
        np.savez_compressed(fh, **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds as bool


def load_npz_weights(model, path: Path) -> None:  # type: ignore[no-untyped-def]
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = [data[k] for k in sorted(data.files)]
    except Exception as exc:
        raise BundleError(f"{path}: not a readable weights file ({exc})") from exc
    if len(arrays) != len(model.weights):
        raise BundleError(f"{path}: {len(arrays)} arrays for a model with {len(model.weights)} variables")
    for var, arr in zip(model.weights, arrays):
        if tuple(var.shape) != arr.shape:
            raise BundleError(f"{path}: {var.path} has shape {tuple(var.shape)}, the file {arr.shape}")
        var.assign(arr.astype("float32"))


def write_bundle(folder: Path, card: ModelCard, model=None, weights_source: Path | None = None,  # type: ignore[no-untyped-def]
                 extra: dict[str, Path] | None = None) -> Path:
    """Write card and weights (and extra files by name: the card carries their sha256) into folder
    atomically (a temp folder renamed into place)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        for name, source in (extra or {}).items():
            shutil.copyfile(source, tmp / name)
        if card.weights is not None:
            target = tmp / card.weights
            if weights_source is not None:
                shutil.copyfile(weights_source, target)
            else:
                save_npz_weights(model, target)
            card = ModelCard(**{**card.__dict__, "weights_sha256": sha256(target)})
        (tmp / CARD).write_text(json.dumps(card.to_json(), indent=2) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder
