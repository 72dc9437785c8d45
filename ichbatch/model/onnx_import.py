"""`ichbatch models import FILE.onnx --card card.yaml`: check a model against its card and make it a bundle.

The card (JSON or YAML, the fields of model.json) says how to feed the model and read its outputs. The
importer refuses, naming each mismatch, a model whose declared input or outputs disagree with the card,
then runs a test input prepared exactly as a run would prepare it and checks what comes back (shape,
finite values, probabilities where the card says the model applies a sigmoid or softmax).

For heat maps without gradients it looks for the head most CNNs end in: global average pooling, then a
linear layer. When found, the pooled feature maps become an extra output of the bundle's model.onnx and
the linear layer's weights go to cam.npz, so a run gets class activation maps and pooled features (for
the domain check) from the same forward pass. Otherwise the bundle uses occlusion maps.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BundleError
from .bundle import ModelCard, sha256, write_bundle
from .onnx_model import OnnxNetwork, providers

PASS_THROUGH = {"Identity", "Flatten", "Reshape", "Squeeze", "Dropout", "Cast"}
CAM_FILE = "cam.npz"
MODEL_FILE = "model.onnx"


def read_card_file(path: Path) -> dict[str, Any]:
    """A card as JSON, or as YAML (.yaml, .yml) for cards written by hand."""
    text = Path(path).read_text()
    try:
        if Path(path).suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:
        raise BundleError(f"{path}: not a readable card ({type(exc).__name__}: {exc})") from exc
    if not isinstance(data, dict):
        raise BundleError(f"{path}: a card is a mapping of fields (as in model.json)")
    return data


def import_onnx(model_file: Path, card_data: dict[str, Any], folder: Path) -> Path:
    """Validate model_file against the card and write the bundle into folder (atomically)."""
    try:
        import onnx
    except ImportError as exc:
        raise BundleError("importing ONNX models needs the onnx package: pip install 'ichbatch[onnx]'") from exc
    data = {k: v for k, v in card_data.items() if k not in ("weights_sha256", "domain")}
    card = ModelCard.from_json({**data, "architecture": "onnx", "weights": MODEL_FILE})
    try:
        model = onnx.load(str(model_file))
        onnx.checker.check_model(model)
    except Exception as exc:
        raise BundleError(f"{model_file}: not a valid ONNX model ({type(exc).__name__}: {exc})") from exc
    head = find_cam_head(model.graph)
    with tempfile.TemporaryDirectory() as tmp:
        extra: dict[str, Path] = {}
        cam: dict[str, Any] = {"method": "occlusion"}
        if head is not None:
            features, layout, kernel = head
            if features not in {o.name for o in model.graph.output}:  # already there when re-importing an export
                dims = ["batch", "features_1", "features_2", "features_3"]  # rank 4, sizes left to the runtime
                model.graph.output.append(onnx.helper.make_tensor_value_info(features, onnx.TensorProto.FLOAT, dims))
            np.savez(Path(tmp) / CAM_FILE, kernel=kernel.astype(np.float32))
            extra[CAM_FILE] = Path(tmp) / CAM_FILE
            cam = {"method": "cam", "features": features, "feature_layout": layout, "file": CAM_FILE,
                   "sha256": sha256(Path(tmp) / CAM_FILE),
                   "corner_aligned": bool((card_data.get("cam") or {}).get("corner_aligned", False))}
        onnx.save(model, str(Path(tmp) / MODEL_FILE))
        card = replace(card, cam=cam)
        problems = check_against_card(Path(tmp) / MODEL_FILE, card, None if head is None else head[2])
        if problems:
            raise BundleError(f"{model_file} does not fit its card: " + "; ".join(problems))
        return write_bundle(folder, card, weights_source=Path(tmp) / MODEL_FILE, extra=extra)


def check_against_card(path: Path, card: ModelCard, kernel: np.ndarray | None) -> list[str]:
    """Declared shapes first; where they agree, a test input through the model."""
    import onnxruntime as ort

    from .inputs import model_input

    try:
        session = ort.InferenceSession(str(path), providers=providers())
    except Exception as exc:
        return [f"onnxruntime cannot load it ({exc})"]
    network = OnnxNetwork(session, card, kernel)
    problems = network.shape_problems()
    if problems:
        return problems
    spec = card.input_spec
    x = model_input(np.repeat(_test_slices(spec.size, spec.depth)[None], 2, axis=0), spec)
    try:
        raw, maps = network.run(x, features=network.feature_name is not None)
    except Exception as exc:
        return [f"the model fails on a test input of shape {list(x.shape)} ({type(exc).__name__}: {exc})"]
    return _output_problems(raw, card) + _feature_problems(maps, kernel)


def _output_problems(raw: np.ndarray, card: ModelCard) -> list[str]:
    if not np.all(np.isfinite(raw)):
        return ["the model's outputs on a test input are not all finite"]
    act = card.output_activation
    if act in ("sigmoid", "softmax") and (raw.min() < -1e-4 or raw.max() > 1 + 1e-4):
        return [f"output_activation is {act!r}, but the outputs on a test input range from {raw.min():.3g} to "
                f"{raw.max():.3g}, which are not probabilities; if the model ends in logits, say 'logits' or "
                "'softmax-logits'"]
    if act == "softmax" and not np.allclose(raw.sum(axis=1), 1, atol=1e-3):
        return ["output_activation is 'softmax', but the outputs on a test input do not sum to 1"]
    return []


def _feature_problems(maps: np.ndarray | None, kernel: np.ndarray | None) -> list[str]:
    if maps is None or kernel is None:
        return []
    if maps.ndim != 4 or kernel.shape[0] not in (maps.shape[1], maps.shape[3]):
        return [f"the pooled feature maps {list(maps.shape)} do not match the classifier's {kernel.shape[0]} inputs"]
    return []


def _test_slices(size: int, depth: int) -> np.ndarray:
    """A head-like HU slice (brain in a skull, in air), repeated for each context slice: (D, S, S) int16."""
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - size / 2, xx - size / 2) / (size / 2)
    hu = np.where(r < 0.8, 35, -1000) + np.where((r >= 0.72) & (r < 0.8), 1000, 0)
    return np.repeat(hu.astype(np.int16)[None], depth, axis=0)


def find_cam_head(graph: Any) -> tuple[str, str, np.ndarray] | None:
    """(feature maps tensor, their layout, classifier kernel (C, outputs)) where the first output comes from
    global average pooling and a linear layer (an activation and reshapes in between are fine)."""
    from onnx import numpy_helper

    producer = {out: node for node in graph.node for out in node.output}
    inits = {i.name: i for i in graph.initializer}

    def const(name: str) -> np.ndarray | None:
        while name not in inits and name in producer and producer[name].op_type in ("Identity", "Cast"):
            name = producer[name].input[0]
        if name in inits:
            return numpy_helper.to_array(inits[name])
        node = producer.get(name)
        if node is not None and node.op_type == "Constant":
            return numpy_helper.to_array(node.attribute[0].t)
        return None

    def skip(name: str, ops: set[str]) -> str:
        while name in producer and producer[name].op_type in ops:
            name = producer[name].input[0]
        return name

    name = skip(graph.output[0].name, PASS_THROUGH | {"Sigmoid", "Softmax"})
    linear = _linear(producer.get(name), producer, const)
    if linear is None:
        return None
    pooled_input, kernel = linear
    pool = producer.get(skip(pooled_input, PASS_THROUGH))
    layout = _pool_layout(pool, const)
    if pool is None or layout is None:
        return None
    return pool.input[0], layout, kernel


def _linear(node: Any, producer: dict[str, Any], const: Any) -> tuple[str, np.ndarray] | None:
    """(input, kernel (C, n)) of a Gemm, MatMul or MatMul + bias."""
    if node is None:
        return None
    if node.op_type == "Add":
        inner = next((producer.get(i) for i in node.input if const(i) is None), None)
        return _linear(inner, producer, const) if inner is not None and inner.op_type == "MatMul" else None
    if node.op_type == "MatMul":
        kernel = const(node.input[1])
        return (node.input[0], kernel) if kernel is not None and kernel.ndim == 2 else None
    if node.op_type == "Gemm":
        attrs = {a.name: a.i for a in node.attribute if a.name in ("transA", "transB")}
        kernel = const(node.input[1])
        if kernel is None or attrs.get("transA", 0):
            return None
        return node.input[0], (kernel.T if attrs.get("transB", 0) else kernel)
    return None


def _pool_layout(node: Any, const: Any) -> str | None:
    """'nchw' or 'nhwc' when node averages a 4-D tensor over its spatial axes, else None."""
    if node is None:
        return None
    if node.op_type == "GlobalAveragePool":
        return "nchw"
    if node.op_type != "ReduceMean":
        return None
    axes_attr = next((list(a.ints) for a in node.attribute if a.name == "axes"), None)
    axes = axes_attr if axes_attr is not None else (
        list(const(node.input[1]).ravel()) if len(node.input) > 1 and const(node.input[1]) is not None else None)
    if axes is None:
        return None
    spatial = sorted(int(a) % 4 for a in axes)
    return "nchw" if spatial == [2, 3] else "nhwc" if spatial == [1, 2] else None
