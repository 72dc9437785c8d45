"""Does a study cost the same in a small run and a large one? Peak memory and seconds per study.

    python benchmarks/scale.py --small 16 --large 100 --prefill 100000

Generates a few 512x512 phantom studies and clones them under new UIDs up to each size, then runs the
whole `ichbatch run` path (discover, select, decode, infer, heat maps, PDF reports, store and CSV) in a
fresh process per case and prints its peak RSS and seconds per study:
- small and large: peak RSS at the large size should be within 5% of the small one;
- small, with the results CSV already holding --prefill rows: seconds per study within 15% of empty.
Research use only; the figures are for the machine it runs on.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def clone_studies(base: Path, dest: Path, n: int) -> None:
    """n studies under dest, copies of the generated ones under base with fresh Study/Series/SOP UIDs."""
    import pydicom
    from pydicom.uid import generate_uid

    studies: dict[str, list[Path]] = {}
    for path in sorted(base.rglob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        studies.setdefault(ds.StudyInstanceUID, []).append(path)
    sources = list(studies.values())
    for k in range(n):
        study, series = generate_uid(), generate_uid()
        for j, path in enumerate(sources[k % len(sources)]):
            ds = pydicom.dcmread(path)
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            out = dest / f"s{k:05d}" / f"{j:04d}.dcm"
            out.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(out, enforce_file_format=True)


def prefill(csv: Path, rows: int) -> None:
    """A results store and CSV that already hold `rows` studies (one transaction, then one CSV build)."""
    from ichbatch.report.csv_report import COLUMNS
    from ichbatch.report.store import ResultsStore

    store = ResultsStore(csv, COLUMNS)
    row = {c: "" for c in COLUMNS} | {"status": "ok", "model": "earlier run", "notice": "RESEARCH USE ONLY"}
    with store.transaction() as db:
        db.executemany("INSERT INTO studies VALUES(?,?,?,?,?,?,?,?,?)",
                       ((f"2.25.{k}", k, "ok", "x", "m", json.dumps(row | {"study_uid": f"2.25.{k}"}), "[]", "pre", 0.0)
                        for k in range(1, rows + 1)))
    store.studies.rebuild()
    store.close()


def child(inputs: Path, csv: Path, model: str) -> None:
    """One run in this process: the figures are this process's own."""
    from ichbatch.pipeline import process_folder
    from ichbatch.report.outputs import OutputSettings, OutputWriter
    from ichbatch.study import Engine, RunSettings

    settings = RunSettings(model=model, tta=1)
    engine = Engine(settings)  # loaded before the clock starts: model load is not a per-study cost
    done: list[float] = []
    start = time.perf_counter()
    with OutputWriter(OutputSettings(csv=csv, reports=csv.parent / "reports")) as writer:
        summary = process_folder([inputs], settings, sink=writer, engine=engine,
                                 on_result=lambda _: done.append(time.perf_counter()))
    seconds = time.perf_counter() - start
    engine.close()  # joins the decoder processes, so their peak shows in RUSAGE_CHILDREN
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # An upper bound: ru_maxrss of a spawned child also counts the fork of this process before exec.
    decoders_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    # Steady state: from the first study written to the last, so one-time compilation and warm-up
    # (the same in every case) do not hide what a study costs.
    steady = (done[-1] - done[0]) / (len(done) - 1) if len(done) > 1 else seconds
    print(json.dumps({"studies": summary.studies, "seconds": seconds, "steady": steady, "peak_rss_mb": peak_mb,
                      "decoder_peak_mb": decoders_mb}))


def run_case(inputs: Path, csv: Path, model: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, "--child", str(inputs), str(csv), model], check=True,
                         capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", type=int, default=16)
    parser.add_argument("--large", type=int, default=100)
    parser.add_argument("--prefill", type=int, default=100_000, help="rows already in the CSV for the third case")
    parser.add_argument("--slices", type=int, default=16)
    parser.add_argument("--model", default=None)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(Path(args.child[0]), Path(args.child[1]), args.child[2])
        return

    from ichbatch.model.locate import default_model
    from ichbatch.synth import Encoding, synth_studies

    model = args.model or default_model()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        synth_studies(root / "base", 4, seed=31, n_slices=args.slices, size=512, encoding=Encoding())
        clone_studies(root / "base", root / "small", args.small)
        clone_studies(root / "base", root / "large", args.large)
        small = run_case(root / "small", root / "o1" / "results.csv", model)
        large = run_case(root / "large", root / "o2" / "results.csv", model)
        prefill(root / "o3" / "results.csv", args.prefill)
        filled = run_case(root / "small", root / "o3" / "results.csv", model)
    print(f"model {model}; studies of {args.slices} slices at 512x512, uncompressed, with PDF reports; "
          f"{os.cpu_count()} cores")
    for name, r in ((f"{args.small} studies", small), (f"{args.large} studies", large),
                    (f"{args.small} studies, CSV holding {args.prefill:,} rows", filled)):
        print(f"{name:40s} peak RSS {r['peak_rss_mb']:7.0f} MB (decoders at most {r['decoder_peak_mb']:.0f} MB each)  "
              f"{r['steady']:6.2f} s/study steady ({r['seconds'] / r['studies']:.2f} s/study with warm-up)")
    print(f"peak RSS {args.large} / {args.small} studies: {large['peak_rss_mb'] / small['peak_rss_mb']:.3f}")
    print(f"steady s/study, {args.large} / {args.small} studies: {large['steady'] / small['steady']:.3f}")
    print(f"steady s/study with {args.prefill:,} rows / empty: {filled['steady'] / small['steady']:.3f}")


if __name__ == "__main__":
    main()
