#!/usr/bin/env bash
# Distillation on the bundled digits: a convnet teacher (timm resnet10t at 32x32), then a
# CaiT student (cait_digits_16 with a distillation token) trained for a short budget with
# hard distillation and without, 3 seeds each. Prints final test top-1 per run, mean and
# spread. Usage: examples/distill_digits.sh [OUT_DIR] [STUDENT_EPOCHS]
set -euo pipefail
OUT=${1:-runs/distill}
EPOCHS=${2:-30}
CAIT="${PYTHON:-.venv/bin/python} -m cait"
COMMON=(--data digits --no-progress --recipe recipes/digits.yaml --set tensorboard=false)

$CAIT train --model timm:resnet10t --output "$OUT/teacher" --epochs 30 "${COMMON[@]}" \
    --set data.img_size=32 --set optim.lr=1.6e-2
for seed in 0 1 2; do
  $CAIT train --model cait_digits_16 --output "$OUT/plain_s$seed" --epochs "$EPOCHS" \
      --seed "$seed" "${COMMON[@]}" --set model_args.distilled=true
  $CAIT train --model cait_digits_16 --output "$OUT/hard_s$seed" --epochs "$EPOCHS" \
      --seed "$seed" "${COMMON[@]}" --set model_args.distilled=true \
      --teacher "$OUT/teacher/model.safetensors" --distillation hard
done
"${PYTHON:-.venv/bin/python}" - "$OUT" <<'PY'
import json, statistics, sys
from pathlib import Path
out = Path(sys.argv[1])
def final(run):
    return json.loads((out / run / "metrics.jsonl").read_text().splitlines()[-1])["val_top1"]
print(f"teacher (resnet10t): {final('teacher'):.2f}")
for kind in ("plain", "hard"):
    values = [final(f"{kind}_s{s}") for s in range(3)]
    print(f"{kind}: " + " / ".join(f"{v:.2f}" for v in values)
          + f"  mean {statistics.mean(values):.2f}  std {statistics.stdev(values):.2f}")
PY
