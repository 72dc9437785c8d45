"""Shared fixtures: DICOM written by pydicom, a small real Keras bundle, paths to shared real data."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Keras bundles run in Keras here unless a test asks for onnxruntime (tests/test_onnx.py does): with
# tf2onnx installed, "auto" would export every test bundle to ONNX first.
os.environ.setdefault("ICHBATCH_RUNTIME", "keras")

from ichbatch.synth import ct_slice_dataset, make_phantom  # noqa: E402

REALDATA = Path(__file__).resolve().parents[1].parent / "shared" / "realdata"
TINY_SIZE = 64


def free_port() -> int:
    """A TCP port free on 127.0.0.1 just now (tests bind and talk to the loopback address only)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


LOOPBACK_ENV = "ICHBATCH_LOOPBACK_NETNS"


def in_loopback_namespace(scenarios: Path, tmp_path: Path, timeout: int = 1200) -> str:
    """Run a scenarios module with pytest in a network namespace whose only interface is loopback
    (`unshare -n`): every server and client there can reach 127.0.0.1 and nothing else. Skips where
    such a namespace cannot be made; fails with the inner output when a scenario fails."""
    import shutil
    import subprocess
    import sys

    missing = [tool for tool in ("unshare", "ip") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (Debian: util-linux iproute2)")
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a loopback-only network namespace here ({probe.stderr.strip()})")
    inner_cmd = (f"ip link set lo up && exec {sys.executable} -m pytest -q -n 0 -p no:cacheprovider "
                 f"--basetemp={tmp_path / 'inner'} {scenarios}")
    run = subprocess.run(["unshare", "-n", "sh", "-c", inner_cmd], capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, LOOPBACK_ENV: "1"}, cwd=Path(__file__).resolve().parents[1])
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    last = run.stdout.strip().splitlines()[-1]
    assert "skipped" not in last, run.stdout[-2000:]
    return last


def jax_without_tensorflow(folder: Path) -> dict[str, str]:
    """The environment of a lent GPU machine for a subprocess: Keras on JAX, TensorFlow not installed
    (an import hook makes it unimportable; Keras' preprocessing layers look for it in sys.modules)."""
    site = folder / "no-tensorflow"
    site.mkdir(parents=True, exist_ok=True)
    (site / "sitecustomize.py").write_text(
        "import sys\n"
        "class NoTensorFlow:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('tensorflow', 'tf2onnx'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}')\n"
        "sys.meta_path.insert(0, NoTensorFlow())\n")
    paths = [str(site), str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.pathsep.join(paths),
            "ICHBATCH_CACHE": str(folder / "cache")}  # compiled programs are kept: not in the home folder


def realdata(*parts: str) -> Path:
    path = REALDATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared real data not present: {path} (see ../shared/realdata/MANIFEST.md)")
    return path


def write_series(folder: Path, hu: np.ndarray, *, study_uid: str, series_uid: str, names=None, **kwargs) -> list[Path]:
    """One file per slice, slice k at z = 5k mm, in the given (or shuffled hex) file names."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(hu))
    paths = []
    for k in rng.permutation(len(hu)):
        ds = ct_slice_dataset(hu[k], z=5.0 * k, instance_number=int(len(hu) - k), study_uid=study_uid,
                              series_uid=series_uid, **kwargs)
        path = folder / (names[k] if names else f"{rng.integers(1 << 40):010x}")
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


@pytest.fixture(scope="session")
def phantom_hu() -> np.ndarray:
    return make_phantom(np.random.default_rng(7), n_slices=12, size=96).hu


def random_bundle(folder: Path, size: int, seed: int) -> Path:
    """A real six-label ResNet50 bundle with seeded random weights, written and sha256-checked like any bundle."""
    from ichbatch.model.bundle import ModelCard, write_bundle
    from ichbatch.model.resnet import build_resnet50

    card = ModelCard(name=folder.name, version="0.1", input_size=size, trained=True,
                     trained_on="nothing (test fixture)")
    return write_bundle(folder, card, build_resnet50(size, 6, seed=seed))


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """A bundle at 64 px for the pipeline's tests."""
    return random_bundle(tmp_path_factory.mktemp("bundles") / "tiny", TINY_SIZE, seed=3)
