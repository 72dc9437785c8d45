"""Screenshot-style augmentation (ichbatch.screenshots) and training a model that accepts images."""

from __future__ import annotations

import json

import cv2
import numpy as np
from click.testing import CliRunner

from ichbatch.cli import main
from ichbatch.images import load_image_hu
from ichbatch.screenshots import screenshot, screenshot_channels
from ichbatch.train_stream import hu_to_channels


def test_screenshots_vary_like_shared_images(phantom_hu):
    rng = np.random.default_rng(0)
    shots = [screenshot(phantom_hu[6], rng) for _ in range(30)]
    assert all(s.dtype == np.uint8 for s in shots)
    assert any(s.ndim == 3 for s in shots) and any(s.ndim == 2 for s in shots)  # RGB and grey
    assert any(s.shape[0] != s.shape[1] for s in shots)  # cropped, rescaled, bordered
    plain = (np.clip((phantom_hu[6] - 0) / 80, 0, 1) * 255).astype(np.uint8)
    assert sum(s.shape[:2] == plain.shape for s in shots) < len(shots)


def test_training_reads_a_screenshot_exactly_as_run_reads_the_image_file(tmp_path, phantom_hu):
    shot = screenshot(phantom_hu[6], np.random.default_rng(5))
    path = tmp_path / "shot.png"
    cv2.imwrite(str(path), shot)
    from_file = hu_to_channels(load_image_hu(str(path)), 64)
    assert np.array_equal(screenshot_channels(phantom_hu[6], 64, np.random.default_rng(5)), from_file)


def test_a_model_trained_on_anatomy_phantoms_with_screenshots_says_so_and_is_run_on_images(tmp_path, phantom_hu):
    out = tmp_path / "model"
    result = CliRunner().invoke(main, ["train", "--source", "phantoms", "--out", str(out), "--phantom-studies", "8",
                                       "--phantom-slices", "8", "--phantoms", "anatomy", "--screenshots", "0.5", "--input-size", "32",
                                       "--epochs", "1", "--batch-size", "8"])
    assert result.exit_code == 0, result.output
    card = json.loads((out / "model.json").read_text())
    assert card["eligibility"]["windowed_images"] is True and "50% of slices as screenshots" in card["trained_on"]
    assert "anatomy phantom studies" in card["trained_on"]
    images = tmp_path / "images"
    images.mkdir()
    cv2.imwrite(str(images / "web.jpg"), screenshot(phantom_hu[6], np.random.default_rng(1)))
    run = CliRunner().invoke(main, ["run", str(images), "--out", str(tmp_path / "r.csv"), "--model", str(out),
                                    "--no-reports"])
    assert run.exit_code == 0, run.output
    row = (tmp_path / "r.csv").read_text().splitlines()
    assert "web.jpg" in row[1] and ",ok," in row[1]
