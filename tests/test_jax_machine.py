"""What runs on a lent GPU machine, checked here: Keras on JAX with TensorFlow not installed.

Those machines have JAX and no TensorFlow (README: Performance, On a GPU); CI never has a GPU, so these
tests run the same code on JAX's CPU backend in a subprocess where TensorFlow cannot be imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
from pydicom.uid import generate_uid
from pypdf import PdfReader

from .conftest import jax_without_tensorflow, write_series
from .test_train import COMMON, _check_bundle


def test_a_run_with_reports_works_on_jax_without_tensorflow_as_on_a_lent_gpu(tmp_path, tiny_bundle, phantom_hu):
    """The GPU machines have JAX and no TensorFlow: a whole run there (decoding, the model, heat maps,
    CSV, PDF) must not need it. The same study gives the same row as on TensorFlow."""
    pytest.importorskip("jax")
    folder = tmp_path / "in"
    write_series(folder, phantom_hu[:9], study_uid=generate_uid(), series_uid=generate_uid())
    rows = {}
    for backend, env in (("jax", jax_without_tensorflow(tmp_path)), ("tensorflow", dict(os.environ))):
        env["ICHBATCH_RUNTIME"] = "keras"  # the same runtime on both (auto may pick onnxruntime here)
        out = tmp_path / backend
        cmd = [sys.executable, "-m", "ichbatch", "run", str(folder), "--out", str(out / "r.csv"), "--model",
               str(tiny_bundle), "--tta", "2"]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        rows[backend] = pd.read_csv(out / "r.csv").iloc[0]
        pdfs = list(out.rglob("*.pdf"))
        assert len(pdfs) == 1 and "NOT FOR DIAGNOSIS" in PdfReader(pdfs[0]).pages[0].extract_text().upper()
    jax_row, tf_row = rows["jax"], rows["tensorflow"]
    assert jax_row["status"] == tf_row["status"] == "ok"
    assert jax_row["key_slices"] == tf_row["key_slices"]
    assert abs(float(jax_row["prob_any"]) - float(tf_row["prob_any"])) < 2e-3


def test_training_runs_on_jax_without_tensorflow_as_on_a_lent_gpu(tmp_path):
    """The GPU machines have JAX and no TensorFlow: the whole training (augmentation layers, fit,
    checkpoints, calibration, the domain check, the bundle) runs there, and its bundle loads here."""
    pytest.importorskip("jax")
    env = jax_without_tensorflow(tmp_path)
    out = tmp_path / "jax-model"
    cmd = [sys.executable, "-m", "ichbatch", "train", "--source", "phantoms", "--phantoms", "ellipse", "--out", str(out),
           "--phantom-studies", "8", "--phantom-slices", "8", "--val-fraction", "0.5", *COMMON]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "No module named 'tensorflow'" not in done.stderr
    card = json.loads((out / "model.json").read_text())
    assert "on jax" in card["metrics"]["training"]["machine"]
    assert "validation split" in card["calibration"]["fitted_on"] and "validation split" in card["domain"]["fitted_on"]
    _check_bundle(out, ("any", "epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural"))


def test_heat_maps_on_jax_pad_a_smaller_or_larger_batch_to_few_shapes_with_the_same_maps(tmp_path):
    """jax.jit compiles once per input shape, as XLA does under TensorFlow: on JAX too a call with fewer
    key slices than the first is padded to the first one's batch (the maps of a group of studies
    finished together, to a few multiples of it), and each image's map is the one it gets alone. The
    same for CAM maps (no gradients): on the GPU lease of 2026-11-27 their unpadded calls compiled anew
    for each size of group inside a timed pass."""
    pytest.importorskip("jax")
    script = (
        "import json, numpy as np\n"
        "from ichbatch.model.resnet import build_resnet50\n"
        "from ichbatch.model.gradcam import CamExplainer\n"
        "model = build_resnet50(64, 6, seed=6)\n"
        "e = CamExplainer(model, 'pool1_pool', ('hflip',), 'hirescam')\n"
        "x = np.random.default_rng(6).random((4, 64, 64, 3)).astype(np.float32)\n"
        "full, one, four = e.maps(x[:3], 2), e.maps(x[1:2], 2), e.maps(x, 2)\n"
        "fn = e.padded\n"
        "c = CamExplainer(model, None, ('hflip',))  # the last block, before the pooled head: CAM, no gradients\n"
        "cfull, cone, cfour = c.maps(x[:3], 2), c.maps(x[1:2], 2), c.maps(x, 2)\n"
        "print(json.dumps({'one': float(abs(one[0] - full[1]).max()), 'four': float(abs(four[:3] - full).max()),\n"
        "                  'peak': float(full.max()), 'step': fn.step, 'sizes': sorted(fn.sizes), 'mode': c.mode,\n"
        "                  'cam': float(max(abs(cone[0] - cfull[1]).max(), abs(cfour[:3] - cfull).max())),\n"
        "                  'cam_sizes': sorted(c.padded.sizes)}))\n")
    done = subprocess.run([sys.executable, "-c", script], env=jax_without_tensorflow(tmp_path),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["peak"] == pytest.approx(1.0) and got["one"] < 1e-4 and got["four"] < 1e-4
    assert got["step"] == 6 and got["sizes"] == [6, 12]
    assert got["mode"] == "cam" and got["cam"] < 1e-4 and got["cam_sizes"] == [6, 12]


def test_a_second_process_on_jax_takes_the_compiled_heat_maps_from_the_cache(tmp_path):
    """Each process compiles the model and the heat maps' batch sizes (on a GPU lease the first pass,
    which compiled them, ran at 19 slices/s, the next at 2,360): JAX's persistent cache keeps them under
    $ICHBATCH_CACHE/jax, so a second process compiles nothing new. A JAX cache folder the user chose is
    left as the user set it."""
    pytest.importorskip("jax")
    script = ("import numpy as np\n"
              "from ichbatch.model.backend import import_backend\n"
              "import_backend()\n"
              "from ichbatch.model.resnet import build_resnet50\n"
              "from ichbatch.model.gradcam import CamExplainer\n"
              "e = CamExplainer(build_resnet50(64, 6, seed=6), 'pool1_pool', (), 'hirescam')\n"
              "e.maps(np.random.default_rng(0).random((2, 64, 64, 3)).astype(np.float32), 1)\n")
    # Every compilation is kept, however short, so that the check does not hang on this machine's speed.
    env = {**jax_without_tensorflow(tmp_path), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    kept = tmp_path / "cache" / "jax"
    entries = []
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        entries.append(sorted(p.name for p in kept.iterdir()))
    assert len(entries[0]) >= 2 and entries[1] == entries[0]
    own = {**env, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "own"), "ICHBATCH_CACHE": str(tmp_path / "other")}
    done = subprocess.run([sys.executable, "-c", script], env=own, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert any((tmp_path / "own").iterdir()) and not (tmp_path / "other" / "jax").exists()
