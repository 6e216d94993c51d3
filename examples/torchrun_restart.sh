#!/usr/bin/env bash
# How often torchrun recovers a killed worker on this machine (docs/RELIABILITY.md, issue 20).
# Each try trains the digits (depth 1, 3 epochs, last.pt every 3 steps, --resume auto) on
# 2 gloo processes under torchrun --max-restarts 1: one agent of 2 processes (MODE=standalone)
# or two agents of one process meeting on 127.0.0.1 (MODE=agents). When the first last.pt
# appears (step 3, within the first epoch), rank 1 is killed with SIGKILL; the try counts as
# recovered when every agent exits 0, a restarted group resumed from last.pt and
# model.safetensors is written. Logs stay in $OUT (default runs/torchrun_restart).
# Usage: MODE=agents TRIES=4 examples/torchrun_restart.sh
set -uo pipefail
MODE=${MODE:-standalone}
TRIES=${TRIES:-4}
LIMIT=${LIMIT:-300}  # seconds per try
OUT=${OUT:-runs/torchrun_restart}
PY=${PY:-.venv/bin/python}
export PYTHONPATH="$PWD/src" OMP_NUM_THREADS=1
mkdir -p "$OUT"
cat >"$OUT/worker.py" <<'PYEOF'
import os, sys
from pathlib import Path
from cait.cli import main
pids = Path(sys.argv[1])
pids.mkdir(exist_ok=True)
(pids / f"rank{os.environ['RANK']}").write_text(str(os.getpid()))
sys.exit(main(sys.argv[2:]))
PYEOF

recovered=0
for try in $(seq "$TRIES"); do
    run="$OUT/try$try"
    rm -rf "$run" "$OUT/pids"
    port=$((29600 + try))
    train=(train --recipe recipes/digits.yaml --data digits --output "$run" --no-progress
           --epochs 3 --batch-size 64 --resume auto --set model_args.depth=1
           --set tensorboard=false --set threads=1 --set checkpoint_every_steps=3)
    if [ "$MODE" = agents ]; then
        launch=(--nnodes=2 --nproc-per-node=1 --rdzv-backend=c10d
                "--rdzv-endpoint=127.0.0.1:$port" "--rdzv-id=restart$port")
        agents=2
    else
        launch=(--standalone --nproc-per-node=2)
        agents=1
    fi
    pids=()
    for agent in $(seq "$agents"); do
        timeout "$LIMIT" $PY -m torch.distributed.run "${launch[@]}" --max-restarts=1 \
            "$OUT/worker.py" "$OUT/pids" "${train[@]}" >"$run.agent$agent.log" 2>&1 &
        pids+=($!)
    done
    until [ -f "$run/last.pt" ]; do  # first written at step 3 of epoch 1
        kill -0 "${pids[0]}" 2>/dev/null || break  # ended before a checkpoint
        sleep 0.05
    done
    kill -9 "$(cat "$OUT/pids/rank1")" 2>/dev/null
    ok=1
    for pid in "${pids[@]}"; do wait "$pid" || ok=0; done
    [ -f "$run/model.safetensors" ] || ok=0
    grep -q "resumed from" "$run".agent*.log || ok=0  # a restarted group continued
    echo "try $try: $([ $ok = 1 ] && echo recovered || echo 'not recovered (see the logs)')"
    recovered=$((recovered + ok))
done
echo "$MODE: recovered in $recovered of $TRIES tries"
