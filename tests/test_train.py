"""`train` for one short epoch on tiny data from each of the three sources."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pandas as pd
from click.testing import CliRunner
from pydicom.uid import generate_uid

from ichbatch.cli import main
from ichbatch.model.bundle import load_bundle
from ichbatch.train import group_split
from ichbatch.synth import ct_slice_dataset, make_phantom

COMMON = ["--input-size", "32", "--epochs", "1", "--batch-size", "4"]


def _check_bundle(folder, outputs):
    card = json.loads((folder / "model.json").read_text())
    assert card["trained"] is True and tuple(card["outputs"]) == outputs and card["input_size"] == 32
    assert "validation" in card["metrics"] and (folder / "training_curves.png").read_bytes()[:4] == b"\x89PNG"
    bundle = load_bundle(str(folder))  # sha256 and shapes check out
    assert bundle.model.outputs[0].shape[-1] == len(outputs)


def test_group_split_keeps_groups_whole():
    groups = np.repeat(np.array([f"p{i}" for i in range(10)]), 3)
    tr, va = group_split(groups, 0.2, seed=0)
    assert set(groups[tr]).isdisjoint(groups[va]) and va.sum() == 6 and tr.sum() == 24


def test_train_on_phantoms(tmp_path):
    out = tmp_path / "phantom-model"
    result = CliRunner().invoke(main, ["train", "--source", "phantoms", "--out", str(out), "--phantom-studies", "16",
                                       "--phantom-slices", "8", "--val-fraction", "0.25", *COMMON])
    assert result.exit_code == 0, result.output
    _check_bundle(out, ("any", "epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural"))
    card = json.loads((out / "model.json").read_text())
    assert "synthetic phantoms" in card["trained_on"]
    # Fitted at training time on the validation studies: the calibration and the domain check.
    assert "validation split" in card["calibration"]["fitted_on"] and set(card["calibration"]["params"]) == set(card["outputs"])
    assert "validation split" in card["domain"]["fitted_on"] and card["domain"]["held_out_studies"] >= 2
    assert load_bundle(str(out)).domain is not None and "domain check fitted on" in result.output


def test_train_on_rsna_layout(tmp_path):
    data = tmp_path / "stage_2_train"
    data.mkdir()
    hu = make_phantom(np.random.default_rng(0), n_slices=6, size=64, subtypes=("subdural",)).hu
    rows = []
    for k in range(6):
        image_id = f"ID_{k:08x}"
        ds = ct_slice_dataset(hu[k], z=5.0 * k, study_uid=generate_uid(), patient_id=f"PAT{k % 3}")
        ds.save_as(data / f"{image_id}.dcm", enforce_file_format=True)
        for label in ("any", "epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural"):
            rows.append({"ID": f"{image_id}_{label}", "Label": int(label in ("any", "subdural") and k % 2 == 0)})
    pd.DataFrame(rows).to_csv(tmp_path / "stage_2_train.csv", index=False)
    out = tmp_path / "rsna-model"
    result = CliRunner().invoke(main, ["train", "--source", "rsna", "--data", str(data), "--labels",
                                       str(tmp_path / "stage_2_train.csv"), "--out", str(out), *COMMON])
    assert result.exit_code == 0, result.output
    assert "6 slices from 3 patients" in result.output
    _check_bundle(out, ("any", "epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural"))


def test_train_on_image_folder(tmp_path):
    rng = np.random.default_rng(1)
    for cls in ("hemorrhage", "normal"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(3):
            img = (rng.random((40, 40, 3)) * 255).astype(np.uint8)
            cv2.imwrite(str(tmp_path / "imgs" / cls / f"pt{i}{cls[0]}_{i}.png"), img)
    out = tmp_path / "binary-model"
    result = CliRunner().invoke(main, ["train", "--source", "folder", "--data", str(tmp_path / "imgs"), "--out", str(out), *COMMON])
    assert result.exit_code == 0, result.output
    _check_bundle(out, ("any",))


def test_train_reports_missing_data_clearly(tmp_path):
    result = CliRunner().invoke(main, ["train", "--source", "folder", "--data", str(tmp_path), "--out", str(tmp_path / "m")])
    assert result.exit_code == 2 and "hemorrhage" in result.output


def test_recalibrated_batchnorm_statistics_match_the_data():
    import keras

    from ichbatch.model.resnet import build_resnet50
    from ichbatch.train import recalibrate_batchnorm

    model = build_resnet50(32, 1, seed=0)
    x = (np.random.default_rng(0).random((16, 32, 32, 3)) * 255).astype(np.uint8)
    recalibrate_batchnorm(model, x, batch_size=8, seed=0)
    first_bn = model.get_layer("conv1_bn")
    conv = keras.Model(model.inputs, model.get_layer("conv1_conv").output)
    acts = np.asarray(conv.predict(x.astype(np.float32) / 255.0, verbose=0))
    # The mean of per-batch means is the data mean; the stored mean must match it closely.
    assert np.allclose(np.asarray(first_bn.moving_mean), acts.mean(axis=(0, 1, 2)), atol=1e-4)
    assert first_bn.momentum == 0.99  # restored afterwards


def _conv1_kernel(folder):
    import keras

    return keras.ops.convert_to_numpy(load_bundle(str(folder)).model.get_layer("conv1_conv").kernel)


def test_init_schedules_choose_which_layers_train(tmp_path):
    phantoms = ["--source", "phantoms", "--phantom-studies", "3", "--phantom-slices", "8", *COMMON]
    first = tmp_path / "first"
    assert CliRunner().invoke(main, ["train", "--out", str(first), *phantoms]).exit_code == 0
    init = ["--init", str(first / "weights.npz")]
    runs = {"transfer": [], "continue": ["--init-schedule", "continue", "--vertical-flip", "--lr", "1e-3"]}
    for name, extra in runs.items():
        result = CliRunner().invoke(main, ["train", "--out", str(tmp_path / name), *phantoms, *init, *extra])
        assert result.exit_code == 0, result.output
    start = _conv1_kernel(first)
    # transfer: head, then conv5 - the stem keeps its weights; continue: every layer moves.
    np.testing.assert_array_equal(_conv1_kernel(tmp_path / "transfer"), start)
    assert np.abs(_conv1_kernel(tmp_path / "continue") - start).max() > 1e-3


def test_vertical_flip_augmentation_is_optional():
    from ichbatch.train import _augmenter

    x = np.arange(16, dtype=np.float32).reshape(1, 4, 4, 1).repeat(64, axis=0)
    for vertical in (False, True):
        flip = _augmenter(seed=0, vertical_flip=vertical)[0]
        out = np.asarray(flip(x, training=True))
        upside_down = [np.array_equal(o, x[0, ::-1]) or np.array_equal(o, x[0, ::-1, ::-1]) for o in out]
        assert any(upside_down) == vertical
