#!/usr/bin/env bash
# growlib's whole GPU check in one command: kernels checked on the GPU, each kernel family timed against eager
# PyTorch, torch.compile and the GPU's own ceilings, and the end-to-end row, in at most 7.5 minutes of wall time
# on one H100/H200 (Triton and torch.compile compilation included).
#
#   bash perf/gpu_run.sh OUTDIR            # on the GPU machine
#   bash perf/gpu_run.sh --smoke OUTDIR    # rehearsal on a CPU: same steps, Triton's interpreter, tiny shapes,
#                                          # at most 3.5 minutes; its rows say mode=smoke-cpu-interpreter and its
#                                          # times are not kernel timings
#
# $PYTHON is the interpreter (default python3: on the GPU machine, its own Python, a virtualenv holding torch,
# triton and transformers).  growlib is imported from this checkout through PYTHONPATH, for every step and every
# script under perf/: nothing is installed into the machine's Python.
# OUTDIR must be empty or new; the run writes at most 8 flat files there, each as soon as it has something:
#   environment.txt  check_kernels.txt  kernel_tests.txt  structured_map.csv  kron_expand.csv  frozen.csv  end_to_end.csv
#   gpu_run.log (every step's stderr and stdout, the report, the summary)
# and prints one line per step, then the summary table (step, status, seconds, key numbers) last.
# Every step has its own time limit; a failed or timed-out step is logged and the next one runs.  The exit
# status is 0 when no step failed or timed out, 1 otherwise, 2 on bad arguments or (GPU mode) no CUDA GPU.

set -uo pipefail

usage() {
    echo "usage: bash perf/gpu_run.sh [--smoke] OUTDIR  (OUTDIR empty or new)" >&2
    exit 2
}

SMOKE=0
if [[ ${1:-} == --smoke ]]; then
    SMOKE=1
    shift
fi
[[ $# -eq 1 && -n $1 && $1 != -* ]] || usage
mkdir -p "$1" || usage
OUT=$(cd "$1" && pwd)
[[ -z $(ls -A "$OUT") ]] || { echo "gpu_run.sh: $OUT is not empty: give a new or empty folder" >&2; exit 2; }
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
if [[ $PY == */* ]]; then  # a path: made absolute, since the import step runs from another folder
    PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY") || exit 2
fi
cd "$REPO" || exit 2
LOG=$OUT/gpu_run.log
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export PYTHONUNBUFFERED=1

# Time limits of the steps, in seconds: they sum to 450 s on a GPU (7.5 minutes less bash's own seconds) and to
# 195 s with --smoke.  A benchmark gets --time-limit = its step's limit minus an allowance for its exit
# (BENCH_EXIT; the limit counts from the process's start, imports included): it starts no measurement whose
# estimate does not fit and writes each row as it is measured, so the step's own limit is a backstop.  Measured on
# the H200 machine, caches cold (perf/results/gpu/h200-2026-11-29/):
#   import       30   python imports growlib from this checkout: torch's first, cold import took over 8 s
#   environment  10   nvidia-smi, versions (torch now warm)
#   correctness  90   check-kernels (all 218 cases, one job per op) and tests/kernels (one job per file), all
#                     parallel on the 16 cores: the slowest were kron_expand's check (54 s) and its test file
#                     (76 s).  tests/kernels/test_launch_configs.py is left out: it compiles every launch
#                     configuration for sm_80 and sm_90 offline, needs no GPU, runs in CI, and took 116 s alone
#   structured_map 70  BERT-Large bf16: eager and Triton at 3 scopes (~30 s), torch.compile of each op's shape
#                     group (~6 s); then GPT-2 medium; then whole-op compiles (~10 s each), as the limit allows
#   tile-sweep   40   perf/sweep_structured_map.py: the structured map's GPU time alone at 6 tile shapes, BERT-Large
#                     coalesce and de-coalesce (~15 s of start and model, ~2.5 s a shape and op, estimated); its table goes to the log, its CSV to the
#                     scratch folder (the run returns at most 8 files)
#   kron_expand 72   LiGO BERT-Base->Large and GPT-2 small->medium, tie paper then shared, eager and Triton: all
#                     12 cases took 62 s; torch.compile of the first case if ~46 s remain
#   frozen       70   BERT-Base, GPT-2 small, Llama-1B: 8-layer stacks, MSLT steps and the stacks'
#                     torch.compile: 68 s
#   end-to-end   60   perf/bench_end_to_end.py (GPT-2 small: every schedule's stages and transitions): 45 s
#   report        8   perf/report.py over this run's CSVs: ~1 s
if ((SMOKE)); then
    MODE="smoke (CPU, Triton interpreter: no timing below is a kernel timing)"
    export TRITON_INTERPRET=1
    unset GROWLIB_TEST_DEVICE
    LIMIT_IMPORT=12 LIMIT_ENVIRONMENT=10 LIMIT_CORRECTNESS=40 LIMIT_STRUCTURED_MAP=30 LIMIT_TILE_SWEEP=15 \
        LIMIT_KRON_EXPAND=28 LIMIT_FROZEN=25 LIMIT_END_TO_END=25 LIMIT_REPORT=10 BENCH_EXIT=4
    BENCH_FLAGS=(--smoke)
else
    MODE="gpu"
    unset TRITON_INTERPRET
    LIMIT_IMPORT=30 LIMIT_ENVIRONMENT=10 LIMIT_CORRECTNESS=90 LIMIT_STRUCTURED_MAP=70 LIMIT_TILE_SWEEP=40 \
        LIMIT_KRON_EXPAND=72 LIMIT_FROZEN=70 LIMIT_END_TO_END=60 LIMIT_REPORT=8 BENCH_EXIT=6
    BENCH_FLAGS=()
fi

STEPS=() STATUS=() SECONDS_TAKEN=() KEYS=()

log() {
    echo "$*" >>"$LOG"
}

# record STEP STATUS SECONDS KEY: one row of the summary, and a progress line on stdout.
record() {
    STEPS+=("$1") STATUS+=("$2") SECONDS_TAKEN+=("$3") KEYS+=("$4")
    local line
    line=$(printf '[%4ds] %-13s %-10s %4ss  %s' "$SECONDS" "$1" "$2" "$3" "$4")
    echo "$line"
    log "$line"
}

# status_of EXIT_CODE: how a step ended.
status_of() {
    case $1 in
        0) echo ok ;;
        124 | 137) echo timeout ;;
        *) echo "failed($1)" ;;
    esac
}

# run_step STEP LIMIT CMD...: CMD under its time limit, stderr into the log as it comes, stdout into the
# log when it ends; the key numbers are its last "key: " line.
run_step() {
    local step=$1 limit=$2 started=$SECONDS rc
    shift 2
    log "=== $step (limit ${limit}s): $*"
    timeout -k 5 "$limit" "$@" >"$WORK/$step.out" 2>>"$LOG"
    rc=$?
    cat "$WORK/$step.out" >>"$LOG"
    record "$step" "$(status_of $rc)" $((SECONDS - started)) "$(grep -a '^key: ' "$WORK/$step.out" | tail -n 1 | cut -c6-)"
}

# ---------------------------------------------------------------------------------------------------------
# import, environment
# ---------------------------------------------------------------------------------------------------------

log "growlib GPU run, mode $MODE, $(date -u +%Y-%m-%dT%H:%M:%SZ), python $PY, checkout $REPO"

# Every step and every script imports growlib from this checkout.  A script under perf/ has perf/ as its
# first import path, not the working directory, so without PYTHONPATH it would find no growlib, or another copy.
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
IMPORTS_THIS_CHECKOUT='import os, sys
import growlib
here = os.path.realpath(growlib.__path__[0])
print(f"key: growlib imports from {here}")
sys.exit(0 if here == os.path.realpath(sys.argv[1]) else 1)'
# Checked from the scratch folder: from the checkout's root, Python would find growlib there without PYTHONPATH.
# shellcheck disable=SC2016  # $0 to $3 are the inner shell's
run_step import "$LIMIT_IMPORT" bash -c 'cd "$0" && "$1" -c "$2" "$3"' "$WORK" "$PY" "$IMPORTS_THIS_CHECKOUT" \
    "$REPO/growlib"

ENVIRONMENT_PY='import os, platform, sys
import numpy, torch, transformers, triton
import growlib
print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "| triton", triton.__version__,
      "| transformers", transformers.__version__, "| numpy", numpy.__version__)
print("growlib", os.path.dirname(growlib.__file__), "| TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "unset"))
print("cpus", os.cpu_count(), platform.platform())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"cuda device 0: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB")
    print(f"key: {p.name} sm_{p.major}{p.minor} ({p.multi_processor_count} SMs), torch {torch.__version__}, triton {triton.__version__}")
else:
    print("cuda: not available")
    print(f"key: no CUDA device; torch {torch.__version__}, triton {triton.__version__}")
    sys.exit(3 if sys.argv[1] == "gpu" else 0)'
{
    echo "# growlib GPU run: environment ($MODE)"
    date -u
    echo "checkout $REPO, commit $(git rev-parse HEAD 2>/dev/null || echo unknown)"
    git status --short --untracked-files=no 2>/dev/null | head -n 20
    echo
    if command -v nvidia-smi >/dev/null; then
        timeout 10 nvidia-smi 2>&1
        timeout 10 nvidia-smi --format=csv \
            --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit 2>&1
    else
        echo "nvidia-smi: not on this machine"
    fi
    echo
} >"$OUT/environment.txt"
run_step environment "$LIMIT_ENVIRONMENT" "$PY" -c "$ENVIRONMENT_PY" "$( ((SMOKE)) && echo smoke || echo gpu)"
cat "$WORK/environment.out" >>"$OUT/environment.txt"
if [[ ${STATUS[-1]} == "failed(3)" ]]; then
    echo "gpu_run.sh: torch sees no CUDA GPU: kernel timings need one (bash perf/gpu_run.sh --smoke OUTDIR rehearses the run on a CPU)" | tee -a "$LOG" >&2
    exit 2
fi

# ---------------------------------------------------------------------------------------------------------
# correctness: check-kernels and the kernel tests, as parallel jobs
# ---------------------------------------------------------------------------------------------------------

# start_job NAME DEST CMD...: CMD in the background under the correctness limit; when it ends, its output is
# appended to DEST in one piece (headed by its command, exit status and seconds) and its status kept.
start_job() {
    local name=$1 dest=$2
    shift 2
    (
        started=$SECONDS
        timeout -k 5 "$LIMIT_CORRECTNESS" "$@" >"$WORK/job.$name.out" 2>&1
        rc=$?
        { echo "### $*: exit $rc, $((SECONDS - started)) s"; cat "$WORK/job.$name.out"; echo; } >"$WORK/job.$name.block"
        cat "$WORK/job.$name.block" >>"$dest"
        echo "$rc $((SECONDS - started))" >"$WORK/job.$name.rc"
    ) &
}

# finish_jobs STEP PREFIX KEY: one summary row for the jobs named PREFIX*: ok only if all exited 0.
finish_jobs() {
    local step=$1 prefix=$2 key=$3 status=ok slowest=0 jobs=0 rc took
    for rc_file in "$WORK"/job."$prefix"*.rc; do
        read -r rc took <"$rc_file"
        jobs=$((jobs + 1))
        ((took > slowest)) && slowest=$took
        case $rc in
            0) ;;
            124 | 137) status=timeout ;;
            *) [[ $status == ok ]] && status=failed ;;
        esac
    done
    record "$step" "$status" "$slowest" "$key ($jobs job(s), the slowest shown)"
}

log "=== correctness: check-kernels and tests/kernels in parallel jobs (limit ${LIMIT_CORRECTNESS}s each)"
if ((SMOKE)); then
    # Two cores: one job each, check-kernels' quick subset and a -k subset of the kernel tests touching every
    # kernel family and the check machinery (the full suite runs in CI; this rehearses the step).
    start_job ck-quick "$OUT/check_kernels.txt" "$PY" -m growlib.cli check-kernels --quick
    start_job kt-subset "$OUT/kernel_tests.txt" "$PY" -m pytest -q -p no:cacheprovider tests/kernels \
        -k "untouched or frozen_inputs or strided_rows or well_formed or three_way or hopper_keeps"
    CK_SCOPE="quick subset" KT_SCOPE="-k subset"
else
    # Every case of every op and every kernel test file, compiled for this GPU: one job per op and per file,
    # so that Triton's compilations (single-threaded each) spread over the cores.
    for op in $("$PY" -c 'from growlib.kernels.cases import OPS; print(*OPS)' 2>>"$LOG"); do
        start_job "ck-$op" "$OUT/check_kernels.txt" "$PY" -m growlib.cli check-kernels --kernel "$op"
    done
    for test_file in tests/kernels/test_*.py; do
        [[ $test_file == */test_launch_configs.py ]] && continue  # offline ptxas compiles: no GPU needed
        start_job "kt-$(basename "$test_file" .py)" "$OUT/kernel_tests.txt" env GROWLIB_TEST_DEVICE=cuda \
            "$PY" -m pytest -q -p no:cacheprovider "$test_file"
    done
    CK_SCOPE="all cases" KT_SCOPE="every file but test_launch_configs.py"
fi
wait
cat "$OUT/check_kernels.txt" "$OUT/kernel_tests.txt" >>"$LOG" 2>/dev/null
CK_KEY=$(grep -aho '^[0-9]* of [0-9]* cases passed' "$OUT/check_kernels.txt" 2>/dev/null |
    awk '{p += $1; n += $3} END {printf "%d of %d cases passed", p, n}')
finish_jobs check-kernels ck- "$CK_KEY, $CK_SCOPE"
KT_KEY=$(grep -aE '^(=+ )?[0-9]+ (passed|failed|error|errors|skipped|deselected)' "$OUT/kernel_tests.txt" 2>/dev/null |
    grep -aoE '[0-9]+ (passed|failed|errors?|skipped|deselected|xfailed|xpassed)' |
    awk '{sub(/errors/, "error", $2); n[$2] += $1}
         END {split("passed failed error skipped xfailed xpassed deselected", order, " ")
              for (i = 1; i <= 7; i++) if (n[order[i]]) printf "%s%d %s", (out++ ? ", " : ""), n[order[i]], order[i]}')
finish_jobs kernel-tests kt- "${KT_KEY:-no pytest summary}, $KT_SCOPE"

# ---------------------------------------------------------------------------------------------------------
# benchmarks, then the end-to-end row, then the report
# ---------------------------------------------------------------------------------------------------------

# run_bench STEP LIMIT SCRIPT OUTDIR: a benchmark script under its step's limit, told to stop in time.
run_bench() {
    run_step "$1" "$2" "$PY" "$3" --out "$4" --time-limit $(($2 - BENCH_EXIT)) "${BENCH_FLAGS[@]}"
}

run_bench structured_map "$LIMIT_STRUCTURED_MAP" perf/bench_structured_map.py "$OUT"
run_bench tile-sweep "$LIMIT_TILE_SWEEP" perf/sweep_structured_map.py "$WORK/sweep"  # its table goes to the log
run_bench kron_expand "$LIMIT_KRON_EXPAND" perf/bench_kron_expand.py "$OUT"
run_bench frozen "$LIMIT_FROZEN" perf/bench_frozen.py "$OUT"

if [[ -f perf/bench_end_to_end.py ]]; then
    run_step end-to-end "$LIMIT_END_TO_END" "$PY" perf/bench_end_to_end.py --out "$OUT" \
        --time-limit $((LIMIT_END_TO_END - BENCH_EXIT - 5)) "${BENCH_FLAGS[@]}"  # a transition cannot be cut
else
    record end-to-end missing 0 "perf/bench_end_to_end.py is not in this checkout"
fi

run_step report "$LIMIT_REPORT" "$PY" perf/report.py --results "$OUT" --out "$WORK/PERFORMANCE.md"
[[ -f $WORK/PERFORMANCE.md ]] && cat "$WORK/PERFORMANCE.md" >>"$LOG"

# ---------------------------------------------------------------------------------------------------------
# summary
# ---------------------------------------------------------------------------------------------------------

{
    echo
    echo "growlib GPU run ($MODE): $OUT, $SECONDS s in all"
    printf '%-13s %-10s %7s  %s\n' step status seconds key
    for i in "${!STEPS[@]}"; do
        printf '%-13s %-10s %7s  %s\n' "${STEPS[$i]}" "${STATUS[$i]}" "${SECONDS_TAKEN[$i]}" "${KEYS[$i]}"
    done
} | tee -a "$LOG"
for i in "${!STEPS[@]}"; do
    [[ ${STATUS[$i]} == ok || ${STATUS[$i]} == missing ]] || exit 1
done
exit 0
