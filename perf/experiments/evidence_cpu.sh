#!/usr/bin/env bash
# The evidence table on a 2-core CPU (about an hour): every schedule against training from scratch, on the
# same FLOPs, 3 seeds, on the embedded Python-stdlib corpus, at two model sizes.  Results: perf/results/evidence/.
# Run from the repository root after `make test` has built .venv:  bash perf/experiments/evidence_cpu.sh
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=${OUT:-perf/results/evidence}
SCHEDULES=baseline,vcycle,ode_multilevel,mslt,stack,msg,ligo

# Size A: GPT-2 4 layers x hidden 128 (the demo's model), 400 baseline steps of 16 x 64 tokens.
$PY -m growlib.cli compare --model gpt2 --size tiny --steps 400 --seeds 0,1,2 --schedules $SCHEDULES \
    --out "$OUT/gpt2-4x128"
# Size B: twice as deep (8 layers x hidden 128), 300 baseline steps.
$PY -m growlib.cli compare --model gpt2 --size '{"layers": 8, "hidden": 128, "heads": 4, "intermediate": 512}' \
    --steps 300 --seeds 0,1,2 --schedules $SCHEDULES --out "$OUT/gpt2-8x128"
