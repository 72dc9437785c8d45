"""`ichbatch run --engine ray` on a real local Ray cluster (tests/ray_scenarios.py, run inside a
network namespace whose only interface is loopback, so nothing the cluster does can leave 127.0.0.1),
and the checks made before a cluster is touched."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pydicom
import pytest
from click.testing import CliRunner

from ichbatch import __version__
from ichbatch.cli import main
from ichbatch.distributed import StudyScorer, decode_study
from ichbatch.domain import Status
from ichbatch.discover import discover
from ichbatch.pipeline import select
from ichbatch.study import RunSettings
from ichbatch.synth import synth_studies

from .conftest import in_loopback_namespace


def test_ray_scenarios_in_a_loopback_only_network(tmp_path):
    if importlib.util.find_spec("ray") is None:
        pytest.skip("needs Ray: pip install 'ichbatch[ray]'")
    assert "5 passed" in in_loopback_namespace(Path(__file__).with_name("ray_scenarios.py"), tmp_path)


def test_an_address_without_the_ray_engine_is_a_usage_error(tmp_path, tiny_bundle):
    result = CliRunner().invoke(main, ["run", str(tmp_path), "--out", str(tmp_path / "r.csv"), "--model",
                                       str(tiny_bundle), "--address", "127.0.0.1:6379"])
    assert result.exit_code == 2 and "--engine ray" in result.output
    assert not (tmp_path / "r.csv").exists()


def test_studies_per_call_without_the_ray_engine_is_a_usage_error(tmp_path, tiny_bundle):
    result = CliRunner().invoke(main, ["run", str(tmp_path), "--out", str(tmp_path / "r.csv"), "--model",
                                       str(tiny_bundle), "--studies-per-call", "4"])
    assert result.exit_code == 2 and "--engine ray" in result.output, result.output
    assert not (tmp_path / "r.csv").exists()


def test_an_unreachable_cluster_is_a_clear_fatal_error(tmp_path, tiny_bundle):
    if importlib.util.find_spec("ray") is None:
        pytest.skip("needs Ray")
    from .conftest import free_port

    result = CliRunner().invoke(main, ["run", str(tmp_path), "--out", str(tmp_path / "r.csv"), "--model",
                                       str(tiny_bundle), "--engine", "ray", "--address", f"127.0.0.1:{free_port()}"])
    assert result.exit_code == 3 and "nothing answers at 127.0.0.1:" in result.output, result.output
    assert "ray start --head" in result.output


def test_a_model_replica_scores_a_group_of_studies_as_it_scores_each_alone(tmp_path, tiny_bundle):
    """What a Ray actor does with one call for several studies (`--studies-per-call`), in this process:
    the same results as one call per study, each study's file issues back with it, and a study whose
    decoding failed for good failed alone."""
    synth_studies(tmp_path, 3, seed=5, n_slices=12, size=96)
    broken = sorted(tmp_path.glob("study_*/*"))[:2]  # two slices of the first study: it runs without them
    for path in broken:
        ds = pydicom.dcmread(path)
        ds.PixelData = ds.PixelData[:64]
        ds.save_as(path)
    settings = RunSettings(model=str(tiny_bundle), tta=1, batch_size=8, workers=1)
    choices = [c for c in select(discover([tmp_path]), settings.rules) if c.series]
    assert len(choices) == 3
    scorer = StudyScorer(settings, __version__)
    decoded = [decode_study(choice, scorer.engine.bundle.card.input_size) for choice in choices]
    alone = [scorer.score_decoded([choice], [d]) for choice, d in zip(choices, decoded)]
    together = scorer.score_decoded(choices, decoded)
    assert len(together) == 3 * len(choices)
    for n, (result, _, issues) in enumerate(alone):
        grouped, images, grouped_issues = together[3 * n:3 * n + 3]
        assert grouped.study.study_uid == result.study.study_uid == choices[n].study.study_uid
        assert (grouped.status, grouped.message, grouped.key_slices) == (result.status, result.message,
                                                                          result.key_slices)
        np.testing.assert_allclose(grouped.slice_probs, result.slice_probs, atol=1e-5)
        assert grouped_issues == issues and len(images.thumbnails) == grouped.n_slices
    hit = next(n for n, c in enumerate(choices) if str(broken[0]) in {ref.path for ref in c.slices})
    assert sorted(issue.path for issue in together[3 * hit + 2]) == sorted(str(path) for path in broken)
    assert all(together[3 * n + 2] == [] for n in range(3) if n != hit)
    assert together[3 * hit].status is Status.OK and "2 slice(s) could not be decoded" in together[3 * hit].message

    lost = scorer.score_decoded(choices, [decoded[0], "failed on a Ray worker while decoding: X", decoded[2]])
    assert lost[3].status is Status.FAILED and lost[3].message == "failed on a Ray worker while decoding: X"
    assert lost[3].study.study_uid == choices[1].study.study_uid and lost[5] == []
    for n in (0, 2):
        np.testing.assert_allclose(lost[3 * n].slice_probs, together[3 * n].slice_probs, atol=1e-5)
    scorer.engine.close()
