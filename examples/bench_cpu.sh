#!/usr/bin/env bash
# Regenerate the CPU figures of docs/BENCHMARKS.md: every run times our model and timm's in
# the same process, alternately, and prints the medians and their ratio. Run from the
# repository root on a quiet machine; results go to runs/bench/*.json (and the tables to
# the terminal). THREADS defaults to every core torch sees.
set -euo pipefail
PY=${PY:-python}
OUT=${OUT:-runs/bench}
ROUNDS=${ROUNDS:-7}
THREADS_FLAG=${THREADS:+--threads $THREADS}
mkdir -p "$OUT"

bench() {  # name, then cait bench arguments
    local name=$1
    shift
    echo "== $name: cait bench $*"
    $PY -m cait bench "$@" --rounds "$ROUNDS" $THREADS_FLAG --json >"$OUT/$name.json"
    $PY - "$OUT/$name.json" <<'PYEOF'
import json, sys
r = json.load(open(sys.argv[1]))
for t in r["timings"]:
    print(f"  {t['impl']:<5} {t['dtype']:<5} {t['images_per_s']:7.2f} img/s  peak {t['peak_mem_mib']} MiB")
if r["ratio"] is not None:
    print(f"  ratio {r['ratio']:.2f}x, per-round {r['round_ratio']:.2f}x  (threads {r['threads']}, max |diff| {r['max_abs_diff']:.1e})")
PYEOF
}

uptime
bench xxs24_infer_fp32 --model cait_xxs24_224 --batch-size 32 --compare timm
bench s24_infer_fp32 --model cait_s24_224 --batch-size 32 --compare timm
bench xxs24_train_fp32 --model cait_xxs24_224 --batch-size 32 --train --compare timm
bench xxs24_infer_bf16 --model cait_xxs24_224 --batch-size 32 --dtype bf16 --compare timm --compare-dtype fp32
bench xxs24_infer_bf16_autocast --model cait_xxs24_224 --batch-size 32 --dtype bf16 --autocast --compare timm --compare-dtype fp32
# bf16 accuracy of the trained demo model (make demo) on the 360-image digits test split
$PY -c "
from cait.bench import checkpoint_precision_agreement as agree
for autocast in (False, True):
    print('bf16', 'autocast' if autocast else 'cast', agree('runs/demo/model.safetensors', 'digits', 'bf16', autocast=autocast))
"
uptime
