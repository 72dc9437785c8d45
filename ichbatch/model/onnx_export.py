"""`ichbatch models export BUNDLE --format onnx --out DIR`: one of our Keras bundles as an ONNX bundle.

Keras' own ONNX export (tf2onnx underneath) writes the network; the card travels with it (thresholds,
calibration, eligibility, the domain check's file), and the result goes through the same importer as a
model from elsewhere, so DIR is checked exactly as a user's model would be and `ichbatch run --model DIR`
runs it as it is. With --layout nchw the exported network takes NCHW input with ImageNet-style mean/std
normalisation, as most PyTorch models do, and undoes both itself: the card says so, and the pipeline
feeds it accordingly (this is also how the layout and normalisation code paths are proven).
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ..config import cache_dir
from ..errors import BundleError
from .bundle import CARD, DOMAIN_FILE, Bundle, load_bundle, sha256, update_card
from .inputs import IMAGENET_MEAN, IMAGENET_STD
from .onnx_import import import_onnx


log = logging.getLogger(__name__)


def cache_folder(bundle: Bundle) -> Path:
    key = hashlib.sha256((bundle.path / CARD).read_bytes()).hexdigest()[:16]
    return cache_dir() / "onnx" / f"{bundle.card.name}-{key}"


def cached_export(bundle: Bundle) -> Path:
    """The ONNX export of a Keras bundle, made once per card (its weights' and domain check's sha256 are
    in it) and kept in the cache for later runs."""
    folder = cache_folder(bundle)
    if not (folder / CARD).is_file():
        log.warning("exporting %s to ONNX for onnxruntime, once (about half a minute); cached in %s",
                    bundle.card.display_name, folder)
        export_onnx(str(bundle.path), folder)
    return folder


def export_onnx(bundle_name: str, out: Path, layout: str = "nhwc") -> Path:
    import keras

    if keras.backend.backend() != "tensorflow":
        raise BundleError("ONNX export uses tf2onnx and needs the TensorFlow backend (KERAS_BACKEND=tensorflow)")
    try:
        import tf2onnx  # noqa: F401
    except ImportError as exc:
        raise BundleError("ONNX export needs tf2onnx: pip install 'ichbatch[onnx]'") from exc
    bundle = load_bundle(bundle_name)
    card = bundle.card
    if card.architecture == "onnx":
        raise BundleError(f"bundle {card.name} is already an ONNX model")
    network = _with_layout(bundle.model, card.input_spec.shape(), layout)
    network.predict_on_batch(np.zeros((1, *network.inputs[0].shape[1:]), np.float32))  # Keras' export needs it built
    data = card.to_json()
    data.update(layout=layout, cam={"corner_aligned": any(layer.name == "conv1_pad" for layer in bundle.model.layers)})
    if layout == "nchw":
        data["normalisation"] = {"range": [0.0, 1.0], "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        network.export(str(path), format="onnx", verbose=False)
        folder = import_onnx(path, data, Path(out))
    if card.domain is not None:  # the ONNX bundle's pooled features are the same, so is the check
        shutil.copyfile(bundle.path / str(card.domain["file"]), Path(out) / DOMAIN_FILE)
        update_card(Path(out), domain={**card.domain, "file": DOMAIN_FILE, "sha256": sha256(Path(out) / DOMAIN_FILE)})
    return folder


def _with_layout(model: Any, nhwc_shape: tuple[int, ...], layout: str) -> Any:
    """The network as is (NHWC), or behind NCHW input that undoes ImageNet normalisation."""
    import keras

    if layout == "nhwc":
        return model
    if layout != "nchw":
        raise BundleError(f"layout must be nhwc or nchw. Received: {layout!r}")
    s, _, c = nhwc_shape
    if c != 3:
        raise BundleError("NCHW export with ImageNet normalisation is for 3-channel models")
    images = keras.Input((c, s, s), name="image")
    x = keras.layers.Permute((2, 3, 1), name="to_nhwc")(images)
    x = keras.layers.Rescaling(scale=np.asarray(IMAGENET_STD, np.float32), offset=np.asarray(IMAGENET_MEAN, np.float32),
                               name="undo_imagenet_normalisation")(x)
    return keras.Model(images, model(x), name=f"{model.name}_nchw")
