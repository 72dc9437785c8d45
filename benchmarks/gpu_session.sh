#!/usr/bin/env bash
# The GPU measurements (and a GPU training) as one script for a lent machine that has JAX but no
# TensorFlow and no package index: Keras, pydicom and the decoders travel as wheels in .whl/
# (README: Performance, "On a GPU", says how they were fetched; reportlab's pillow and charset-normalizer
# are on that machine already, and the wheels and the checkout must stay under 64 MiB together).
#
#   bash benchmarks/gpu_session.sh bench            # workers' memory, bare vs end to end at TTA 4 (without reports,
#                                                   # then with), decoding, the demo model, finishing cost,
#                                                   # heat maps, network rate, header reads
#   bash benchmarks/gpu_session.sh train MINUTES N  # N anatomy-v3 studies, fitting for at most MINUTES
#   DEADLINE=570 bash benchmarks/gpu_session.sh both MINUTES N   # train, then the bench steps that still fit
#
# Output goes to $OUT (the lent machine's return folder) or ./gpu-out. The return folder takes at most
# 8 files, so the bench steps log into one file. With DEADLINE (seconds from the script's start) each
# bench step runs only if its usual time is left, under a timeout of what is left: a lease is short.
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site:$PWD
fi
export KERAS_BACKEND=jax XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3
# JAX keeps what it compiled on disk, so the steps (each its own process) compile a shape once: the
# heat maps' padded batch sizes and the network's batches cost seconds each on a lease of minutes.
export JAX_COMPILATION_CACHE_DIR=/tmp/jax-cache JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv 2>&1 | tee "$OUT/bench.log"
python3 -c "import jax, keras, numpy; print('jax', jax.__version__, jax.devices(), 'keras', keras.__version__, 'numpy', numpy.__version__)" 2>&1 | tee -a "$OUT/bench.log"

DEADLINE=${DEADLINE:-100000}
step() {  # step NEEDED_SECONDS command...: run it if that much time is left, under a timeout of what is left
    local needed=$1 left=$(( DEADLINE - SECONDS )); shift
    if (( left < needed )); then echo "skipped (${left} s left, ${needed} needed): $*" | tee -a "$OUT/bench.log"; return; fi
    echo "== $(date -u +%T) $* (${left} s left)" | tee -a "$OUT/bench.log"
    timeout "$left" "$@" 2>&1 | tee -a "$OUT/bench.log"
}
bench() {
    workers=$(( $(nproc) - 1 ))
    # What a decoder and a report writer hold on a many-core machine (the 2026-11-27 evening lease found
    # the writers over their memory cap: numpy's BLAS had a thread per core). A few seconds.
    step 20 python3 benchmarks/worker_memory.py
    # The study path: without reports first (the target), then with each study's reports drawn
    # and written in the report writer processes, where reportlab came along in .whl/ (that machine has
    # pillow and charset-normalizer). 64 studies: at 2,400 slices/s a pass of 24 was a third of a second,
    # mostly filling and draining. The second run reuses the first's studies (--keep): on the
    # 2026-11-28 lease one such run took 345 s, and the next did not fit.
    common=(--model ich-resnet50-untrained --batch-size 256 --precision float16 --tta 4 --studies 64 --slices 32
            --uncompressed --workers "$workers" --repeats 2 --keep /tmp/studies-64)
    step 300 python3 benchmarks/throughput.py "${common[@]}"
    if python3 -c "import reportlab, PIL" 2>/dev/null; then
        step 100 python3 benchmarks/throughput.py "${common[@]}" --reports
    else
        echo "skipped: throughput with reports (reportlab or pillow not installed)" | tee -a "$OUT/bench.log"
    fi
    step 40 python3 benchmarks/decode_rate.py --size 224  # sizes the decoder pool
    step 200 python3 benchmarks/throughput.py --model ich-resnet50-demo --batch-size 256 --tta 4 \
        --studies 48 --slices 32 --workers "$workers" --repeats 3
    # Measured on two earlier leases: last, where the lease has time left.
    # Finishing a study (aggregation, domain check, heat maps): wall, and the host CPU that shares the
    # model's interpreter lock, per study, finished alone and in groups of eight (one heat-map call).
    step 120 python3 benchmarks/finish_cost.py --model ich-resnet50-untrained --studies 8 --slices 32 --workers "$workers" --groups 1 8
    # A flagged study's heat maps, folded network against the network as trained (one call per study).
    step 60 python3 benchmarks/heatmap_cost.py --model ich-resnet50-demo --precision bfloat16 float16 --repeats 30
    step 45 python3 benchmarks/network_rate.py --model ich-resnet50-untrained --batch-size 1024 \
        --precision float16 bfloat16 --seconds 4
    step 30 python3 benchmarks/network_rate.py --model ich-resnet50-demo --batch-size 1024 --precision bfloat16 --seconds 4
    step 60 python3 benchmarks/header_reads.py --files 4000 --repeats 3  # what a run's start costs on many cores
}
train() {  # -v: the generation's progress with times. On 2026-11-27 an H200 lease's 512 studies and
    # first epoch did not end within 9 minutes, and nothing said which of them took the time.
    minutes=${1:-3}
    studies=${2:-320}
    echo "== $(date -u +%T) training: $studies studies, fitting for at most $minutes minutes" | tee "$OUT/train.log"
    python3 -m ichbatch.cli train --source phantoms --phantoms anatomy-v3 --input-size 128 --batch-size 64 \
        --screenshots 0.3 --init models/ich-resnet50-demo/weights.npz --init-schedule continue --lr 2e-4 \
        --epochs 60 --phantom-studies "$studies" --seed 23 --workers "$(nproc)" --max-minutes "$minutes" \
        --version 0.6.0-gpu --out /tmp/gpu-model -v 2>&1 | tee -a "$OUT/train.log"
    echo "== $(date -u +%T) training ended" | tee -a "$OUT/train.log"
    if [ -f /tmp/gpu-model/model.json ]; then  # the return folder takes files of at most 16 MiB
        cp /tmp/gpu-model/model.json /tmp/gpu-model/domain.npz /tmp/gpu-model/training_curves.png "$OUT/"
        split -b 15m -d /tmp/gpu-model/weights.npz "$OUT/weights.npz.part"
    fi
}

case "${1:-bench}" in
bench) bench ;;
train) train "${2:-3}" "${3:-320}" ;;
both) train "${2:-3}" "${3:-320}"; bench ;;
*) echo "usage: gpu_session.sh bench | train MINUTES STUDIES | both MINUTES STUDIES" >&2; exit 2 ;;
esac
