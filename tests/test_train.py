"""`train` for one short epoch on tiny data from each of the three sources."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import cv2
import numpy as np
import pandas as pd
import pydicom
from click.testing import CliRunner
from pydicom.uid import generate_uid

from ichbatch.cli import main
from ichbatch.model.bundle import load_bundle
from ichbatch.train import group_split
from ichbatch.synth import ct_slice_dataset, make_phantom

from .conftest import random_bundle

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
                                       "--phantom-slices", "8", "--val-fraction", "0.25", "--max-minutes", "60",
                                       *COMMON])
    assert result.exit_code == 0, result.output
    assert "stopping after" not in result.output  # a budget that is not reached changes nothing
    assert "run eagerly" not in result.output  # 24 steps: traced into a graph
    _check_bundle(out, ("any", "epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural"))
    card = json.loads((out / "model.json").read_text())
    assert "synthetic phantoms" in card["trained_on"] and "anatomy" in card["trained_on"]  # the default generator
    # Fitted at training time on the validation studies: the calibration and the domain check.
    assert "validation split" in card["calibration"]["fitted_on"] and set(card["calibration"]["params"]) == set(card["outputs"])
    assert "validation split" in card["domain"]["fitted_on"] and card["domain"]["held_out_studies"] >= 2
    assert load_bundle(str(out)).domain is not None and "domain check fitted on" in result.output
    record = card["metrics"]["training"]  # how it was made: the command, the machine, the time it took
    assert record["command"].startswith("ichbatch ") and "--phantom-studies 16" in record["command"]
    assert record["starting_point"] == "random initialisation" and "cores" in record["machine"]
    assert float(record["wall_minutes"]) >= 0


def test_a_time_budget_ends_fitting_within_the_first_epoch_and_still_writes_the_bundle(tmp_path):
    """Spent during the first step: fitting stops there (not after an epoch that may take many minutes
    on a lent GPU's first, compiling, epoch), that part-epoch is validated, and the bundle is written."""
    out = tmp_path / "budget-model"
    args = ["train", "--source", "phantoms", "--phantoms", "ellipse", "--out", str(out), "--phantom-studies", "8",
            "--phantom-slices", "8", "--val-fraction", "0.25", "--input-size", "32", "--batch-size", "8"]
    result = CliRunner().invoke(main, [*args, "--epochs", "2", "--max-minutes", "0.0001"])
    assert result.exit_code == 0, result.output
    assert "stopping in epoch 1 after step 1 of 6: the 0.0001-minute budget is spent" in result.output
    assert "Epoch 2/2" not in result.output and "val_loss" in result.output
    card = json.loads((out / "model.json").read_text())
    assert card["metrics"]["epochs_run"] == 1 and "--max-minutes 0.0001" in card["metrics"]["training"]["command"]
    assert load_bundle(str(out)).card.trained


def test_a_long_epoch_says_how_far_it_has_got(tmp_path):
    """Keras' per-epoch lines say nothing until an epoch ends; the heartbeat does, every `every` seconds."""
    import keras

    from ichbatch.train import _heartbeat

    said: list[str] = []
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    x = np.zeros((12, 4), np.float32)
    model.fit(x, x[:, :1], batch_size=4, epochs=2, verbose=0, callbacks=[_heartbeat(said.append, every=0.0)])
    assert [line.split(",")[0] for line in said] == [f"epoch {e}: step {s} of 3" for e in (1, 2) for s in (1, 2, 3)]
    assert all(line.endswith(" s into the epoch") for line in said)
    said.clear()
    model.fit(x, x[:, :1], batch_size=4, epochs=1, verbose=0, callbacks=[_heartbeat(said.append)])
    assert said == []  # a short epoch: nothing between Keras' own lines


def _rsna_folder(tmp_path, n=6, patients=3):
    data = tmp_path / "stage_2_train"
    data.mkdir()
    hu = make_phantom(np.random.default_rng(0), n_slices=n, size=64, subtypes=("subdural",)).hu
    rows = []
    for k in range(n):
        image_id = f"ID_{k:08x}"
        ds = ct_slice_dataset(hu[k], z=5.0 * k, study_uid=generate_uid(), patient_id=f"PAT{k % patients}")
        ds.save_as(data / f"{image_id}.dcm", enforce_file_format=True)
        for label in ("any", "epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural"):
            rows.append({"ID": f"{image_id}_{label}", "Label": int(label in ("any", "subdural") and k % 2 == 0)})
    pd.DataFrame(rows).to_csv(tmp_path / "stage_2_train.csv", index=False)
    return ["--source", "rsna", "--data", str(data), "--labels", str(tmp_path / "stage_2_train.csv")]


def test_train_on_rsna_layout(tmp_path):
    out = tmp_path / "rsna-model"
    result = CliRunner().invoke(main, ["train", *_rsna_folder(tmp_path), "--out", str(out), *COMMON])
    assert result.exit_code == 0, result.output
    assert "6 slices from 3 patients" in result.output and "slice reads failed" not in result.output
    assert "1 training step in all: run eagerly" in result.output and "retracing" not in result.output
    _check_bundle(out, ("any", "epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural"))
    assert not (tmp_path / "rsna-model.checkpoints").exists()  # removed once the bundle is written


def test_slice_cache_serves_later_epochs_and_trainings_instead_of_the_files(tmp_path):
    rsna = _rsna_folder(tmp_path, n=8, patients=4)
    cache = tmp_path / "cache"
    first = CliRunner().invoke(main, ["train", *rsna, "--out", str(tmp_path / "a"), "--cache", str(cache), *COMMON])
    assert first.exit_code == 0, first.output
    (flags,) = cache.glob("*.done")
    assert flags.read_bytes() == b"\x01" * 8 and next(cache.glob("*.u8")).stat().st_size == 8 * 32 * 32 * 3
    for path in (tmp_path / "stage_2_train").iterdir():  # headers intact, pixels gone
        ds = pydicom.dcmread(path)
        ds.PixelData = ds.PixelData[:10]
        ds.save_as(path)
    cached = CliRunner().invoke(main, ["train", *rsna, "--out", str(tmp_path / "b"), "--cache", str(cache), *COMMON])
    assert cached.exit_code == 0 and "slice reads failed" not in cached.output, cached.output
    uncached = CliRunner().invoke(main, ["train", *rsna, "--out", str(tmp_path / "c"), *COMMON])
    assert uncached.exit_code == 0 and "slice reads failed and trained as black images" in uncached.output


def test_slice_cache_is_complete_only_when_every_slice_is_written(tmp_path):
    from ichbatch.train_stream import SliceCache

    cache = SliceCache(tmp_path, "k", 3, 4)
    images = (np.arange(3 * 48) % 251).astype(np.uint8).reshape(3, 4, 4, 3)
    cache.write(0, images[0])
    cache.write(2, images[2])
    assert not cache.complete()
    cache.write(1, images[1])
    assert cache.complete() and all(np.array_equal(cache.read(i), images[i]) for i in range(3))
    cache.close()
    again = SliceCache(tmp_path, "k", 3, 4)  # reopened with the same shape: kept
    assert again.complete() and np.array_equal(again.read(1), images[1])
    again.close()
    assert not SliceCache(tmp_path, "k", 4, 4).complete()  # another size of source: started afresh


def test_a_killed_training_resumes_at_its_last_finished_epoch(tmp_path):
    rsna = _rsna_folder(tmp_path, n=12, patients=4)
    out, checkpoints = tmp_path / "model", tmp_path / "ck"
    cmd = [sys.executable, "-m", "ichbatch.cli", "train", *rsna, "--out", str(out), "--checkpoints", str(checkpoints),
           "--input-size", "32", "--batch-size", "4", "--epochs", "4"]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not (checkpoints / "stage0" / "training_metadata.json").exists() and time.monotonic() < deadline:
        assert first.poll() is None, first.communicate()[0][-3000:]
        time.sleep(0.05)
    first.kill()
    first.communicate()
    assert not (out / "model.json").exists()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    epochs = [int(m) for m in re.findall(r"^Epoch (\d+)/4", again.stdout + again.stderr, re.M)]
    assert epochs and epochs[0] >= 2 and epochs[-1] == 4, epochs  # picked up after the saved epoch
    assert (out / "model.json").exists() and not checkpoints.exists()


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
    phantoms = ["--source", "phantoms", "--phantoms", "ellipse", "--phantom-studies", "3", "--phantom-slices", "8", *COMMON,
                "--batch-size", "8"]  # two steps an epoch: each stage is short
    # A written bundle is a starting point like a trained one (and costs no training run in CI).
    first = random_bundle(tmp_path / "first", 32, seed=5)
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

