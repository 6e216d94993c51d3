#!/usr/bin/env bash
# The GPU rows of issue 30's acceptance in one run, for a machine with one CUDA device
# (H100 or H200): `cait bench --compare timm` in bf16 AMP, ours and timm
# alternating in one process on the same weights, 5 rounds (medians, spread max/min), model
# FLOP utilisation in every row:
#   - training step, cait_s24_224 at batch 128 and cait_xxs24_224 at batch 256, both eager
#     (target: ours >= 2.0x timm) and both compiled (ours >= 1.5x timm compiled), rounds
#     within 10% of each other;
#   - inference at batch 256, the same two models, both compiled (ours >= 1.5x timm's);
#   - cait_s24_384 training at batch 64: peak memory (ours without recompute <= 0.35x timm's);
#   - cait_m48_448 training at batch 32, beside the largest batch timm's model trains at.
# TESTS=1 first runs the `gpu` tests of tests/kernels and tests/test_bench.py (the fused
# kernels at every released shape, opcheck, torch.compile in three modes; about 3 min more).
# Runs from the repository root with the package from src/ (torch, timm, triton and pytest
# present). Writes to $OUT (default docs/gpu/DATE): log.txt (everything printed),
# bench.jsonl (one `cait bench --json` result per line), summary.txt. On the device tool,
# run it as it is (the tool sets $OUT) and copy the files it brings back to
# docs/gpu/DATE-CARD-*. Each step has its own time limit, 590 s in all (the device tool's
# cap on one command is 600 s); a step that fails or runs out of time is marked FAILED and
# the next one runs. Not yet run on a GPU (written 2026-12-06 without one): the issue asks
# for under 8 minutes, and the four compiled rows (each compiling two models cold) may alone
# take 4-7; PART=eager runs the eager, memory and m48 rows (under 4 min), PART=compiled the
# compiled rows, for two calls where one does not fit.
set -uo pipefail
PY=${PY:-python3}
OUT=${OUT:-docs/gpu/$(date +%F)}
ROUNDS=${ROUNDS:-5}
STEPS=${STEPS:-5}
TESTS=${TESTS:-0}
PART=${PART:-all}
mkdir -p "$OUT"
rm -f "$OUT/bench.jsonl"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

bench() {  # a time limit in seconds, then cait bench arguments
    local limit=$1
    shift
    echo "== cait bench $*"
    if timeout -k 10 "$limit" $PY -m cait bench "$@" --device cuda --dtype bf16 \
        --rounds "$ROUNDS" --warmup 2 --json >"$OUT/last.json"; then
        $PY -c "import json, sys; print(json.dumps(json.load(sys.stdin)))" \
            <"$OUT/last.json" | tee -a "$OUT/bench.jsonl"
    else
        echo "== FAILED (exit $?): cait bench $*"
    fi
}

largest_timm_batch() {  # the largest batch (of 32, 24, 16, 12, 8) timm's model trains at
    timeout -k 10 "$1" $PY - "$2" <<'PYEOF'
import sys, torch, torch.nn.functional as F
from cait.bench.compare import build_reference
from cait.models.registry import create_model, get_variant
name = sys.argv[1]
model = build_reference(name, create_model(name).state_dict()).cuda().train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
size = get_variant(name).img_size
for batch in (32, 24, 16, 12, 8):
    try:
        x = torch.randn(batch, 3, size, size, device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x).float(), torch.zeros(batch, dtype=torch.long, device="cuda"))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        print(f"timm {name}: trains at batch {batch} "
              f"(peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB)")
        break
    except torch.OutOfMemoryError:
        print(f"timm {name}: out of memory at batch {batch}")
        opt.zero_grad(set_to_none=True)
        loss = x = None
        torch.cuda.empty_cache()
PYEOF
}

summary() {
    $PY - "$OUT/bench.jsonl" <<'PYEOF'
import json, os, sys
if not os.path.exists(sys.argv[1]):
    sys.exit("no benchmark finished")
def spread(t):
    return max(t["rounds"]) / min(t["rounds"])
def mfu(t):
    return f"{t['mfu']:.1%}" if t.get("mfu") is not None else "-"
print(f"{'model':<15}{'mode':<10}{'batch':>6} {'compile':<8}{'cait img/s':>11}{'spread':>7}"
      f"{'MFU':>7}{'timm img/s':>11}{'spread':>7}{'MFU':>7}{'ratio':>7}{'cait MiB':>9}"
      f"{'timm MiB':>9}{'mem':>6}")
for line in open(sys.argv[1]):
    r = json.loads(line)
    ours, ref = (r["timings"] + [None])[:2]
    row = (f"{r['model']:<15}{r['mode']:<10}{r['batch_size']:>6} {str(r['compile']):<8}"
           f"{ours['images_per_s']:>11.1f}{spread(ours):>7.2f}{mfu(ours):>7}")
    if ref is not None:
        mem = ours["peak_mem_mib"] / ref["peak_mem_mib"]
        row += (f"{ref['images_per_s']:>11.1f}{spread(ref):>7.2f}{mfu(ref):>7}"
                f"{r['ratio']:>6.2f}x{ours['peak_mem_mib']:>9.0f}{ref['peak_mem_mib']:>9.0f}"
                f"{mem:>5.2f}x")
    else:
        row += f"{'-':>11}{'':>7}{'':>7}{'':>7}{ours['peak_mem_mib']:>9.0f}"
    print(row)
PYEOF
}

checks() {
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    $PY -c "import sys, torch, timm, triton; print('python', sys.version.split()[0], 'torch',
torch.__version__, 'timm', timm.__version__, 'triton', triton.__version__,
torch.cuda.get_device_name())"
    if [ "$TESTS" = 1 ]; then
        echo "== tests: pytest -m gpu"
        timeout -k 10 240 $PY -m pytest -m gpu tests/kernels tests/test_bench.py -q \
            -p no:cacheprovider
    fi
    if [ "$PART" != compiled ]; then
        # training, both eager
        bench 35 --model cait_xxs24_224 --batch-size 256 --train --compare timm --steps "$STEPS"
        bench 40 --model cait_s24_224 --batch-size 128 --train --compare timm --steps "$STEPS"
        # peak training memory of cait_s24_384 at batch 64, default attention (no recompute)
        bench 45 --model cait_s24_384 --batch-size 64 --train --compare timm --steps 2
        # cait_m48_448 at batch 32, and the largest batch timm's model trains at
        ROUNDS=2 bench 40 --model cait_m48_448 --batch-size 32 --train --steps 1
        largest_timm_batch 30 cait_m48_448 || echo "== FAILED: timm's largest cait_m48_448 batch"
    fi
    if [ "$PART" != eager ]; then
        # training, then inference, both models compiled (compilation is not timed)
        bench 110 --model cait_xxs24_224 --batch-size 256 --train --compare timm \
            --steps "$STEPS" --compile
        bench 110 --model cait_s24_224 --batch-size 128 --train --compare timm \
            --steps "$STEPS" --compile
        bench 90 --model cait_xxs24_224 --batch-size 256 --autocast --compare timm \
            --steps "$STEPS" --compile
        bench 90 --model cait_s24_224 --batch-size 256 --autocast --compare timm \
            --steps "$STEPS" --compile
    fi
    rm -f "$OUT/last.json"
    echo "== summary"
    summary | tee "$OUT/summary.txt"
}

checks 2>&1 | tee "$OUT/log.txt"
