#!/usr/bin/env bash
# The evidence table at GPT-2-small scale on one GPU (bf16 autocast, fused AdamW): every schedule against
# training from scratch on the same FLOPs, 3 seeds.  Results: perf/results/evidence/gpt2-base-gpu/.
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=${OUT:-perf/results/evidence}
$PY -m growlib.cli compare --model gpt2 --size base --seq-len 512 --batch-size 32 --steps 3000 --eval-every 250 \
    --seeds 0,1,2 --schedules baseline,vcycle,ode_multilevel,mslt,stack,msg,ligo --out "$OUT/gpt2-base-gpu"
