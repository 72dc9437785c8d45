"""A non-editable install carries the shipped bundles: the demo runs from any directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_install_runs_the_demo_from_another_directory(tmp_path):
    dist, site, elsewhere = tmp_path / "dist", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(ROOT)], check=True,
                   capture_output=True, timeout=600)
    wheel = next(dist.glob("ichbatch-*.whl"))
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)], check=True,
                   capture_output=True, timeout=600)
    env = {**os.environ, "PYTHONPATH": str(site), "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("ICHBATCH_MODELS", None)
    where = subprocess.run([sys.executable, "-c", "import ichbatch.model.locate as m; print(m.packaged_models_dir())"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(site), where  # the wheel's copy, not the checkout
    assert (Path(where) / "ich-resnet50-demo" / "weights.npz").stat().st_size > 1_000_000
    out = tmp_path / "x"
    demo = subprocess.run([sys.executable, "-m", "ichbatch.cli", "demo", "--out", str(out), "--studies", "1"],
                          cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    assert demo.returncode == 0, demo.stderr
    rows = pd.read_csv(out / "results.csv", dtype=str)
    assert list(rows["status"]) == ["ok"] and list(rows["model"]) == ["ich-resnet50-demo"]
    assert Path(rows["report_pdf"][0]).is_file()


def test_reportlab_runs_with_its_c_accelerator():
    """The install pulls reportlab's `accel` extra: without rl_accel reportlab formats every number and
    measures every string in pure Python, and a report writer takes a fifth to a third longer a study."""
    from reportlab.lib import rl_accel
    from reportlab.pdfbase.pdfmetrics import stringWidth

    assert rl_accel.fp_str.__module__ == "_rl_accel", "reportlab fell back to pure Python: install reportlab[accel]"
    assert rl_accel.fp_str(0.5, 12.25) == ".5 12.25"  # reportlab writes no leading zero
    assert stringWidth("ICH", "Helvetica", 10) > 0
