"""Results into a real PACS: Orthanc (Debian packages orthanc, orthanc-dicomweb), ichbatch listen, dcmtk.

Orthanc 1.10 cannot be told which address to bind, so the scenarios (tests/pacs_scenarios.py, not
collected on its own) run in a network namespace of their own whose only interface is loopback
(`unshare -n`): every server and client there can reach 127.0.0.1 and nothing else. The test here
starts pytest on them inside that namespace.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from .conftest import free_port, in_loopback_namespace, write_series

ORTHANC = shutil.which("Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
NEEDS = [("Orthanc", ORTHANC), ("storescu", shutil.which("storescu")), ("echoscu", shutil.which("echoscu"))]


def test_pacs_scenarios_in_a_loopback_only_network(tmp_path):
    missing = [name for name, path in NEEDS if path is None] + ([] if DICOMWEB_PLUGIN.exists() else ["orthanc-dicomweb"])
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (Debian: orthanc orthanc-dicomweb dcmtk)")
    assert "4 passed" in in_loopback_namespace(Path(__file__).with_name("pacs_scenarios.py"), tmp_path)


def test_destinations_are_checked_before_anything_runs(tmp_path, tiny_bundle):
    from click.testing import CliRunner

    from ichbatch.cli import main
    from ichbatch.net.deliver import Destination

    assert Destination.dimse("PACS@127.0.0.1:104").label == "PACS@127.0.0.1:104"
    for bad in ("PACS@127.0.0.1", "127.0.0.1:104", "A_TITLE_LONGER_THAN_16@h:1", "PACS@h:99999"):
        with pytest.raises(ValueError, match="AET@HOST:PORT"):
            Destination.dimse(bad)
    with pytest.raises(ValueError, match="http"):
        Destination.stow("ftp://127.0.0.1/dicom-web")
    result = CliRunner().invoke(main, ["run", str(tmp_path), "--out", str(tmp_path / "r.csv"), "--model", str(tiny_bundle),
                                       "--send-to", "PACS@127.0.0.1"])
    assert result.exit_code == 2 and "AET@HOST:PORT" in result.output
    result = CliRunner().invoke(main, ["listen", "--out", str(tmp_path / "o"), "--aet", "A_TITLE_LONGER_THAN_16",
                                       "--model", str(tiny_bundle)])
    assert result.exit_code == 2 and "1 to 16 characters" in result.output


def test_an_unreachable_pacs_leaves_files_pending_with_backoff_then_failed(tmp_path, phantom_hu):
    from ichbatch.net.deliver import Deliveries, DeliverySettings, Destination

    files = write_series(tmp_path / "s", phantom_hu[:2], study_uid=generate_uid(), series_uid=generate_uid())
    dest = Destination.dimse(f"NOBODY@127.0.0.1:{free_port()}")  # nothing listens there
    queue = Deliveries(tmp_path / "q.sqlite", DeliverySettings((dest,), max_attempts=2, backoff_seconds=60))
    queue.enqueue("1.2.3", files)
    assert queue.deliver_due() == (0, 2)
    assert queue.counts() == {(dest.label, "pending"): 2}
    assert queue.deliver_due() == (0, 0)  # not due again before its backoff
    queue.retry_now()
    assert queue.deliver_due() == (0, 2)
    assert queue.counts() == {(dest.label, "failed"): 2}  # the second attempt was the last
    assert all(f.exists() for f in files) and all("not established" in row[5] for row in queue.unsent())
    queue.close()
