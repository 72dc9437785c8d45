"""ONNX bundles at run time: the network in onnxruntime, and heat maps without gradients.

The importer (onnx_import.py) leaves in the bundle a model.onnx whose extra output is the last feature
maps before global pooling, and cam.npz with the classifier's weights. From those:
- pooled features (their spatial mean, which is what the pooling computes) for the domain check;
- class activation maps (Zhou et al. 2016): features times the classifier's column for the label.
A model without such a head gets occlusion maps: the drop in the label's probability when a patch of
the input is replaced by the image's mean, patch by patch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BundleError
from .gradcam import normalise_and_upsample
from .inputs import to_probabilities

OCCLUSION_GRID = 8  # patches per side


def providers() -> list[str]:
    """CUDA when this onnxruntime build has it, else the CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class OnnxNetwork:
    """An onnxruntime session with the card's view of it: which output is which, and the CAM head."""

    def __init__(self, session: Any, card: Any, kernel: np.ndarray | None) -> None:
        self.session = session
        self.card = card
        self.input_name = session.get_inputs()[0].name
        self.output_name = session.get_outputs()[0].name
        cam = card.cam or {}
        self.feature_name: str | None = cam.get("features") if cam.get("method") == "cam" else None
        self.feature_layout: str = cam.get("feature_layout", "nchw")
        self.kernel = kernel  # (feature channels, raw outputs)

    @classmethod
    def load(cls, folder: Path, card: Any) -> OnnxNetwork:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise BundleError(f"bundle {card.name} is an ONNX model: install onnxruntime to run it") from exc
        kernel = None
        cam = card.cam or {}
        if cam.get("method") == "cam":
            kernel = _load_kernel(folder, card)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        # No busy-waiting between runs: on a small CPU the spinning threads took the cores that decoding
        # and the host side need while the model waits for its next batch.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            session = ort.InferenceSession(str(folder / str(card.weights)), options, providers=providers())
        except Exception as exc:
            raise BundleError(f"bundle {card.name}: onnxruntime cannot load {card.weights} ({exc})") from exc
        network = cls(session, card, kernel)
        problems = network.shape_problems()
        if problems:
            raise BundleError(f"bundle {card.name}: " + "; ".join(problems))
        return network

    def shape_problems(self) -> list[str]:
        """What in the model's declared input and outputs disagrees with the card, one message each."""
        spec = self.card.input_spec
        problems = []
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            problems.append(f"the model has {len(inputs)} inputs; one image input is needed")
        dims = list(inputs[0].shape)
        if len(dims) != 4:
            return problems + [f"the model's input has {len(dims)} axes {dims}; an image batch has 4 "
                               f"({spec.layout.upper()})"]
        if isinstance(dims[0], int) and dims[0] > 0:
            problems.append(f"the model's batch axis is fixed at {dims[0]}; export it with a dynamic batch axis")
        for axis, (have, want) in enumerate(zip(dims[1:], spec.shape()), 1):
            if isinstance(have, int) and have > 0 and have != want:
                problems.append(f"input axis {axis} is {have} in the model but {want} by the card "
                                f"({spec.describe()}: {_axis_meaning(spec.layout, axis)})")
        n_raw = self.raw_output_count()
        wanted = max(self.card.raw_outputs) + 1
        if n_raw is not None and (n_raw < wanted or (self.card.output_map is None and n_raw != wanted)):
            problems.append(f"the model has {n_raw} outputs, the card maps {list(self.card.outputs)} to "
                            f"output(s) {list(self.card.raw_outputs)}")
        if self.feature_name and self.feature_name not in {o.name for o in self.session.get_outputs()}:
            problems.append(f"the card's CAM features {self.feature_name!r} are not an output of the model")
        return problems

    def raw_output_count(self) -> int | None:
        dims = self.session.get_outputs()[0].shape
        return dims[-1] if dims and isinstance(dims[-1], int) else None

    def run(self, x: np.ndarray, features: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """Model-layout float32 batch -> (raw outputs (B, n), feature maps or None)."""
        if features and not self.feature_name:
            raise BundleError(f"bundle {self.card.name}: the model exposes no feature maps (no pooling and linear "
                              "head was found at import), which the domain check needs")
        names = [self.output_name] + ([self.feature_name] if features and self.feature_name else [])
        out = self.session.run(names, {self.input_name: np.ascontiguousarray(x, np.float32)})
        raw = np.asarray(out[0], np.float32).reshape(len(x), -1)
        return raw, (np.asarray(out[1], np.float32) if len(out) > 1 else None)

    def pooled(self, maps: np.ndarray) -> np.ndarray:
        """Feature maps -> their spatial mean (the model's own global pooling)."""
        return maps.mean(axis=(2, 3) if self.feature_layout == "nchw" else (1, 2))

    def maps_nhwc(self, maps: np.ndarray) -> np.ndarray:
        return np.transpose(maps, (0, 2, 3, 1)) if self.feature_layout == "nchw" else maps


def _axis_meaning(layout: str, axis: int) -> str:
    return ("channels", "height", "width")[axis - 1] if layout == "nchw" else ("height", "width", "channels")[axis - 1]


def _load_kernel(folder: Path, card: Any) -> np.ndarray:
    from .bundle import checked_file

    with np.load(checked_file(folder, card, card.cam, "CAM weights file"), allow_pickle=False) as data:
        return np.asarray(data["kernel"], np.float32)


class OnnxExplainer:
    """Heat maps in [0, 1] at the input size, for ONNX bundles: CAM where the importer found a pooling and
    linear head, else occlusion. `maps` takes the model's own input (its layout, one view)."""

    def __init__(self, network: OnnxNetwork) -> None:
        self.network = network
        self.card = network.card
        self.method = "cam" if network.kernel is not None and network.feature_name else "occlusion"
        self.corner_aligned = bool((self.card.cam or {}).get("corner_aligned", False))

    def describe(self) -> str:
        if self.method == "cam":
            return "CAM from the last feature maps and the classifier weights"
        return f"occlusion ({OCCLUSION_GRID}x{OCCLUSION_GRID} patches replaced by the image mean)"

    def maps(self, inputs: np.ndarray, output_index: int) -> np.ndarray:
        size = self.card.input_size
        if self.method == "cam":
            assert self.network.kernel is not None
            _, feats = self.network.run(inputs, features=True)
            assert feats is not None
            raw = self.network.maps_nhwc(feats) @ self.network.kernel[:, output_index]
            return normalise_and_upsample(raw, size, self.corner_aligned)
        return normalise_and_upsample(self._occlusion(inputs, output_index), size, corner_aligned=False)

    def _occlusion(self, inputs: np.ndarray, output_index: int) -> np.ndarray:
        """(B, g, g): how much the label's probability drops with each patch replaced by the image mean."""
        nchw = self.card.layout == "nchw"
        size, g = self.card.input_size, OCCLUSION_GRID
        edges = np.linspace(0, size, g + 1).astype(int)
        out = np.zeros((len(inputs), g, g), np.float32)
        for b, image in enumerate(inputs):
            fill = image.mean(axis=(1, 2), keepdims=True) if nchw else image.mean(axis=(0, 1), keepdims=True)
            copies = [image]
            for r in range(g):
                for c in range(g):
                    x = image.copy()
                    rows, cols = slice(edges[r], edges[r + 1]), slice(edges[c], edges[c + 1])
                    if nchw:
                        x[:, rows, cols] = np.broadcast_to(fill, x[:, rows, cols].shape)
                    else:
                        x[rows, cols, :] = np.broadcast_to(fill, x[rows, cols, :].shape)
                    copies.append(x)
            probs = self._probabilities(np.stack(copies))[:, output_index]
            out[b] = np.maximum(probs[0] - probs[1:], 0).reshape(g, g)
        return out

    def _probabilities(self, x: np.ndarray, chunk: int = 16) -> np.ndarray:
        raw = np.concatenate([self.network.run(x[i:i + chunk], False)[0] for i in range(0, len(x), chunk)])
        return to_probabilities(raw, self.card.output_activation, 1, None)
