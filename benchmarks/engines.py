"""The local engine against the Ray engine on the same studies, in one run; and the per-stage costs that
the README's cluster estimate is built from.

    pip install -c constraints.txt -e ".[cpu,onnx,ray]"
    unshare -n sh -c 'ip link set lo up && python benchmarks/engines.py [--studies 12] [--repeats 2]
                      [--studies-per-call 4] [--header-files 4000] [--headers-only]'

(`unshare -n` as root: a network namespace whose only interface is loopback, so the Ray cluster can
reach 127.0.0.1 and nothing else.) A one-node Ray cluster is started once (`ray start --head`, node IP
127.0.0.1, every core, no dashboard), then `ichbatch run` with --engine local and --engine ray over the
same generated studies, alternated, PDF reports on. Each run's wall time includes loading the model.

Header reads: the same files' headers read on the driver (a process) and in the Ray engine's tasks,
alternated: wall time and the driver's CPU time per file, which bounds what one driver can plan.

Per-stage costs, measured in this process (decoding, files and header reads on one core; the model on
every core): reading headers (the driver's discovery, s per file), decoding (s per slice), scoring a
decoded study (model with TTA, aggregation, heat maps; s per slice), writing its files (PDF, JSON,
thumbnail; s per study) and the driver's commit to the results store (s per study). Header reads and
commits are the stages a cluster does not spread.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
RAY = Path(sys.executable).with_name("ray")


def _run(studies: Path, out: Path, args: argparse.Namespace, *extra: str) -> float:
    cmd = [sys.executable, "-m", "ichbatch.cli", "run", str(studies), "--out", str(out), "--model", args.model,
           "--tta", str(args.tta), *extra]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return seconds


def _probabilities(csv_path: Path) -> dict[str, str]:
    with csv_path.open(newline="") as f:
        return {row["study_uid"]: row["prob_any"] for row in csv.DictReader(f)}


@dataclass
class StageCosts:
    header_s: float = 0.0  # per file
    decode_s: float = 0.0  # per slice
    score_s: float = 0.0  # per slice
    files_s: float = 0.0  # per study
    commit_s: float = 0.0  # per study


def _stage_costs(studies: Path, args: argparse.Namespace) -> StageCosts:
    from ichbatch.discover import discover
    from ichbatch.distributed import StudyScorer, decode_study
    from ichbatch.pipeline import select
    from ichbatch.report.outputs import OutputSettings, OutputWriter, write_study_files
    from ichbatch.study import RunSettings

    settings = RunSettings(model=args.model, tta=args.tta)
    t = time.perf_counter()
    discovery = discover([studies])
    costs = StageCosts(header_s=(time.perf_counter() - t) / (len(discovery.instances) + len(discovery.issues)))
    choices = [c for c in select(discovery, settings.rules) if c.series]
    scorer = StudyScorer(settings, __import__("ichbatch").__version__)
    size = scorer.engine.bundle.card.input_size
    n = 0
    with tempfile.TemporaryDirectory() as tmp:
        outputs = OutputSettings(csv=Path(tmp) / "r.csv", reports=Path(tmp) / "reports")
        with OutputWriter(outputs) as writer:
            for choice in choices:
                t = time.perf_counter()
                decoded = decode_study(choice, size)  # what a Ray decoding task runs
                costs.decode_s += time.perf_counter() - t
                t = time.perf_counter()
                result, images, _ = scorer.score_decoded([choice], [decoded])
                costs.score_s += time.perf_counter() - t
                t = time.perf_counter()
                files = write_study_files(result, images, outputs)
                costs.files_s += time.perf_counter() - t
                t = time.perf_counter()
                writer.commit(files)
                costs.commit_s += time.perf_counter() - t
                n += len(decoded)
    scorer.engine.close()
    costs.decode_s, costs.score_s = costs.decode_s / n, costs.score_s / n
    costs.files_s, costs.commit_s = costs.files_s / len(choices), costs.commit_s / len(choices)
    return costs


def _header_costs(folder: Path, port: int, repeats: int) -> tuple[int, dict[str, tuple[float, float]]]:
    """Files read, and per way of reading their headers (on the driver, or in the Ray engine's tasks) the
    median wall time and driver CPU time (every thread of this process, Ray's own included) per file."""
    import ray

    from ichbatch.discover import discover
    from ichbatch.distributed import header_reader

    ways = ["driver", "ray tasks"]
    wall: dict[str, list[float]] = {way: [] for way in ways}
    cpu: dict[str, list[float]] = {way: [] for way in ways}
    files = 0
    ray.init(address=f"127.0.0.1:{port}", log_to_driver=False, configure_logging=False,
             _node_ip_address="127.0.0.1")
    try:
        reader = header_reader(ray, 2)
        for k in range(repeats):
            for way in ways if k % 2 == 0 else ways[::-1]:
                t, c = time.perf_counter(), time.process_time()
                found = discover([folder], examiner=reader if way == "ray tasks" else None)
                wall[way].append(time.perf_counter() - t)
                cpu[way].append(time.process_time() - c)
                files = len(found.instances) + len(found.issues)
    finally:
        ray.shutdown()
    return files, {way: (statistics.median(wall[way]) / files, statistics.median(cpu[way]) / files) for way in ways}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ich-resnet50-demo")
    parser.add_argument("--studies", type=int, default=12)
    parser.add_argument("--slices", type=int, default=24)
    parser.add_argument("--tta", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--studies-per-call", type=int, default=0,
                        help="also run the Ray engine with this many studies per model call")
    parser.add_argument("--header-files", type=int, default=4000,
                        help="files whose headers are read on the driver and in Ray tasks, alternated (0: none)")
    parser.add_argument("--headers-only", action="store_true", help="only the header reads")
    args = parser.parse_args()

    from ichbatch.synth import synth_studies

    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16), RAY_USAGE_STATS_ENABLED="0")
    tmp = Path(tempfile.mkdtemp(prefix="ichbench"))
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    port = 20000 + secrets.randbelow(20000)
    try:
        studies = tmp / "studies"
        if not args.headers_only:
            synth_studies(studies, args.studies, seed=11, n_slices=args.slices)
        subprocess.run([str(RAY), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                        "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={ray_tmp}"],
                       check=True, capture_output=True)
        headers = None
        if args.header_files:
            many = tmp / "headers"
            synth_studies(many, max(1, args.header_files // 40), seed=12, n_slices=40, size=64)
            headers = _header_costs(many, port, max(3, args.repeats))
            _print_headers(*headers)
        if args.headers_only:
            return
        engines = ["local", "ray"] + ([f"ray x{args.studies_per_call}"] if args.studies_per_call else [])
        times: dict[str, list[float]] = {engine: [] for engine in engines}
        outs = {}
        for k in range(args.repeats):
            for n, engine in enumerate(engines if k % 2 == 0 else engines[::-1]):
                out = tmp / f"run{k}_{n}" / "results.csv"
                extra = ("--engine", "ray", "--address", f"127.0.0.1:{port}") if engine != "local" else ()
                if engine.startswith("ray x"):
                    extra += ("--studies-per-call", str(args.studies_per_call))
                times[engine].append(_run(studies, out, args, *extra))
                outs[engine] = out
        same = all(_probabilities(outs["local"]) == _probabilities(outs[engine]) for engine in engines)
        costs = _stage_costs(studies, args)
    finally:
        subprocess.run([str(RAY), "stop", "--force"], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    slices = args.studies * args.slices
    best = {engine: min(seconds) for engine, seconds in times.items()}
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; model {args.model}, "
          f"{args.studies} studies x {args.slices} slices, TTA {args.tta}, PDF reports on; best of {args.repeats}")
    for engine, seconds in best.items():
        print(f"{engine:>8}: {seconds:.1f} s wall (model load included), {slices / seconds:.1f} slices/s, "
              f"ratio to local {best['local'] / seconds:.2f}")
    print(f"same probabilities in every engine: {same}")
    if headers:
        _print_headers(*headers)
    print(f"per-stage costs: header read {1000 * costs.header_s:.2f} ms/file (driver), decode "
          f"{1000 * costs.decode_s:.1f} ms/slice (one core), score (model x TTA {args.tta}, aggregation, heat maps; "
          f"every core) {1000 * costs.score_s:.1f} ms/slice, files {1000 * costs.files_s:.0f} ms/study (one core), "
          f"commit {1000 * costs.commit_s:.1f} ms/study (driver)")


def _print_headers(files: int, costs: dict[str, tuple[float, float]]) -> None:
    line = ", ".join(f"{way}: {1000 * wall:.3f} ms wall and {1000 * cpu:.3f} ms of the driver's CPU"
                     for way, (wall, cpu) in costs.items())
    print(f"header reads of {files} files, median per file: {line}; driver CPU ratio "
          f"{costs['driver'][1] / costs['ray tasks'][1]:.1f}", flush=True)


if __name__ == "__main__":
    main()
