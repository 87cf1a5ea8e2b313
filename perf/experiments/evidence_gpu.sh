#!/usr/bin/env bash
# The evidence table at GPT-2-small scale on one GPU (bf16 autocast, fused AdamW): every schedule against
# training from scratch on the same FLOPs, under compare's protocol (every arm's learning rate tuned over the
# same grid on seed 1000, on a quarter of its budget to keep this to hours), 3 reported seeds (2-4, as on the CPU).
# Results: perf/results/evidence/gpt2-base-gpu/.  Python: .venv's where there is one, else python3 (a GPU
# machine's own interpreter, growlib installed into it by `make test` or perf/gpu_run.sh).
set -euo pipefail
if [[ -z ${PY:-} ]]; then
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
OUT=${OUT:-perf/results/evidence}
$PY -m growlib.cli compare --model gpt2 --size base --seq-len 512 --batch-size 32 --steps 3000 --eval-every 250 \
    --eval-batches 16 --seeds 2,3,4 --tune-seeds 1000 --tune-fraction 0.25 \
    --schedules baseline,vcycle,ode_multilevel,mslt,stack,msg,ligo --out "$OUT/gpt2-base-gpu"
