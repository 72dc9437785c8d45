"""ONNX bundles: export and import round trips, cards checked against models, heat maps without gradients.

The demo bundle is exported twice with the real command (tf2onnx underneath): NHWC as it is, and NCHW
with ImageNet normalisation folded into the card. Small ONNX graphs built here with onnx.helper stand in
for models exported from PyTorch (NCHW, Gemm heads, fixed and dynamic axes).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from ichbatch import context
from ichbatch.cli import main
from ichbatch.decode import draw_key_images
from ichbatch.domain import StudyImages, StudyResult
from ichbatch.errors import BundleError
from ichbatch.model.bundle import load_bundle, read_card
from ichbatch.model.gradcam import CamExplainer
from ichbatch.model.inputs import model_input
from ichbatch.pipeline import process_folder
from ichbatch.study import Engine, RunSettings
from ichbatch.synth import synth_studies

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
EXAMPLE_CARD = Path(__file__).resolve().parents[1] / "examples" / "cards" / "rsna-2.5d-example.yaml"


class Keep:
    """A sink that keeps each study's result and key images."""

    def __init__(self) -> None:
        self.results: dict[str, StudyResult] = {}
        self.images: dict[str, StudyImages] = {}

    def write(self, result: StudyResult, images: StudyImages) -> StudyResult:
        self.results[result.study.study_uid] = result
        self.images[result.study.study_uid] = images
        return result

    def record_file_issue(self, issue) -> None:  # type: ignore[no-untyped-def]
        pass


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Path]:
    pytest.importorskip("tf2onnx")
    root = tmp_path_factory.mktemp("onnx")
    out = {}
    for layout in ("nhwc", "nchw"):
        result = CliRunner().invoke(main, ["models", "export", "ich-resnet50-demo", "--format", "onnx",
                                           "--out", str(root / layout), "--layout", layout])
        assert result.exit_code == 0, result.output
        out[layout] = root / layout
    return out


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("studies")
    synth_studies(root, 3, seed=11, n_slices=20, size=256, p_positive=0.7, phantoms="anatomy")  # what the demo knows
    return root


def _run(model: str | Path, folder: Path) -> tuple[Keep, Engine]:
    sink = Keep()
    engine = Engine(RunSettings(model=str(model), tta=2, batch_size=8, workers=2))
    try:
        process_folder([folder], engine.settings, sink=sink, engine=engine)
    finally:
        engine.close()
    return sink, engine


def test_exported_bundles_give_the_keras_probabilities_and_heat_maps(exported, studies):
    keras_run, keras_engine = _run("ich-resnet50-demo", studies)
    for layout, folder in exported.items():
        card = read_card(folder)
        assert card.architecture == "onnx" and card.layout == layout and card.cam["method"] == "cam"
        assert card.domain is not None and card.calibration == read_card(keras_engine.bundle.path).calibration
        onnx_run, onnx_engine = _run(folder, studies)
        assert set(onnx_run.results) == set(keras_run.results) and len(keras_run.results) == 3
        for uid, want in keras_run.results.items():
            got = onnx_run.results[uid]
            assert got.status == want.status == "ok"
            for label in want.outputs:
                assert abs(got.study_probs[label] - want.study_probs[label]) < 1e-3, (layout, label)
            assert np.abs(got.slice_probs - want.slice_probs).max() < 1e-3
            assert abs(got.domain_score - want.domain_score) < 1e-2
            assert got.key_slices == want.key_slices and got.flags == want.flags
        assert "CAM" in next(iter(onnx_run.results.values())).heatmap
        # Heat maps for the same slices: the same peak, nearly the same map, against Keras' CAM at the same
        # layer (the demo card's own maps are HiResCAM at a shallow layer, which needs gradients).
        hu = np.stack([d for d in _first_slices(studies, keras_engine)])
        same_layer = CamExplainer(keras_engine.bundle.model)
        assert same_layer.mode == "cam"
        want_maps = same_layer.maps(model_input(hu, keras_engine.bundle.card.input_spec), 0)
        got_maps = onnx_engine.explainer.maps(model_input(hu, onnx_engine.bundle.card.input_spec), 0)
        for w, g in zip(want_maps, got_maps):
            assert np.unravel_index(w.argmax(), w.shape) == np.unravel_index(g.argmax(), g.shape)
        assert np.abs(want_maps - got_maps).max() < 0.02


def _first_slices(studies: Path, engine: Engine) -> list[np.ndarray]:
    from ichbatch.discover import discover
    from ichbatch.pipeline import select
    from ichbatch.pixels import load_hu
    from ichbatch.preprocess import resize_hu

    choice = select(discover([studies]), engine.settings.rules)[0]
    refs = choice.slices[3:9]
    return [resize_hu(load_hu(r).hu, engine.bundle.card.input_size)[None] for r in refs]


def test_importing_the_export_again_gives_the_same_bundle(exported, tmp_path):
    data = json.loads((exported["nchw"] / "model.json").read_text())
    (tmp_path / "card.json").write_text(json.dumps(data))
    result = CliRunner().invoke(main, ["models", "import", str(exported["nchw"] / "model.onnx"), "--card",
                                       str(tmp_path / "card.json"), "--name", "again", "--dest", str(tmp_path)])
    assert result.exit_code == 0, result.output
    again = read_card(tmp_path / "again")
    assert again.cam["features"] == data["cam"]["features"] and again.domain is None  # a domain check is fitted, not imported


def test_onnx_sessions_do_not_busy_wait_between_runs(exported):
    """Spinning threads took the cores that decoding needs between batches (benchmarks/throughput.py)."""
    session = load_bundle(str(exported["nchw"])).model.session
    assert session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"


@pytest.mark.parametrize("change, message", [
    ({"input_size": 96}, "input axis 2 is 128 in the model but 96 by the card"),
    ({"windows": [{"name": "brain", "center": 40, "width": 80}], "normalisation": "unit"},
     "input axis 1 is 3 in the model but 1 by the card"),
    ({"context": 1}, "input axis 1 is 3 in the model but 9 by the card"),
    ({"outputs": ["any"], "thresholds": {"any": 0.5}, "calibration": None}, "the model has 6 outputs, the card maps ['any']"),
    ({"output_map": [0, 1, 2, 3, 4, 9]}, "the model has 6 outputs"),
])
def test_a_card_that_disagrees_with_its_model_is_refused_naming_the_mismatch(exported, tmp_path, change, message):
    data = {**json.loads((exported["nchw"] / "model.json").read_text()), **change}
    (tmp_path / "card.json").write_text(json.dumps(data))
    result = CliRunner().invoke(main, ["models", "import", str(exported["nchw"] / "model.onnx"), "--card",
                                       str(tmp_path / "card.json"), "--dest", str(tmp_path / "models")])
    assert result.exit_code == 2
    assert message in result.output, result.output
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


def test_an_onnx_model_needs_a_card(exported, tmp_path):
    result = CliRunner().invoke(main, ["models", "import", str(exported["nhwc"] / "model.onnx"), "--dest", str(tmp_path)])
    assert result.exit_code == 2 and "needs --card" in result.output


# --- Small graphs in the shape PyTorch exports them: NCHW, Conv, GlobalAveragePool, Flatten, Gemm. ---

def _graph_model(path: Path, channels: int, size: int, outputs: int, head: str = "gap", batch: int | str = "N",
                 seed: int = 0) -> Path:
    """head 'gap': Conv 3x3 -> Relu -> GlobalAveragePool -> Flatten -> Gemm(transB) (a CNN classifier);
    'patch': AveragePool 4x4 -> Flatten -> Gemm reading one 4x4 patch of channel 0 (no pooling head)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, channels, size, size])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, outputs])
    if head == "gap":
        inits = [numpy_helper.from_array(rng.normal(0, 0.3, (16, channels, 3, 3)).astype(np.float32), "conv_w"),
                 numpy_helper.from_array(rng.normal(0, 0.3, (outputs, 16)).astype(np.float32), "fc_w"),
                 numpy_helper.from_array(np.zeros(outputs, np.float32), "fc_b")]
        nodes = [helper.make_node("Conv", ["input", "conv_w"], ["c"], pads=[1, 1, 1, 1]),
                 helper.make_node("Relu", ["c"], ["r"]),
                 helper.make_node("GlobalAveragePool", ["r"], ["p"]),
                 helper.make_node("Flatten", ["p"], ["f"]),
                 helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["logits"], transB=1)]
    else:
        cells = size // 4
        w = np.zeros((outputs, channels, cells, cells), np.float32)
        w[:, 0, 2, 5] = 4.0  # only the patch at rows 8-11, columns 20-23 counts
        inits = [numpy_helper.from_array(w.reshape(outputs, -1), "fc_w")]
        nodes = [helper.make_node("AveragePool", ["input"], ["a"], kernel_shape=[4, 4], strides=[4, 4]),
                 helper.make_node("Flatten", ["a"], ["f"]),
                 helper.make_node("Gemm", ["f", "fc_w"], ["logits"], transB=1)]
    graph = helper.make_graph(nodes, "torch_like", [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


def _card(**fields) -> dict:  # type: ignore[no-untyped-def]
    base = {"name": "torch-like", "version": "1.0.0", "input_size": 32, "layout": "nchw",
            "outputs": ["any"], "thresholds": {"any": 0.5}, "output_activation": "logits",
            "trained_on": "nothing: a graph built by a test", "normalisation": {"range": [0, 1], "mean": [0.485, 0.456, 0.406],
                                                                             "std": [0.229, 0.224, 0.225]}}
    return {**base, **fields}


def test_the_example_rsna_card_imports_a_2_5d_model_and_runs_it(tmp_path, phantom_hu):
    import yaml

    from .conftest import write_series
    from pydicom.uid import generate_uid

    card = yaml.safe_load(EXAMPLE_CARD.read_text())
    assert card["context"] == 1 and card["layout"] == "nchw"
    model = _graph_model(tmp_path / "rsna.onnx", 9, card["input_size"], 6)
    result = CliRunner().invoke(main, ["models", "import", str(model), "--card", str(EXAMPLE_CARD), "--dest", str(tmp_path / "models")])
    assert result.exit_code == 0, result.output
    folder = tmp_path / "models" / card["name"]
    bundle_card = read_card(folder)
    assert bundle_card.cam["method"] == "cam" and bundle_card.cam["features"] == "r"
    write_series(tmp_path / "in", phantom_hu, study_uid=generate_uid(), series_uid=generate_uid())
    sink, engine = _run(folder, tmp_path / "in")
    (got,) = sink.results.values()
    assert got.status == "ok" and got.n_slices == len(phantom_hu)
    assert got.heatmap.startswith("CAM") and np.all(np.isfinite(got.slice_probs))
    # The same example card against a model that takes 3 channels: refused, saying how many it takes.
    three = _graph_model(tmp_path / "three.onnx", 3, card["input_size"], 6)
    result = CliRunner().invoke(main, ["models", "import", str(three), "--card", str(EXAMPLE_CARD), "--dest", str(tmp_path / "m2")])
    assert result.exit_code == 2 and "input axis 1 is 3 in the model but 9 by the card" in result.output


def test_a_fixed_batch_axis_and_probabilities_that_are_logits_are_refused(tmp_path):
    from ichbatch.model.onnx_import import import_onnx

    fixed = _graph_model(tmp_path / "fixed.onnx", 3, 32, 1, batch=1)
    with pytest.raises(BundleError, match="batch axis is fixed at 1"):
        import_onnx(fixed, _card(), tmp_path / "a")
    model = _graph_model(tmp_path / "m.onnx", 3, 32, 1, seed=5)
    with pytest.raises(BundleError, match="which are not probabilities"):
        import_onnx(model, _card(output_activation="sigmoid", normalisation={"range": [0, 255]}), tmp_path / "b")


def test_a_binary_softmax_model_maps_its_second_output_to_any(tmp_path, phantom_hu):
    from ichbatch.model.bundle import load_bundle
    from ichbatch.infer import Predictor
    from ichbatch.model.onnx_import import import_onnx

    model = _graph_model(tmp_path / "binary.onnx", 3, 32, 2, seed=2)
    folder = import_onnx(model, _card(output_activation="softmax-logits", output_map=[1]), tmp_path / "binary")
    bundle = load_bundle(str(folder))
    from ichbatch.preprocess import resize_hu

    hu = np.stack([resize_hu(s, 32) for s in phantom_hu[:4]])
    probs = Predictor(bundle, tta=1, batch_size=4).predict(hu)
    raw, _ = bundle.model.run(model_input(hu[:, None], bundle.card.input_spec), False)
    e = np.exp(raw - raw.max(axis=1, keepdims=True))
    assert probs.shape == (4, 1)
    assert np.allclose(probs[:, 0], (e / e.sum(axis=1, keepdims=True))[:, 1], atol=1e-6)


def test_a_model_without_a_pooling_head_gets_occlusion_maps_on_what_it_reads(tmp_path):
    from ichbatch.model.bundle import load_bundle
    from ichbatch.model.onnx_import import import_onnx
    from ichbatch.study import make_explainer

    model = _graph_model(tmp_path / "patch.onnx", 3, 32, 1, head="patch")
    folder = import_onnx(model, _card(normalisation="unit"), tmp_path / "patch")
    card = read_card(folder)
    assert card.cam == {"method": "occlusion"}
    explainer = make_explainer(load_bundle(str(folder)))
    assert "occlusion" in explainer.describe()
    image = np.zeros((1, 3, 32, 32), np.float32)
    image[0, :, 8:12, 20:24] = 1.0
    heat = explainer.maps(image, 0)[0]
    peak = np.unravel_index(heat.argmax(), heat.shape)
    assert 8 <= peak[0] < 12 and 20 <= peak[1] < 24, peak
    with pytest.raises(BundleError, match="exposes no feature maps"):
        load_bundle(str(folder)).model.run(image, features=True)


# --- Slice context (2.5D) ---

def test_context_neighbours_follow_position_with_edges_repeated_and_gaps_skipped():
    zs = [0.0, 5.0, 10.0, 20.0, 25.0]  # 15 mm is missing (a slice that did not decode)
    assert context.neighbours(zs, 0, 1, 5.0) == [0, 0, 1]  # edge repeated
    assert context.neighbours(zs, 2, 1, 5.0) == [1, 2, 3]  # the gap: the slice further out, not the centre
    assert context.neighbours(zs, 3, 1, 5.0) == [2, 3, 4]
    assert context.neighbours(zs, 4, 2, 5.0) == [2, 3, 4, 4, 4]
    assert context.neighbours([0.0, 2.5, 5.0, 7.5, 10.0], 2, 1, 5.0) == [0, 2, 4]  # at the card's spacing
    assert context.series_spacing([10.0, 0.0, 5.0, 5.0]) == 5.0


def _context_model(path: Path, size: int):  # type: ignore[no-untyped-def]
    """A Keras 2.5D model whose output c is the mean of input channel c (slices s-1, s, s+1)."""
    import keras

    x = keras.Input((size, size, 3))
    conv = keras.layers.Conv2D(3, 1, use_bias=False, name="ident")
    head = keras.layers.Dense(3, name="head")
    model = keras.Model(x, head(keras.layers.GlobalAveragePooling2D()(conv(x))))
    conv.set_weights([np.eye(3, dtype=np.float32).reshape(1, 1, 3, 3)])
    head.set_weights([np.eye(3, dtype=np.float32), np.zeros(3, np.float32)])
    model.save(path)
    return path


def test_a_2_5d_model_gets_its_neighbours_in_position_order_when_files_arrive_shuffled_and_one_fails(tmp_path, phantom_hu):
    import pydicom
    from pydicom.uid import generate_uid

    from ichbatch.model.bundle import ModelCard, write_bundle

    from .conftest import TINY_SIZE, write_series

    hu = phantom_hu.copy()
    for k in range(len(hu)):
        hu[k, 2:30, 2:30] = -600 + 90 * k  # each slice recognisable by its mean
    paths = write_series(tmp_path / "in", hu, study_uid=generate_uid(), series_uid=generate_uid())  # shuffled names and order
    broken = 5
    for p in paths:
        ds = pydicom.dcmread(p)
        if abs(float(ds.ImagePositionPatient[2]) - 5.0 * broken) < 1e-3:
            ds.PixelData = ds.PixelData[:100]
            ds.save_as(p)
    outputs = ("any", "epidural", "intraparenchymal")
    card = ModelCard(name="ctx", version="1", architecture="keras", input_size=TINY_SIZE, channels="hu",
                     hu_scale={"offset": 0.0, "scale": 1000.0}, context=1, outputs=outputs,
                     thresholds={o: 0.01 for o in outputs}, output_activation="logits", weights="model.keras",
                     trained_on="nothing: a model built by a test")
    folder = write_bundle(tmp_path / "ctx", card, weights_source=_context_model(tmp_path / "m.keras", TINY_SIZE))
    sink, _ = _run(folder, tmp_path / "in")
    (got,) = sink.results.values()
    assert got.status == "ok" and got.n_slices == len(hu) - 1
    z = [s.z_mm for s in got.slices]
    assert z == sorted(z) and 5.0 * broken not in z
    p = got.slice_probs
    for i in range(len(z)):
        below, above = max(i - 1, 0), min(i + 1, len(z) - 1)  # the nearest decoded slice either way, edges repeated
        assert abs(p[i, 0] - p[below, 1]) < 1e-5 and abs(p[i, 2] - p[above, 1]) < 1e-5, i
    assert len(set(np.round(p[:, 1], 5))) == len(z)  # the centre channel is each slice's own
    images = draw_key_images(sink.images[got.study.study_uid])  # as the report writer does
    assert images.key_images and all(k.gradcam is not None for k in images.key_images)


def test_context_assembly_keeps_studies_apart_and_order():
    class S:
        def __init__(self, study: int, z: float) -> None:
            self.study, self.ref_z = study, z
            self.model_input = np.full((2, 2), int(z), np.int16)

        @property
        def z(self) -> float:
            return self.ref_z

    items = [S(0, 0), S(0, 5), S(0, 10), S(1, 0), S(1, 5)]
    out = list(context.assemble(items, 1, lambda study: 5.0))
    assert [o[0] for o in out] == items
    assert [list(o[1][:, 0, 0]) for o in out] == [[0, 0, 5], [0, 5, 10], [5, 10, 10], [0, 0, 5], [0, 5, 5]]


def test_cards_describe_inputs_and_refuse_impossible_ones(tiny_bundle, tmp_path):
    data = json.loads((tiny_bundle / "model.json").read_text())
    for change, message in [({"layout": "nchw"}, "layout 'nchw' is for ONNX models"),
                            ({"normalisation": {"mean": [1, 2]}}, "mean has 2 values"),
                            ({"output_activation": "relu"}, "output_activation must be one of"),
                            ({"context": 9}, "context must be a whole number"),
                            ({"normalisation": {"std": [0]}}, "std must not contain 0")]:
        folder = tmp_path / str(len(list(tmp_path.iterdir())))
        shutil.copytree(tiny_bundle, folder)
        (folder / "model.json").write_text(json.dumps({**data, **change}))
        with pytest.raises(BundleError, match=message.replace("(", r"\(")):
            read_card(folder)


def test_a_keras_bundle_runs_in_onnxruntime_from_its_cached_export_with_its_own_heat_maps(exported, studies, tmp_path,
                                                                                         monkeypatch):
    from ichbatch.model.bundle import load_bundle
    from ichbatch.model.onnx_export import cache_folder
    from ichbatch.study import resolve_runtime

    monkeypatch.setenv("ICHBATCH_CACHE", str(tmp_path / "cache"))
    demo = load_bundle("ich-resnet50-demo")
    assert resolve_runtime("auto", "cpu", demo) == "onnx" and resolve_runtime("auto", "gpu", demo) == "keras"
    assert resolve_runtime("keras", "cpu", load_bundle(str(exported["nhwc"]))) == "onnx"  # an ONNX bundle has no other
    shutil.copytree(exported["nhwc"], cache_folder(demo))  # as `--runtime onnx` would have left it
    keras_run, _ = _run("ich-resnet50-demo", studies)
    sink = Keep()
    engine = Engine(RunSettings(model="ich-resnet50-demo", runtime="onnx", tta=2, batch_size=8, workers=2))
    try:
        process_folder([studies], engine.settings, sink=sink, engine=engine)
    finally:
        engine.close()
    assert engine.runtime == "onnx" and engine.predictor.bundle.card.architecture == "onnx"
    assert engine.bundle.card.architecture == "resnet50" and isinstance(engine.explainer, CamExplainer)
    for uid, want in keras_run.results.items():
        got = sink.results[uid]
        assert np.abs(got.slice_probs - want.slice_probs).max() < 1e-3 and got.heatmap == want.heatmap
