#!/usr/bin/env bash
# Regenerate the CPU figures of docs/BENCHMARKS.md: every run times our model and timm's in
# the same process, alternately, and prints the medians and their ratio. Each benchmark runs
# REPEAT times, each time in a fresh process (on the project's VM the speed of memory-bound
# steps differs from one process to the next; see docs/BENCHMARKS.md), and the summary gives
# the median and range of the per-process ratios. Run from the repository root on a quiet
# machine; results go to runs/bench/NAME.R.json. THREADS defaults to every core torch sees.
set -euo pipefail
PY=${PY:-python}
OUT=${OUT:-runs/bench}
ROUNDS=${ROUNDS:-7}
REPEAT=${REPEAT:-3}
THREADS_FLAG=${THREADS:+--threads $THREADS}
mkdir -p "$OUT"

bench() {  # name, then cait bench arguments
    local name=$1
    shift
    echo "== $name: cait bench $*"
    for r in $(seq "$REPEAT"); do
        $PY -m cait bench "$@" --rounds "$ROUNDS" $THREADS_FLAG --json >"$OUT/$name.$r.json"
        $PY - "$OUT/$name.$r.json" <<'PYEOF'
import json, sys
r = json.load(open(sys.argv[1]))
line = "  ".join(f"{t['impl']} {t['dtype']} {t['images_per_s']:6.2f} img/s peak {t['peak_mem_mib']:.0f} MiB" for t in r["timings"])
ratio = "" if r["ratio"] is None else f"  ratio {r['ratio']:.2f}x (per-round {r['round_ratio']:.2f}x)"
print(f"  {line}{ratio}")
PYEOF
    done
}

summary() {
    $PY - "$OUT" <<'PYEOF'
import glob, json, os, statistics, sys
runs = {}
for path in sorted(glob.glob(os.path.join(sys.argv[1], "*.*.json"))):
    name = os.path.basename(path).rsplit(".", 2)[0]
    runs.setdefault(name, []).append(json.load(open(path)))
print("== summary: median (min-max) over processes")
for name, rs in runs.items():
    ratios = [r["ratio"] for r in rs if r["ratio"] is not None]
    ours = [r["timings"][0]["images_per_s"] for r in rs]
    if ratios:
        print(f"  {name:<28} ours {statistics.median(ours):6.2f} img/s  ratio {statistics.median(ratios):.2f}x "
              f"({min(ratios):.2f}-{max(ratios):.2f}, {len(ratios)} processes)")
PYEOF
}

uptime
bench xxs24_infer_fp32 --model cait_xxs24_224 --batch-size 32 --compare timm
bench s24_infer_fp32 --model cait_s24_224 --batch-size 32 --compare timm
bench xxs24_train_fp32 --model cait_xxs24_224 --batch-size 32 --train --compare timm
bench xxs24_infer_bf16 --model cait_xxs24_224 --batch-size 32 --dtype bf16 --compare timm --compare-dtype fp32
bench xxs24_infer_bf16_autocast --model cait_xxs24_224 --batch-size 32 --dtype bf16 --autocast --compare timm --compare-dtype fp32
summary
# bf16 accuracy of the trained demo model (make demo) on the 360-image digits test split
if [ -f runs/demo/model.safetensors ]; then
$PY -c "
from cait.bench.precision import checkpoint_precision_agreement as agree
for autocast in (False, True):
    print('bf16', 'autocast' if autocast else 'cast', agree('runs/demo/model.safetensors', 'digits', 'bf16', autocast=autocast))
"
fi
uptime
