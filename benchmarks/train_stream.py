"""Streaming training at two data-set sizes: peak memory must not grow with the number of slices.

    python benchmarks/train_stream.py [--sizes 500 5000] [--input-size 64] [--epochs 2]

Writes an RSNA-layout folder (ID_*.dcm at 256x256 from generated phantoms, 25 slices per patient, and a
stage_2_train.csv) of each size, then runs `ichbatch train --source rsna --cache DIR` on it in a fresh
process and samples the resident memory of that process (and, separately, of it with its decoder
processes) every 0.1 s. Slices/s is training slices times epochs over the wall time of the whole
command (index, decoding, every epoch, validation, writing the bundle); with --epochs 2 the second
epoch reads the decoded slices from the cache.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
LABELS = ("any", "epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural")
PER_PATIENT = 25


def write_rsna(folder: Path, n: int, seed: int) -> Path:
    from pydicom.uid import generate_uid

    from ichbatch.config import SUBTYPES
    from ichbatch.synth import ct_slice_dataset, draw_subtypes, make_phantom

    data = folder / "stage_2_train"
    data.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    rows = ["ID,Label"]
    k = 0
    while k < n:
        ph = make_phantom(rng, n_slices=PER_PATIENT, size=256, subtypes=draw_subtypes(rng))
        study, patient = generate_uid(), f"PAT{k // PER_PATIENT:06d}"
        for s in range(min(PER_PATIENT, n - k)):
            image_id = f"ID_{k:09x}"
            ct_slice_dataset(ph.hu[s], z=5.0 * s, study_uid=study, patient_id=patient).save_as(
                data / f"{image_id}.dcm", enforce_file_format=True)
            present = {t: int(t in ph.masks and bool(ph.masks[t][s].any())) for t in SUBTYPES}
            present["any"] = int(any(present.values()))
            rows.extend(f"{image_id}_{label},{present[label]}" for label in LABELS)
            k += 1
    (folder / "stage_2_train.csv").write_text("\n".join(rows) + "\n")
    return data


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def train_once(folder: Path, args: argparse.Namespace) -> tuple[float, float, float]:
    """(wall s, peak RSS of the main process MB, peak RSS with its decoder processes MB)."""
    cmd = [sys.executable, "-m", "ichbatch.cli", "train", "--source", "rsna", "--data", str(folder / "stage_2_train"),
           "--labels", str(folder / "stage_2_train.csv"), "--out", str(folder / "model"), "--cache",
           str(folder / "cache"), "--input-size", str(args.input_size), "--epochs", str(args.epochs),
           "--batch-size", str(args.batch_size)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak_main = peak_all = 0.0
    while proc.poll() is None:
        main = _rss_mb(proc.pid)
        peak_main = max(peak_main, main)
        peak_all = max(peak_all, main + sum(_rss_mb(c) for c in _children(proc.pid)))
        time.sleep(0.1)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"training failed:\n{proc.stderr.read()[-3000:] if proc.stderr else ''}")
    return wall, peak_main, peak_all


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs=2, default=[500, 5000])
    parser.add_argument("--input-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            folder = Path(tmp) / f"n{n}"
            write_rsna(folder, n, seed=n)
            results[n] = train_once(folder, args)
    small, large = args.sizes
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; ichbatch train --source "
          f"rsna --cache, {args.input_size} px, batch {args.batch_size}, {args.epochs} epoch(s), 256 px DICOM slices")
    for n, (wall, main_mb, all_mb) in results.items():
        rate = 0.8 * n * args.epochs / wall  # the 80% training split, every epoch, over the whole command
        print(f"{n:6d} slices: {wall:7.1f} s, {rate:6.1f} training slices/s, peak RSS {main_mb:6.0f} MB (main), "
              f"{all_mb:6.0f} MB (with decoders)")
    print(f"ratio {large}/{small} slices: peak RSS main {results[large][1] / results[small][1]:.2f}, with decoders "
          f"{results[large][2] / results[small][2]:.2f}")


if __name__ == "__main__":
    main()
