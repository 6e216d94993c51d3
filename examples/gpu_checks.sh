#!/usr/bin/env bash
# Every GPU check of docs/BENCHMARKS.md in one run, for a machine with one CUDA device:
# the `gpu` tests (the CUDA cases of tests/kernels and tests/test_bench.py: fast paths
# against plain, bf16/fp16 agreement, torch.compile, recompute's memory, `cait bench`),
# then `cait bench --compare timm` for the GPU targets, alternating the two models in one
# process. Runs from the repository root, with the package from src/ (no install needed
# where torch, timm and pytest are present). Writes to $OUT (default
# runs/gpu): log.txt (everything printed), bench.jsonl (one `cait bench --json` result per
# line) and summary.txt. On the device tool, run it as it is: the tool sets $OUT to the
# folder it brings back. Each step has its own time limit, 540 s in all (the tool's cap on
# one command is 600 s); a benchmark that fails or runs out of time is marked FAILED and
# the next one runs. Run on an H200 on 2026-11-30 (261 s; figures in docs/BENCHMARKS.md).
# COMPILE=1 adds a compiled inference benchmark (180 s more).
set -uo pipefail
PY=${PY:-python3}
OUT=${OUT:-runs/gpu}
ROUNDS=${ROUNDS:-5}
STEPS=${STEPS:-10}
COMPILE=${COMPILE:-0}
mkdir -p "$OUT"
rm -f "$OUT/bench.jsonl"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

bench() {  # a time limit in seconds, then cait bench arguments
    local limit=$1
    shift
    echo "== cait bench $*"
    if timeout -k 10 "$limit" $PY -m cait bench "$@" --device cuda --compare timm \
        --rounds "$ROUNDS" --steps "$STEPS" --warmup 3 --json >"$OUT/last.json"; then
        $PY -c "import json, sys; print(json.dumps(json.load(sys.stdin)))" \
            <"$OUT/last.json" | tee -a "$OUT/bench.jsonl"
    else
        echo "== FAILED (exit $?): cait bench $*"
    fi
}

summary() {
    $PY - "$OUT/bench.jsonl" <<'PYEOF'
import json, os, sys
if not os.path.exists(sys.argv[1]):
    sys.exit("no benchmark finished")
print(f"{'model':<16}{'mode':<10}{'batch':>6} {'impl':<10}{'compile':<8}{'cait img/s':>11}"
      f"{'timm img/s':>11}{'ratio':>7}{'cait MiB':>10}{'timm MiB':>10}{'mem':>6}")
for line in open(sys.argv[1]):
    r = json.loads(line)
    ours, ref = r["timings"]
    mem = ours["peak_mem_mib"] / ref["peak_mem_mib"]
    print(f"{r['model']:<16}{r['mode']:<10}{r['batch_size']:>6} {r['attn_impl']:<10}"
          f"{str(r['compile']):<8}{ours['images_per_s']:>11.1f}{ref['images_per_s']:>11.1f}"
          f"{r['ratio']:>6.2f}x{ours['peak_mem_mib']:>10.0f}{ref['peak_mem_mib']:>10.0f}"
          f"{mem:>5.2f}x")
PYEOF
}

checks() {
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    $PY -c "import sys, torch, timm; print('python', sys.version.split()[0], 'torch',
torch.__version__, 'timm', timm.__version__, torch.cuda.get_device_name())"

    echo "== tests: pytest -m gpu"
    timeout -k 10 150 $PY -m pytest -m gpu tests/kernels tests/test_bench.py -q \
        -p no:cacheprovider

    # AMP inference and training throughput (target: at least 1.2x timm's)
    bench 45 --model cait_xxs24_224 --batch-size 256 --dtype bf16 --autocast
    bench 60 --model cait_s24_224 --batch-size 256 --dtype bf16 --autocast
    bench 60 --model cait_xxs24_224 --batch-size 256 --dtype bf16 --train
    bench 75 --model cait_s24_224 --batch-size 128 --dtype bf16 --train
    # peak training memory of cait_s24_384 at the same batch (target: at most 0.7x timm's)
    bench 75 --model cait_s24_384 --batch-size 32 --dtype bf16 --train --attn-impl recompute
    bench 75 --model cait_s24_384 --batch-size 32 --dtype bf16 --train
    if [ "$COMPILE" = 1 ]; then  # both models compiled; compilation is not timed
        bench 180 --model cait_xxs24_224 --batch-size 256 --dtype bf16 --autocast --compile
    fi
    rm -f "$OUT/last.json"
    echo "== summary"
    summary | tee "$OUT/summary.txt"
}

checks 2>&1 | tee "$OUT/log.txt"
