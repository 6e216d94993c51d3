#!/usr/bin/env bash
# The CPU benchmarks of examples/bench_cpu.sh for two versions of the code, alternately, so
# that a change that should not touch speed (a refactor) can be checked against noise:
#
#   git worktree add /tmp/before <commit>
#   BEFORE=/tmp/before/src examples/bench_before_after.sh
#
# Each round runs bench_cpu.sh once (REPEAT=1) with the code under $BEFORE, then once with
# this checkout's src/, each in its own torch extension cache (the two C++ kernels would
# otherwise rebuild each other's). Results: runs/bench_ab/{before,after}.R/NAME.1.json, and
# a summary of every benchmark's per-process ratios (ours / timm) for each version.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${BEFORE:?set BEFORE to the src/ folder of the code to compare against}"
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/bench_ab}
ROUNDS_AB=${ROUNDS_AB:-2}
AFTER=$PWD/src

for r in $(seq "$ROUNDS_AB"); do
    for side in before after; do
        src=$BEFORE
        [ "$side" = after ] && src=$AFTER
        echo "== round $r, $side ($src)"
        PYTHONPATH=$src TORCH_EXTENSIONS_DIR=/tmp/cait_ext_$side PY=$PY OUT=$OUT/$side.$r \
            REPEAT=1 bash examples/bench_cpu.sh 2>/dev/null | grep -v "^ *$"
    done
done

$PY - "$OUT" <<'PYEOF'
import glob, json, os, statistics, sys
out = sys.argv[1]
ratios = {}
for path in sorted(glob.glob(os.path.join(out, "*.*", "*.json"))):
    side = os.path.basename(os.path.dirname(path)).split(".")[0]
    name = os.path.basename(path).rsplit(".", 2)[0]
    r = json.load(open(path))["ratio"]
    if r is not None:
        ratios.setdefault(name, {}).setdefault(side, []).append(r)
print("== ratio ours/timm per process: before | after")
for name, sides in ratios.items():
    b, a = sides.get("before", []), sides.get("after", [])
    fmt = lambda xs: ", ".join(f"{x:.2f}" for x in xs)
    med = lambda xs: statistics.median(xs) if xs else float("nan")
    print(f"  {name:<28} {fmt(b):<14} | {fmt(a):<14} median {med(b):.2f} -> {med(a):.2f}")
PYEOF
