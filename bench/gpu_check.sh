#!/usr/bin/env bash
# One device call: environment, DeepGEMM build (if carried), GPU tests, benchmarks, results, a summary table LAST.
#
#   run(command="bash bench/gpu_check.sh", carry=[".deepgemm"], timeout_s=600)
#
# Env options:
#   STAGES="tests quant gemm moe"   parts to run, in this order (default all four; add "breakdown" for bench_moe --breakdown)
#   MOE_ARGS="--quick"               arguments for bench/bench_moe.py (default: the full grid)
#   QUANT_ARGS, GEMM_ARGS, BREAKDOWN_ARGS   arguments for the other benches
#   PYTEST_ARGS="-m gpu"             pytest selection (default "-m gpu"; "" runs every test on the GPU)
#   TOTAL_BUDGET=530                 seconds for the whole script (the device tool allows 600 per command)
#   DEEPGEMM=0                       skip the DeepGEMM build even when .deepgemm/ is carried
# Logs and results land in $OUT (at most 8 files come back): tests.log, quant.log, gemm.log, moe.log, breakdown.log,
# deepgemm_build.log, results.tgz (bench/results/<card>/), summary.txt (starts with the environment).
set -o pipefail
START=$SECONDS
TOTAL_BUDGET=${TOTAL_BUDGET:-570}
STAGES=${STAGES:-"tests quant gemm moe"}
PYTEST_ARGS=${PYTEST_ARGS-"-m gpu"}
OUT=${OUT:-$PWD/.out}
mkdir -p "$OUT"
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
declare -a STATUS=()

left() { echo $(( TOTAL_BUDGET - (SECONDS - START) )); }
# budget_for WANT: seconds a bench may plan for (its own --time-budget), inside what is left of the script's budget
budget_for() { local b=$(( $(left) - 45 )); (( b > $1 )) && b=$1; (( b < 20 )) && b=20; echo $b; }
ENV_TXT=$(mktemp)

# run_stage NAME DEFAULT_TIMEOUT LOG CMD...: bounded by the stage default and by what is left of the budget
run_stage() {
    local name=$1 want=$2 log=$3; shift 3
    local rem; rem=$(( $(left) - 15 ))  # keep 15 s for packing results and the summary
    if (( rem < 20 )); then
        STATUS+=("$name: SKIPPED (budget spent)"); echo "[gpu_check] skip $name: budget spent"; return 0
    fi
    local t=$(( want < rem ? want : rem ))
    echo "[gpu_check] ===== $name (timeout ${t}s, $(left)s left) : $*"
    local t0=$SECONDS
    timeout --signal=TERM --kill-after=10 "$t" "$@" 2>&1 | tee "$OUT/$log"
    local rc=$?
    local how="rc=$rc"
    (( rc == 124 || rc == 137 )) && how="TIMEOUT after ${t}s"
    STATUS+=("$name: $how, $((SECONDS - t0)) s, log $log")
    return 0
}

echo "[gpu_check] ===== environment"
{
    nvidia-smi -L
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
        --format=csv 2>/dev/null
    $PY -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', \
torch.version.cuda, 'triton', triton.__version__, 'device', torch.cuda.get_device_name())"
    nvcc --version 2>/dev/null | tail -1
    git -C "$REPO" log --oneline -1 2>/dev/null
} 2>&1 | tee "$ENV_TXT"

# ---------------------------------------------------------------------------------------------- DeepGEMM (optional)
DG_STATUS="not carried (.deepgemm/ absent; bash tools/fetch_deepgemm.sh, then carry it)"
DG_SRC=$(ls "$REPO"/.deepgemm/deepinfer_gemm-*.tar.gz 2>/dev/null | head -1)
if [[ "${DEEPGEMM:-1}" != "0" && -n "$DG_SRC" ]]; then
    DG_BUILD=/tmp/deepgemm_build
    DG_DIR=$(ls -d $DG_BUILD/deepinfer_gemm-* 2>/dev/null | head -1)
    if [[ -z "$DG_DIR" ]] || ! ls "$DG_DIR"/deep_gemm/_C*.so >/dev/null 2>&1; then
        echo "[gpu_check] ===== building DeepGEMM from $(basename "$DG_SRC") (about 90 s)"
        t0=$SECONDS
        rm -rf "$DG_BUILD" && mkdir -p "$DG_BUILD" && tar -xzf "$DG_SRC" -C "$DG_BUILD"
        DG_DIR=$(ls -d $DG_BUILD/deepinfer_gemm-* | head -1)
        bt=$(( $(left) - 200 )); (( bt > 300 )) && bt=300
        if (( bt < 60 )); then
            echo "[gpu_check] not enough budget left to build DeepGEMM" | tee "$OUT/deepgemm_build.log"
        else
            ( cd "$DG_DIR" && export CPATH="$REPO/.deepgemm/sysroot/usr/include${CPATH:+:$CPATH}" && \
              DG_FORCE_BUILD=1 MAX_JOBS=16 timeout "$bt" $PY setup.py build_ext --inplace ) \
                > "$OUT/deepgemm_build.log" 2>&1
            echo "[gpu_check] DeepGEMM build rc=$? in $((SECONDS - t0)) s (log deepgemm_build.log)"
        fi
        # the JIT compiles its kernels at run time against these headers (in-place builds do not copy them)
        if [[ -d "$DG_DIR/third-party/cutlass/include" ]]; then
            mkdir -p "$DG_DIR/deep_gemm/include"
            cp -r "$DG_DIR/third-party/cutlass/include/cute" "$DG_DIR/third-party/cutlass/include/cutlass" \
                "$DG_DIR/deep_gemm/include/" 2>/dev/null
        fi
    fi
    if ls "$DG_DIR"/deep_gemm/_C*.so >/dev/null 2>&1; then
        # without the preload DeepGEMM's JIT initialisation segfaults in std::regex (two C++ runtimes mixed)
        [[ -f /usr/lib/x86_64-linux-gnu/libstdc++.so.6 ]] && \
            export LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libstdc++.so.6${LD_PRELOAD:+:$LD_PRELOAD}
        export PYTHONPATH="$DG_DIR:$PYTHONPATH"
        # the JIT compiles kernels at run time; keep the carried elfutils headers visible to it as to the build
        export CPATH="$REPO/.deepgemm/sysroot/usr/include${CPATH:+:$CPATH}"
        if probe=$(timeout 120 $PY -c "import deep_gemm; print(deep_gemm.__version__)" 2>&1 | tail -1) \
                && [[ "$probe" =~ ^[0-9] ]]; then
            DG_STATUS="built and importable (deep_gemm $probe)"
        else
            DG_STATUS="BUILT BUT IMPORT FAILED: $probe (continuing without it)"
            export PYTHONPATH="${PYTHONPATH#"$DG_DIR:"}"
            unset LD_PRELOAD
        fi
    else
        DG_STATUS="BUILD FAILED (see deepgemm_build.log: $(grep -m1 -iE 'error' "$OUT/deepgemm_build.log" 2>/dev/null | cut -c1-160)); continuing without it"
        tail -n 30 "$OUT/deepgemm_build.log" 2>/dev/null
    fi
fi
echo "[gpu_check] DeepGEMM: $DG_STATUS"

# ---------------------------------------------------------------------------------------------- stages
for stage in $STAGES; do
    case $stage in
        tests)
            # shellcheck disable=SC2086
            run_stage tests 300 tests.log $PY -m pytest $PYTEST_ARGS -q -p no:cacheprovider tests/ ;;
        quant)
            # shellcheck disable=SC2086
            run_stage quant 150 quant.log $PY bench/bench_quant.py --time-budget "$(budget_for 130)" ${QUANT_ARGS:-} ;;
        gemm)
            if [[ -f bench/bench_grouped_gemm.py ]]; then
                # shellcheck disable=SC2086
                run_stage gemm 120 gemm.log $PY bench/bench_grouped_gemm.py ${GEMM_ARGS:-}
            else
                STATUS+=("gemm: SKIPPED (bench/bench_grouped_gemm.py not there)")
            fi ;;
        moe)
            # shellcheck disable=SC2086
            run_stage moe 280 moe.log $PY bench/bench_moe.py --time-budget "$(budget_for 255)" ${MOE_ARGS:-} ;;
        breakdown)
            # shellcheck disable=SC2086
            run_stage breakdown 150 breakdown.log $PY bench/bench_moe.py --breakdown --time-budget "$(budget_for 130)" \
                ${BREAKDOWN_ARGS:-} ;;
        main)
            run_stage main 90 main.log $PY -m fp8_deep --tokens 512 ;;
        *) STATUS+=("$stage: unknown stage (tests quant gemm moe breakdown)") ;;
    esac
done

# ---------------------------------------------------------------------------------------------- results back
CARD_DIRS=$(ls -d bench/results/*/ 2>/dev/null)
if [[ -n "$CARD_DIRS" ]]; then
    tar -czf "$OUT/results.tgz" bench/results 2>/dev/null && RES="results.tgz: $(tar -tzf "$OUT/results.tgz" | grep -c -v '/$') files"
else
    RES="no bench/results written"
fi

# ---------------------------------------------------------------------------------------------- summary LAST
{
    echo
    echo "==================== gpu_check summary ($((SECONDS - START)) s) ===================="
    cat "$ENV_TXT"
    echo "DeepGEMM: $DG_STATUS"
    for s in "${STATUS[@]}"; do echo "stage $s"; done
    echo "$RES"
    if [[ -f "$OUT/tests.log" ]]; then
        echo "--- tests:"
        grep -E '^(FAILED|ERROR)' "$OUT/tests.log" | head -15
        grep -E '(passed|failed|error|skipped|no tests ran)' "$OUT/tests.log" | tail -1
    fi
    for log in quant gemm moe breakdown main; do
        [[ -f "$OUT/$log.log" ]] || continue
        echo "--- $log:"
        if grep -q '^SUMMARY' "$OUT/$log.log"; then
            grep '^SUMMARY' "$OUT/$log.log" | sed -E 's/^SUMMARY (quant|moe|breakdown) ?//'
        else
            tail -n 15 "$OUT/$log.log"
        fi
        grep -E '^\[(error|warn)\]|MISMATCH|FAILED|Traceback' "$OUT/$log.log" | head -8
    done
} | tee "$OUT/summary.txt"
exit 0
