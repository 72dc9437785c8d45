"""`ichbatch run --engine ray` on a real local Ray cluster (tests/ray_scenarios.py, run inside a
network namespace whose only interface is loopback, so nothing the cluster does can leave 127.0.0.1),
and the checks made before a cluster is touched."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from click.testing import CliRunner

from ichbatch.cli import main

from .conftest import in_loopback_namespace


def test_ray_scenarios_in_a_loopback_only_network(tmp_path):
    if importlib.util.find_spec("ray") is None:
        pytest.skip("needs Ray: pip install 'ichbatch[ray]'")
    assert "2 passed" in in_loopback_namespace(Path(__file__).with_name("ray_scenarios.py"), tmp_path)


def test_an_address_without_the_ray_engine_is_a_usage_error(tmp_path, tiny_bundle):
    result = CliRunner().invoke(main, ["run", str(tmp_path), "--out", str(tmp_path / "r.csv"), "--model",
                                       str(tiny_bundle), "--address", "127.0.0.1:6379"])
    assert result.exit_code == 2 and "--engine ray" in result.output
    assert not (tmp_path / "r.csv").exists()


def test_an_unreachable_cluster_is_a_clear_fatal_error(tmp_path, tiny_bundle):
    if importlib.util.find_spec("ray") is None:
        pytest.skip("needs Ray")
    from .conftest import free_port

    result = CliRunner().invoke(main, ["run", str(tmp_path), "--out", str(tmp_path / "r.csv"), "--model",
                                       str(tiny_bundle), "--engine", "ray", "--address", f"127.0.0.1:{free_port()}"])
    assert result.exit_code == 3 and "nothing answers at 127.0.0.1:" in result.output, result.output
    assert "ray start --head" in result.output
