"""Model bundles, safe loading, import of a binary model, TTA, batch invariance, CAM, backends."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ichbatch.errors import BundleError
from ichbatch.infer import Predictor
from ichbatch.model.bundle import load_bundle, read_card
from ichbatch.model.gradcam import CamExplainer
from ichbatch.model.inputs import model_input
from ichbatch.preprocess import tta_transforms, tta_views

from .conftest import TINY_SIZE


def _hu_batch(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(-1024, 200, (n, TINY_SIZE, TINY_SIZE)).astype(np.int16)


def test_bundle_round_trip_keeps_weights(tiny_bundle):
    from ichbatch.model.resnet import build_resnet50

    bundle = load_bundle(str(tiny_bundle))
    card = read_card(tiny_bundle)
    assert card.weights_sha256 and len(card.weights_sha256) == 64
    reference = build_resnet50(TINY_SIZE, 6, seed=3)  # the fixture's weights, before the float16 round trip
    for a, b in zip(bundle.model.weights, reference.weights):
        assert np.allclose(np.asarray(a.numpy(), np.float32), b.numpy(), atol=1e-3, rtol=1e-3)
    assert (tiny_bundle / "weights.npz").stat().st_size < 60e6


def test_sha256_mismatch_is_rejected(tiny_bundle, tmp_path):
    import shutil

    copy = tmp_path / "tampered"
    shutil.copytree(tiny_bundle, copy)
    with open(copy / "weights.npz", "r+b") as fh:
        fh.seek(200)
        fh.write(b"\x00\x01\x02\x03")
    with pytest.raises(BundleError, match="sha256"):
        load_bundle(str(copy))


def test_missing_and_unknown_bundles_are_clear(tmp_path):
    with pytest.raises(BundleError, match="no model bundle named 'nope'"):
        load_bundle("nope")
    (tmp_path / "model.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(str(tmp_path))


def test_unsafe_keras_model_is_rejected(tmp_path):
    import keras

    from ichbatch.model.importer import import_keras_model

    inp = keras.Input((64, 64, 3))
    out = keras.layers.Lambda(lambda x: x * 2.0)(inp)
    out = keras.layers.Dense(1, activation="sigmoid")(keras.layers.GlobalAveragePooling2D()(out))
    path = tmp_path / "lambda.keras"
    keras.Model(inp, out).save(path)
    with pytest.raises(BundleError, match="safe mode"):
        import_keras_model(path, name="evil", dest=tmp_path / "models")


def _binary_model(size: int = 64):
    import keras

    keras.utils.set_random_seed(1)
    inp = keras.Input((size, size, 3))
    x = keras.layers.Conv2D(8, 3, activation="relu")(inp)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inp, keras.layers.Dense(1, activation="sigmoid")(x))


def test_import_binary_single_output_model(tmp_path):
    from ichbatch.aggregate import aggregate
    from ichbatch.model.importer import import_keras_model

    path = tmp_path / "colab.h5"
    _binary_model().save(path)
    folder = import_keras_model(path, name="colab-binary", dest=tmp_path / "models", windows="brain,brain,brain",
                                trained_on="an earlier Colab project")
    card = json.loads((folder / "model.json").read_text())
    assert card["outputs"] == ["any"] and card["architecture"] == "keras" and card["input_size"] == 64
    bundle = load_bundle(str(folder))
    probs = Predictor(bundle, tta=2, batch_size=4).predict(_hu_batch(3))
    assert probs.shape == (3, 1)
    agg = aggregate(probs, bundle.card.outputs, bundle.card.labels, bundle.card.thresholds)
    assert agg.scores["any"] is not None and agg.scores["subdural"] is None and agg.flags["epidural"] is None


def test_tta_views_shape_and_identity_first():
    x = np.random.default_rng(0).random((3, 32, 32, 3)).astype(np.float32)
    views = np.asarray(tta_views(x, 8))
    assert views.shape == (24, 32, 32, 3)
    assert np.allclose(views[:3], x)
    assert np.allclose(views[3:6], x[:, :, ::-1, :])  # hflip
    assert [t[0] for t in tta_transforms(2)] == ["identity", "hflip"]


def test_tta_probabilities_are_the_mean_of_the_views(tiny_bundle):
    from ichbatch.model.inputs import channel_ops

    bundle = load_bundle(str(tiny_bundle))
    hu = _hu_batch(2, seed=4)
    averaged = Predictor(bundle, tta=4, batch_size=2).predict(hu)
    views = tta_views(channel_ops(hu[:, None], bundle.card.input_spec), 4)
    per_view = np.asarray(bundle.model.predict_on_batch(np.asarray(views))).reshape(4, 2, 6)
    assert np.allclose(averaged, per_view.mean(axis=0), atol=1e-5)


def test_batch_size_does_not_change_results(tiny_bundle):
    bundle = load_bundle(str(tiny_bundle))
    hu = _hu_batch(5, seed=1)
    one = np.concatenate([Predictor(bundle, 2, 1).predict(hu[i : i + 1]) for i in range(5)])
    big = Predictor(bundle, 2, 32).predict(hu)
    assert np.allclose(one, big, atol=1e-5)


def test_cam_equals_gradient_gradcam(tiny_bundle):
    bundle = load_bundle(str(tiny_bundle))
    explainer = CamExplainer(bundle.model)
    assert explainer.mode == "cam"
    x = np.random.default_rng(2).random((2, TINY_SIZE, TINY_SIZE, 3)).astype(np.float32)
    cam, grad = explainer.maps(x, 0), explainer.gradcam(x, 0)
    assert np.allclose(cam, grad, atol=1e-3)


def test_cam_peak_lies_on_planted_bright_region():
    """Head weights set to pick out the features of a bright patch: the map must peak on that patch."""
    import keras

    from ichbatch.model.resnet import FEATURE_LAYER, HEAD_LAYER, build_resnet50

    size = 128
    model = build_resnet50(size, 6, seed=5)
    img = np.full((1, size, size, 3), 0.2, np.float32)
    img[0, 48:80, 16:48] = 1.0  # the planted region, centred on feature cell (2, 1)'s field: pixel (64, 32)
    feats = keras.Model(model.inputs, model.get_layer(FEATURE_LAYER).output).predict_on_batch(img)[0]
    w = feats[2, 1] - feats.reshape(-1, feats.shape[-1]).mean(axis=0)
    kernel, bias = model.get_layer(HEAD_LAYER).get_weights()
    kernel[:, 0] = w
    model.get_layer(HEAD_LAYER).set_weights([kernel, bias])
    heat = CamExplainer(model).maps(img, 0)[0]
    r, c = np.unravel_index(np.argmax(heat), heat.shape)
    assert 48 <= r < 80 and 16 <= c < 48, (r, c)  # on the patch (a feature cell is 32 px)


@pytest.mark.parametrize("layer, cell", [("conv3_block4_out", (6, 9)), ("conv4_block6_out", (4, 3))])
def test_feature_cells_are_drawn_at_their_receptive_field_centres(layer, cell):
    """Where a ResNet feature cell looks (the centroid of d cell / d input) is where the upsampled map
    puts it: pixel stride * j, half a cell up and left of where a plain image resize would."""
    import keras
    import tensorflow as tf

    from ichbatch.model.gradcam import normalise_and_upsample
    from ichbatch.model.resnet import build_resnet50

    size = 128
    model = build_resnet50(size, 6, seed=4)
    lower = keras.Model(model.inputs, model.get_layer(layer).output)
    x = tf.convert_to_tensor(np.random.default_rng(0).random((1, size, size, 3)).astype(np.float32))
    with tf.GradientTape() as tape:
        tape.watch(x)
        feats = lower(x, training=False)
        score = tf.reduce_sum(feats[0, cell[0], cell[1]])
    sensitivity = np.abs(tape.gradient(score, x).numpy()[0]).sum(axis=-1)
    stride = size // feats.shape[1]
    ys, xs = np.mgrid[0:size, 0:size]
    centroid = np.array([(sensitivity * ys).sum(), (sensitivity * xs).sum()]) / sensitivity.sum()
    expected = stride * np.array(cell)
    assert np.abs(centroid - expected).max() < stride / 4, (centroid, expected)
    onehot = np.zeros((1, *feats.shape[1:3]), np.float32)
    onehot[0, cell[0], cell[1]] = 1.0
    heat = normalise_and_upsample(onehot, size, corner_aligned=True)[0]
    assert np.unravel_index(np.argmax(heat), heat.shape) == tuple(expected)


def test_cam_layer_from_the_card_gives_finer_gradient_maps(tiny_bundle, tmp_path):
    import shutil

    from ichbatch.pipeline import Engine, RunSettings

    copy = tmp_path / "finer"
    shutil.copytree(tiny_bundle, copy)
    card = json.loads((copy / "model.json").read_text())
    card["cam_layer"] = "conv3_block4_out"
    (copy / "model.json").write_text(json.dumps(card))
    explainer = Engine(RunSettings(model=str(copy), tta=1)).explainer
    assert explainer.mode == "gradcam" and explainer.lower.output.shape[1] == TINY_SIZE // 8
    x = np.random.default_rng(3).random((2, TINY_SIZE, TINY_SIZE, 3)).astype(np.float32)
    heat = explainer.maps(x, 0)
    assert heat.shape == (2, TINY_SIZE, TINY_SIZE) and heat.max() == pytest.approx(1.0, abs=0.05)
    card["cam_layer"] = "no_such_layer"
    (copy / "model.json").write_text(json.dumps(card))
    with pytest.raises(BundleError, match="cam_layer 'no_such_layer'"):
        load_bundle(str(copy))


def test_tensorflow_and_jax_backends_agree(tiny_bundle):
    """Same weights, same inputs: predictions and gradient Grad-CAM maps agree across backends."""
    pytest.importorskip("jax")
    hu = _hu_batch(3, seed=9)
    script = (
        "import sys, numpy as np; from ichbatch.model.bundle import load_bundle; from ichbatch.infer import Predictor;"
        "from ichbatch.model.gradcam import CamExplainer, cam_raw; b = load_bundle(sys.argv[1]);"
        "hu = np.load(sys.argv[2]); x = np.clip((hu[..., None].astype(np.float32) + 1024) / 1300, 0, 1).repeat(3, -1);"
        "e = CamExplainer(b.model, 'conv3_block4_out');"
        "p = Predictor(b, 2, 4); probs = p.predict(hu); CamExplainer(b.model).maps(x, 1);"  # the CAM shortcut's forward
        "np.savez(sys.argv[3], probs=probs, after_maps=p.predict(hu), raw=cam_raw(e.lower, e.upper, x, 1),"
        "         hires=cam_raw(e.lower, e.upper, x, 1, 'hirescam'))"
    )
    np.save(tiny_bundle.parent / "hu.npy", hu)
    results = {}
    for backend in ("tensorflow", "jax"):
        env = {**os.environ, "KERAS_BACKEND": backend, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
        target = tiny_bundle.parent / f"{backend}.npz"
        out = subprocess.run([sys.executable, "-c", script, str(tiny_bundle), str(tiny_bundle.parent / "hu.npy"),
                              str(target)], env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        results[backend] = dict(np.load(target))
    tf_out, jax_out = results["tensorflow"], results["jax"]
    assert tf_out["probs"].shape == (3, 6) and tf_out["raw"].shape == (3, TINY_SIZE // 8, TINY_SIZE // 8)
    assert np.allclose(tf_out["probs"], jax_out["probs"], atol=2e-3)
    # The heat maps' model shares the predictor's layers: running it must leave the predictor working
    # (under JAX, Keras' predict_on_batch donated the shared weights' buffers and broke it).
    for out in (tf_out, jax_out):
        assert np.allclose(out["after_maps"], out["probs"], atol=1e-6)
    for key in ("raw", "hires"):
        scale = np.abs(tf_out[key]).max()
        assert scale > 0 and np.allclose(tf_out[key], jax_out[key], atol=0.02 * scale), key


def test_mixed_bfloat16_path_tracks_float32(tiny_bundle):
    """The GPU default (bfloat16 compute) checked on the CPU: same decisions, small differences."""
    hu = _hu_batch(4, seed=6)
    full = Predictor(load_bundle(str(tiny_bundle)), 1, 4).predict(hu)
    bundle16 = load_bundle(str(tiny_bundle), precision="bfloat16")
    assert bundle16.model.layers[2].compute_dtype == "bfloat16"
    assert bundle16.model.get_layer("ich_head").compute_dtype == "float32"
    half = Predictor(bundle16, 1, 4).predict(hu)
    assert half.dtype == np.float32 and np.allclose(full, half, atol=0.05)


def test_cam_augment_averages_flipped_maps_into_a_flip_symmetric_map(tiny_bundle, tmp_path):
    import shutil

    from ichbatch.pipeline import Engine, RunSettings

    copy = tmp_path / "augmented"
    shutil.copytree(tiny_bundle, copy)
    card = json.loads((copy / "model.json").read_text())
    card.update(cam_layer="conv3_block4_out", cam_augment=["hflip", "vflip", "hvflip"])
    (copy / "model.json").write_text(json.dumps(card))
    augmented = Engine(RunSettings(model=str(copy), tta=1)).explainer
    plain = CamExplainer(augmented.model, "conv3_block4_out")
    x = np.random.default_rng(3).random((2, TINY_SIZE, TINY_SIZE, 3)).astype(np.float32)
    flipped = np.ascontiguousarray(x[:, ::-1, ::-1])
    # A map averaged over the whole flip group follows the image when it is flipped; a plain one need not.
    a, a_flipped = augmented.maps(x, 0), augmented.maps(flipped, 0)
    np.testing.assert_allclose(a_flipped, a[:, ::-1, ::-1], atol=1e-4)
    p, p_flipped = plain.maps(x, 0), plain.maps(flipped, 0)
    assert p.max() == pytest.approx(1.0, abs=0.05)
    assert np.abs(p_flipped - p[:, ::-1, ::-1]).max() > 0.05
    assert a.shape == p.shape and a.max() == pytest.approx(1.0, abs=1e-5)
    card["cam_augment"] = ["rotate"]
    (copy / "model.json").write_text(json.dumps(card))
    with pytest.raises(BundleError, match="cam_augment"):
        load_bundle(str(copy))


def test_hirescam_keeps_only_the_positions_the_score_depends_on(tiny_bundle, tmp_path):
    """A head that reads only the top-left quarter of the features: HiResCAM is zero elsewhere, while
    Grad-CAM's channel means spread weight over every position with the same features."""
    import shutil

    import keras

    from ichbatch.model.gradcam import cam_raw

    inputs = keras.Input((16, 16, 3))
    feats = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="feat")(inputs)
    quarter = keras.layers.Cropping2D(((0, 8), (0, 8)))(feats)
    outputs = keras.layers.Dense(1, activation="sigmoid")(keras.layers.GlobalAveragePooling2D()(quarter))
    model = keras.Model(inputs, outputs)
    x = np.random.default_rng(5).random((3, 16, 16, 3)).astype(np.float32)
    hires = CamExplainer(model, "feat", method="hirescam")
    assert hires.mode == "gradcam" and hires.describe() == "HiResCAM at feat"
    h = cam_raw(hires.lower, hires.upper, x, 0, "hirescam")
    g = cam_raw(hires.lower, hires.upper, x, 0, "gradcam")
    assert np.abs(h[:, :8, :8]).max() > 0
    assert np.abs(h[:, 8:, :]).max() == 0 and np.abs(h[:, :, 8:]).max() == 0
    assert np.abs(g[:, 8:, 8:]).max() > 0.1 * np.abs(g).max()
    with pytest.raises(ValueError, match="unknown class-activation method 'bogus'"):
        CamExplainer(model, "feat", method="bogus")
    copy = tmp_path / "method"
    shutil.copytree(tiny_bundle, copy)
    card = json.loads((copy / "model.json").read_text())
    card.update(cam_layer="pool1_pool", cam_method="hirescam", cam_augment=["hflip"])
    (copy / "model.json").write_text(json.dumps(card))
    assert load_bundle(str(copy)).card.cam_method == "hirescam"
    card["cam_method"] = "bogus"
    (copy / "model.json").write_text(json.dumps(card))
    with pytest.raises(BundleError, match="cam_method 'bogus'"):
        load_bundle(str(copy))


def _random_norm_statistics(model, seed: int) -> None:
    """Trained-looking batch normalisations (a fresh network's are the identity, which folds trivially)."""
    import keras

    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 1.5, n), rng.normal(0, 0.2, n), rng.normal(0, 0.3, n),
                               rng.uniform(0.3, 2.0, n)])


def test_folded_batchnorm_computes_the_same_network_and_maps():
    """The heat maps' copy of a ResNet50 has no normalisation layer left, the same outputs, and the same
    HiResCAM maps at pool1_pool (the demo card's) as the network as it was trained."""
    import keras

    from ichbatch.model.folding import fold_batchnorm
    from ichbatch.model.gradcam import cam_raw
    from ichbatch.model.resnet import build_resnet50

    model = build_resnet50(TINY_SIZE, 6, seed=4)
    _random_norm_statistics(model, 4)
    folded = fold_batchnorm(model, keep=("pool1_pool",))
    norms = [layer.name for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(norms) == 53
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in folded.layers)
    assert all(folded.get_layer(name).count_params() == 0 for name in norms)  # pass-throughs, by name
    x = np.random.default_rng(4).random((3, TINY_SIZE, TINY_SIZE, 3)).astype(np.float32)
    before, after = np.asarray(model(x)), np.asarray(folded(x))
    assert np.abs(before - 0.5).max() > 0.05  # not a network that says 0.5 to everything
    np.testing.assert_allclose(after, before, atol=1e-5)
    unfolded_lower = keras.Model(model.inputs[0], model.get_layer("pool1_pool").output)
    unfolded_upper = keras.Model(unfolded_lower.output, model.outputs[0])
    explainer = CamExplainer(model, "pool1_pool", ("hflip",), "hirescam")
    expected = cam_raw(unfolded_lower, unfolded_upper, x, 2, "hirescam")
    got = cam_raw(explainer.lower, explainer.upper, x, 2, "hirescam")
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in explainer.upper.layers)
    np.testing.assert_allclose(got, expected, atol=1e-4 * np.abs(expected).max())


def test_xla_compiled_heat_maps_equal_the_graph_ones_and_compile_once_for_smaller_studies(caplog):
    """The XLA-compiled gradient call (TensorFlow, float32) gives the maps of the plain call; a study
    with fewer key slices than the first is padded to the first one's batch, with the same maps as
    when its images came in a full batch, and larger batches to 2, 3, 4, 6, 8... times it."""
    from ichbatch.model.resnet import build_resnet50

    model = build_resnet50(TINY_SIZE, 6, seed=6)
    _random_norm_statistics(model, 6)
    compiled = CamExplainer(model, "pool1_pool", ("hflip",), "hirescam")
    plain = CamExplainer(model, "pool1_pool", ("hflip",), "hirescam", xla=False)
    assert compiled.xla and not plain.xla  # auto: the model computes in float32
    x = np.random.default_rng(6).random((4, TINY_SIZE, TINY_SIZE, 3)).astype(np.float32)
    full = compiled.maps(x[:3], 2)
    assert full.shape == (3, TINY_SIZE, TINY_SIZE) and full.max() == pytest.approx(1.0)
    # XLA and the graph pick their own float32 kernels. On AVX2 CPUs the maps (scaled to 0-1) agreed within
    # 1e-4; on an AVX-512 one (2026-12-08) within 1e-6 on average, but up to 0.02 on 0.7 % of the pixels of
    # one image, where the rounding decides whether a unit of this random network is just above zero (its
    # ReLU passes the gradient) or not. Deterministic either way, and the peak is the same pixel.
    _same_maps(full, plain.maps(x[:3], 2))
    one = compiled.maps(x[1:2], 2)  # 2 views, padded to the first call's 6
    np.testing.assert_allclose(one, full[1:2], atol=1e-5)
    _same_maps(compiled.maps(x, 4), plain.maps(x, 4))  # 8 views -> 12
    nine = np.concatenate([x, x, x[:1]])  # 18 views: three times the first call's, not padded to 24
    np.testing.assert_allclose(compiled.maps(nine, 1)[8], compiled.maps(x[:1], 1)[0], atol=1e-5)
    calls = compiled._grad_fns["fn"]  # JAX compiles per shape too, so the padding is on both backends
    assert calls.step == 6 and calls.sizes == {6, 12, 18}
    assert "XLA could not compile" not in caplog.text  # the ResNet50 compiles: no fallback to the graph


def _same_maps(got: np.ndarray, expected: np.ndarray) -> None:
    diff = np.abs(got - expected)
    assert diff.mean() < 1e-4 and (diff > 1e-3).mean() < 0.02 and diff.max() < 0.05, (diff.mean(), diff.max())
    flat = got.reshape(len(got), -1)
    assert np.array_equal(flat.argmax(1), expected.reshape(len(expected), -1).argmax(1))


def test_heat_maps_of_a_model_xla_cannot_compile_fall_back_to_the_graph_with_a_warning(caplog):
    """A user's bundle may hold an op that XLA cannot compile (here a NumPy function): its maps are then
    made as a plain TensorFlow graph, the same as with XLA off, not a failed study."""
    import keras

    if keras.backend.backend() != "tensorflow":
        pytest.skip("XLA through TensorFlow's jit_compile")
    import tensorflow as tf

    inputs = keras.Input((16, 16, 3))
    opaque = keras.layers.Lambda(
        lambda t: tf.ensure_shape(tf.numpy_function(np.copy, [t], tf.float32), (None, 16, 16, 3)))(inputs)
    feats = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="feat")(opaque)
    model = keras.Model(inputs, keras.layers.Dense(2, activation="sigmoid")(keras.layers.Flatten()(feats)))
    x = np.random.default_rng(1).random((2, 16, 16, 3)).astype(np.float32)
    compiled = CamExplainer(model, "feat", method="hirescam")
    assert compiled.xla
    with caplog.at_level("WARNING", logger="ichbatch.model.gradcam"):
        maps = compiled.maps(x, 1)
    assert "XLA could not compile" in caplog.text
    assert maps.shape == (2, 16, 16) and maps.max() == pytest.approx(1.0)
    np.testing.assert_allclose(maps, CamExplainer(model, "feat", method="hirescam", xla=False).maps(x, 1), atol=1e-6)
    caplog.clear()
    compiled.maps(x, 0)  # the graph from now on, without trying XLA again
    assert "XLA could not compile" not in caplog.text


def test_folding_leaves_alone_what_it_cannot_fold():
    """A normalisation stays where folding would change the function or a layer someone asked for."""
    import keras

    from ichbatch.model.folding import fold_batchnorm, foldable_pairs

    inputs = keras.Input((12, 12, 3))
    plain = keras.layers.Conv2D(4, 3, padding="same", use_bias=False, name="plain")(inputs)
    a = keras.layers.BatchNormalization(name="plain_bn")(plain)
    act = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="act")(a)
    b = keras.layers.BatchNormalization(name="act_bn")(act)  # after the convolution's own ReLU
    shared = keras.layers.Conv2D(4, 1, name="shared")(b)
    c = keras.layers.BatchNormalization(name="shared_bn")(shared)
    c = keras.layers.Add()([c, shared])  # the convolution's output is also used as it is
    kept = keras.layers.Conv2D(4, 1, name="kept")(c)
    d = keras.layers.BatchNormalization(name="kept_bn")(kept)
    across = keras.layers.Conv2D(4, 1, name="across")(d)
    e = keras.layers.BatchNormalization(axis=1, name="across_bn")(across)  # not the channel axis
    outputs = keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(e))
    model = keras.Model(inputs, outputs)
    _random_norm_statistics(model, 7)
    assert foldable_pairs(model, keep=("kept",)) == {"plain_bn": "plain"}
    assert set(foldable_pairs(model)) == {"plain_bn", "kept_bn"}
    folded = fold_batchnorm(model, keep=("kept",))
    assert folded.get_layer("plain").use_bias  # the normalisation's shift became a bias
    x = np.random.default_rng(7).random((2, 12, 12, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(folded(x)), np.asarray(model(x)), atol=1e-5)
    copy = keras.models.clone_model(folded)  # the folded model serialises like any other
    assert folded.get_layer("plain_bn").dtype_policy.name == copy.get_layer("plain_bn").dtype_policy.name
    nothing = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Flatten()(inputs)))
    assert fold_batchnorm(nothing) is nothing


def test_scores_and_heat_maps_share_one_folded_copy_of_current_weights(tiny_bundle):
    """The predictor's network is folded, the explainer reuses that copy, and a copy folded before the
    weights changed is not handed out again."""
    import keras

    from ichbatch.model.folding import fold_batchnorm

    bundle = load_bundle(str(tiny_bundle))
    _random_norm_statistics(bundle.model, 8)
    predictor = Predictor(bundle, 1, 4)
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in predictor.serving.layers[-1].layers)
    explainer = CamExplainer(bundle.model, "pool1_pool", (), "hirescam")
    explainer.lower  # noqa: B018 - builds the halves
    assert explainer.model is fold_batchnorm(bundle.model) is predictor.serving.layers[-1]
    hu = _hu_batch(3, seed=8)
    x = model_input(hu[:, None], bundle.card.input_spec)
    np.testing.assert_allclose(predictor.predict(hu), np.asarray(bundle.model(x)), atol=1e-5)
    _random_norm_statistics(bundle.model, 9)
    again = fold_batchnorm(bundle.model)
    assert again is not explainer.model
    np.testing.assert_allclose(np.asarray(again(x)), np.asarray(bundle.model(x)), atol=1e-5)


def test_folded_copy_of_a_mixed_precision_network_stores_weights_in_the_compute_dtype(tiny_bundle):
    """Under mixed bfloat16 the copy keeps convolution weights in bfloat16 (what each call would cast them
    to), the float32 head stays float32, and the outputs match the network as loaded."""
    from ichbatch.model.folding import fold_batchnorm

    bundle = load_bundle(str(tiny_bundle), precision="bfloat16")
    _random_norm_statistics(bundle.model, 10)
    folded = fold_batchnorm(bundle.model)
    assert str(folded.get_layer("conv2_block1_1_conv").kernel.dtype) == "bfloat16"
    assert str(folded.get_layer("ich_head").kernel.dtype) == "float32"
    x = np.random.default_rng(10).random((3, TINY_SIZE, TINY_SIZE, 3)).astype(np.float32)
    expected = np.asarray(bundle.model(x), np.float32)
    assert np.abs(expected - 0.5).max() > 0.05
    np.testing.assert_allclose(np.asarray(folded(x), np.float32), expected, atol=0.02)
