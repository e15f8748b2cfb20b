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
#   LANES=auto                       on a machine with several GPUs the stages run in parallel, one lane per GPU
#                                    (stage i on GPU i % lanes, or "stage@N" on lane N; a lane runs its stages in
#                                    order); LANES=1 = serial.
#                                    Each benchmark owns its GPU, so its timings are its own; only the host is shared.
#   SWEEP_ARGS                       arguments for bench/moe_sweep.py (stage "sweep")
#   QUANTG_ARGS, PYTEST_SEL, PROTO   stages "quantg" (quant bench as CUDA-graph replays), "pytest" (a selection;
#   PYTEST_K                         PYTEST_K: one -k expression, spaces allowed),
#   QUANTC_ARGS                      stage "quantc": the quant bench in do_bench's loop with a reading L2 flush
#                                    "proto" (a prototype script); "diag" is bench/diag/diag_host.py
#   TRAIN_ARGS, PARITY_ARGS,         stages "train" (bench_train.py: MoE layer fwd+bwd vs BF16), "parity" (train_parity.py:
#   WGRAD_ARGS, RETILE_ARGS,         BF16 vs FP8 training run), "wgrad", "retile", "swiglub" (the backward's kernels),
#   SWIGLUB_ARGS, EXPORT_ARGS        "export" (weight sync)
#   TUNE_ARGS, TUNE_TIMEOUT          stage "tune": bench/tune_grouped_gemm.py (the grouped GEMM's per-card table)
#   TUNEQ_ARGS, TUNEQ_TIMEOUT        stage "tuneq": bench/tune_quant.py (the quantizers' per-card tables)
#   TUNED_ARGS, TUNED_TIMEOUT        stage "tuned": bench/tune_decode.py (the decode path's per-card table)
#   PEER_ARGS, PEER_TIMEOUT          stage "peer": bench/peer_vllm.py (vLLM's fused-MoE kernel; carry .vllm)
#   MODELS_ARGS, MODELS_TIMEOUT      stage "models": bench/bench_models.py (BF16, vLLM, ours per backend, per model)
#   TUNEB_ARGS, TUNEB_TIMEOUT        stage "tuneb": bench/tune_backend.py (auto's backend table; needs DeepGEMM)
#   MOEHOST_ARGS, MOEHOST_TIMEOUT    stage "moehost": bench/diag/diag_moe_host.py (host + GPU time per MoE stage)
#   PROTO_TIMEOUT=240                seconds for the proto stage; QUANT_TIMEOUT=200 for quant, quantg, quantc
#   PRESET=validate                  a named set of the variables above (bench/presets/<name>.env)
# DeepGEMM: the compiled extension and the JIT's kernel cache come back in dg_cache.tgz; unpack it into .deepgemm/
# (tar -xzf dg_cache.tgz -C .deepgemm) and the next call skips the 90 s build and the per-shape JIT compiles.
# Back in $OUT (at most 8 files): summary.txt (environment first, table last), logs.tgz (every stage's log),
# results.tgz (bench/results/<card>/), dg_cache.tgz.
set -o pipefail
# PRESET=name: the variables of bench/presets/name.env (each one only where the caller set none)
if [[ -n "${PRESET:-}" ]]; then
    _preset="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/presets/$PRESET.env"
    [[ -f "$_preset" ]] || { echo "[gpu_check] no preset $_preset"; exit 2; }
    # shellcheck disable=SC1090
    source "$_preset"
    echo "[gpu_check] preset $PRESET: STAGES=\"$STAGES\""
fi
START=$SECONDS
TOTAL_BUDGET=${TOTAL_BUDGET:-570}
STAGES=${STAGES:-"tests quant gemm moe"}
PYTEST_ARGS=${PYTEST_ARGS-"-m gpu"}
QT=${QUANT_TIMEOUT:-200}  # seconds for each of the stages quant and quantg
OUT=${OUT:-$PWD/.out}
mkdir -p "$OUT"
LOGS=$(mktemp -d)  # stage logs and status lines; packed into logs.tgz (only 8 files come back from $OUT)
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

left() { echo $(( TOTAL_BUDGET - (SECONDS - START) )); }
# budget_for WANT: seconds a bench may plan for (its own --time-budget), inside what is left of the script's budget
budget_for() { local b=$(( $(left) - 45 )); (( b > $1 )) && b=$1; (( b < 20 )) && b=20; echo $b; }
ENV_TXT=$(mktemp)

# run_stage NAME DEFAULT_TIMEOUT LOG CMD...: bounded by the stage default and by what is left of the budget
run_stage() {
    local name=$1 want=$2 log=$3; shift 3
    local rem; rem=$(( $(left) - 15 ))  # keep 15 s for packing results and the summary
    if (( rem < 20 )); then
        echo "$name: SKIPPED (budget spent)" >> "$LOGS/status"; echo "[gpu_check] skip $name: budget spent"; return 0
    fi
    local t=$(( want < rem ? want : rem ))
    echo "[gpu_check] ===== $name on GPU ${CUDA_VISIBLE_DEVICES:-0} (timeout ${t}s, $(left)s left) : $*"
    local t0=$SECONDS
    # STAGE_SIGNAL=INT for pytest: interrupted, it still prints the failures it has seen and its summary (a TERM
    # left a stage's log with a row of dots and F's and no name of what failed)
    timeout --signal="${STAGE_SIGNAL:-TERM}" --kill-after=15 "$t" "$@" > "$LOGS/$log" 2>&1
    local rc=$?
    local how="rc=$rc"
    (( rc == 124 || rc == 137 )) && how="TIMEOUT after ${t}s"
    echo "$name: $how, $((SECONDS - t0)) s, GPU ${CUDA_VISIBLE_DEVICES:-0}, log $log" >> "$LOGS/status"
    echo "[gpu_check] ----- $name done: $how after $((SECONDS - t0)) s"
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
    # the device's checkout carries the working tree, not always its git history: name the code by its content
    # (bash tools/tree_hash.sh here gives the same hash for the same files)
    echo "tree $(bash "$REPO/tools/tree_hash.sh")"
} 2>&1 | tee "$ENV_TXT"

# ---------------------------------------------------------------------------------------------- DeepGEMM (optional)
DG_STATUS="not carried (.deepgemm/ absent; bash tools/fetch_deepgemm.sh, then carry it)"
DG_SRC=$(ls "$REPO"/.deepgemm/deepinfer_gemm-*.tar.gz 2>/dev/null | head -1)
if [[ "${DEEPGEMM:-1}" != "0" && -n "$DG_SRC" ]]; then
    DG_BUILD=/tmp/deepgemm_build
    DG_DIR=$(ls -d $DG_BUILD/deepinfer_gemm-* 2>/dev/null | head -1)
    DG_PREBUILT=$(ls "$REPO"/.deepgemm/prebuilt/_C*.so 2>/dev/null | head -1)
    if [[ -z "$DG_DIR" && -n "$DG_PREBUILT" ]]; then
        # the extension a previous call built on the same image: unpack the sources, drop it in, no build
        mkdir -p "$DG_BUILD" && tar -xzf "$DG_SRC" -C "$DG_BUILD"
        DG_DIR=$(ls -d $DG_BUILD/deepinfer_gemm-* | head -1)
        cp "$DG_PREBUILT" "$DG_DIR/deep_gemm/"
        echo "[gpu_check] DeepGEMM: using the carried prebuilt $(basename "$DG_PREBUILT")"
    fi
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
    fi
    if [[ -n "$DG_DIR" ]]; then
        # the JIT compiles its kernels at run time against these headers (in-place builds do not copy them)
        if [[ -d "$DG_DIR/third-party/cutlass/include" && ! -d "$DG_DIR/deep_gemm/include/cute" ]]; then
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
        # compiled kernels go to a carried folder: packed into dg_cache.tgz, they save the next call's JIT time
        mkdir -p "$REPO/.deepgemm/jit" && export DG_JIT_CACHE_DIR="$REPO/.deepgemm/jit"
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
run_one_stage() {
    case $1 in
        tests)
            # shellcheck disable=SC2086
            run_stage tests 420 tests.log $PY -m pytest $PYTEST_ARGS -q -p no:cacheprovider --durations=25 tests/ ;;
        cputests)  # the tests without the gpu marker, on CUDA tensors (their device fixture picks the GPU)
            run_stage cputests 420 cputests.log $PY -m pytest -m "not gpu" -q -p no:cacheprovider tests/ ;;
        quant)
            # shellcheck disable=SC2086
            run_stage quant "$QT" quant.log $PY bench/bench_quant.py --time-budget "$(budget_for $((QT - 20)))" \
                ${QUANT_ARGS:-} ;;
        gemm)
            # shellcheck disable=SC2086
            run_stage gemm 150 gemm.log $PY bench/bench_grouped_gemm.py ${GEMM_ARGS:-} ;;
        moe)
            # shellcheck disable=SC2086
            run_stage moe 420 moe.log $PY bench/bench_moe.py --time-budget "$(budget_for 400)" ${MOE_ARGS:-} ;;
        moe2)  # a second MoE run for another lane (e.g. MOE2_ARGS="--I 256 --tag _I256")
            # shellcheck disable=SC2086
            run_stage moe2 420 moe2.log $PY bench/bench_moe.py --time-budget "$(budget_for 400)" ${MOE2_ARGS:-} ;;
        breakdown)
            # shellcheck disable=SC2086
            run_stage breakdown 200 breakdown.log $PY bench/bench_moe.py --breakdown --time-budget "$(budget_for 180)" \
                ${BREAKDOWN_ARGS:-} ;;
        sweep)
            # shellcheck disable=SC2086
            run_stage sweep 300 sweep.log $PY bench/moe_sweep.py ${SWEEP_ARGS:-} ;;
        main)
            run_stage main 90 main.log $PY -m fp8_deep --tokens 512 ;;
        quantg)  # the quant bench timed as CUDA-graph replays (GPU time only, no host launch cost)
            # shellcheck disable=SC2086
            run_stage quantg "$QT" quantg.log $PY bench/bench_quant.py --graph --time-budget "$(budget_for $((QT - 20)))" \
                ${QUANTG_ARGS:-} ;;
        quantc)  # the quant bench in do_bench's loop with a clean (reading) L2 flush, e.g. next to "quant"
            # shellcheck disable=SC2086
            run_stage quantc "$QT" quantc.log $PY bench/bench_quant.py --clean-flush \
                --time-budget "$(budget_for $((QT - 20)))" ${QUANTC_ARGS:-} ;;
        diag)  # host time per launcher call (launch plans vs the full path, torch.compile)
            run_stage diag 90 diag.log $PY bench/diag/diag_host.py ;;
        moehost)  # host and GPU time per MoE stage, the forward plan's fate, a cProfile of moe_forward (MOEHOST_ARGS)
            # shellcheck disable=SC2086
            run_stage moehost "${MOEHOST_TIMEOUT:-60}" moehost.log $PY bench/diag/diag_moe_host.py ${MOEHOST_ARGS:-} ;;
        train)  # one MoE layer forward+backward, fp8_deep vs BF16 autograd (TRAIN_ARGS)
            # shellcheck disable=SC2086
            run_stage train "${TRAIN_TIMEOUT:-300}" train.log $PY bench/bench_train.py ${TRAIN_ARGS:-} ;;
        parity)  # the BF16 vs FP8 training parity run (PARITY_ARGS)
            # shellcheck disable=SC2086
            run_stage parity "${PARITY_TIMEOUT:-420}" parity.log $PY bench/train_parity.py ${PARITY_ARGS:-} ;;
        wgrad)  # the K-grouped wgrad GEMM vs BF16 and DeepGEMM (WGRAD_ARGS)
            # shellcheck disable=SC2086
            run_stage wgrad 200 wgrad.log $PY bench/bench_wgrad.py ${WGRAD_ARGS:-} ;;
        retile)  # the 128x1 re-tiling quantizer vs a same-bytes copy and torch.compile (RETILE_ARGS)
            # shellcheck disable=SC2086
            run_stage retile 150 retile.log $PY bench/bench_retile.py ${RETILE_ARGS:-} ;;
        swiglub)  # the SwiGLU backward + requantization kernel (SWIGLUB_ARGS)
            # shellcheck disable=SC2086
            run_stage swiglub 150 swiglub.log $PY bench/bench_swiglu_backward.py ${SWIGLUB_ARGS:-} ;;
        export)  # state dict -> block-FP8 weight sync (EXPORT_ARGS)
            # shellcheck disable=SC2086
            run_stage export 200 export.log $PY bench/bench_export.py ${EXPORT_ARGS:-} ;;
        tune)  # the grouped GEMM's per-card table (TUNE_ARGS); writes fp8_deep/configs/grouped_gemm/<card>.json,
               # copied into results.tgz as <card>_grouped_gemm_table.json (commit it under fp8_deep/configs/)
            run_stage tune "${TUNE_TIMEOUT:-500}" tune.log $PY bench/tune_grouped_gemm.py \
                --time-budget "$(budget_for $(( ${TUNE_TIMEOUT:-500} - 20 )))" ${TUNE_ARGS:-}
            for f in fp8_deep/configs/grouped_gemm/*.json; do
                [[ -f "$f" ]] && cp "$f" "$REPO/bench/results/$(basename "$f" .json)_grouped_gemm_table.json"
            done ;;
        tuned)  # the decode, routed and gather paths' per-card tables (TUNED_ARGS); writes fp8_deep/configs/{decode,gather,moe_decode}/<card>.json,
                # copied into results.tgz as <card>_<op>_table.json (commit them under fp8_deep/configs/)
            run_stage tuned "${TUNED_TIMEOUT:-300}" tuned.log $PY bench/tune_decode.py \
                --time-budget "$(budget_for $(( ${TUNED_TIMEOUT:-300} - 20 )))" ${TUNED_ARGS:-}
            for f in fp8_deep/configs/decode/*.json fp8_deep/configs/gather/*.json fp8_deep/configs/moe_decode/*.json; do
                [[ -f "$f" ]] && cp "$f" "$REPO/bench/results/$(basename "$f" .json)_$(basename "$(dirname "$f")")_table.json"
            done ;;
        tuneq)  # the quantizers' per-card tables (TUNEQ_ARGS); writes fp8_deep/configs/{weight,act}_quant*/<card>.json,
                # copied into results.tgz as <card>_<op>_table.json (commit them under fp8_deep/configs/)
            run_stage tuneq "${TUNEQ_TIMEOUT:-400}" tuneq.log $PY bench/tune_quant.py \
                --time-budget "$(budget_for $(( ${TUNEQ_TIMEOUT:-400} - 20 )))" ${TUNEQ_ARGS:-}
            for f in fp8_deep/configs/weight_quant*/*.json fp8_deep/configs/act_quant*/*.json; do
                [[ -f "$f" ]] && cp "$f" "$REPO/bench/results/$(basename "$f" .json)_$(basename "$(dirname "$f")")_table.json"
            done ;;
        tuneb)  # auto's backend table (TUNEB_ARGS; needs DeepGEMM: carry .deepgemm), copied into results.tgz
            run_stage tuneb "${TUNEB_TIMEOUT:-400}" tuneb.log $PY bench/tune_backend.py \
                --time-budget "$(budget_for $(( ${TUNEB_TIMEOUT:-400} - 20 )))" ${TUNEB_ARGS:-}
            for f in fp8_deep/configs/moe_backend/*.json; do
                [[ -f "$f" ]] && cp "$f" "$REPO/bench/results/$(basename "$f" .json)_moe_backend_table.json"
            done ;;
        peer)  # vLLM's block-FP8 fused-MoE Triton kernel vs our forward (PEER_ARGS; carry .vllm from
               # tools/fetch_vllm_moe.sh): output check, then the timing table
            run_stage peer "${PEER_TIMEOUT:-450}" peer.log bash -c "$PY bench/peer_vllm.py --check && $PY \
                bench/peer_vllm.py --bench --time-budget $(budget_for $(( ${PEER_TIMEOUT:-450} - 40 ))) ${PEER_ARGS:-}" ;;
        models)  # bench_models.py: every provider over the models users run (MODELS_ARGS; carry .vllm for vLLM's)
            # shellcheck disable=SC2086
            run_stage models "${MODELS_TIMEOUT:-450}" models.log $PY bench/bench_models.py \
                --time-budget "$(budget_for $(( ${MODELS_TIMEOUT:-450} - 30 )))" ${MODELS_ARGS:-} ;;
        pytest)  # a chosen pytest selection, e.g. PYTEST_SEL="tests/test_quant.py"; PYTEST_K="not 32768" is passed as
                 # one -k expression (PYTEST_SEL is split on spaces)
            # shellcheck disable=SC2086
            STAGE_SIGNAL=INT run_stage pytest "${PYTEST_TIMEOUT:-300}" pytest.log $PY -m pytest -q -p no:cacheprovider \
                --tb=short ${PYTEST_K:+-k "$PYTEST_K"} ${PYTEST_SEL:-tests/} ;;
        proto)  # a prototype or diagnostic script, e.g. PROTO="bench/diag/gluon_compile_check.py"
            # shellcheck disable=SC2086
            run_stage proto "${PROTO_TIMEOUT:-240}" proto.log $PY ${PROTO:-bench/diag/diag_accum.py} ;;
        *) echo "$1: unknown stage (tests cputests quant quantg quantc gemm moe moe2 breakdown sweep main diag pytest proto train parity wgrad retile swiglub export tune tuneq tuneb peer models)" \
               >> "$LOGS/status" ;;
    esac
}

NGPU=${NGPU:-$($PY -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 1)}
LANES=${LANES:-auto}
[[ "$LANES" == auto ]] && LANES=$NGPU
(( LANES > NGPU )) && LANES=$NGPU
(( LANES < 1 )) && LANES=1
read -r -a STAGE_LIST <<< "$STAGES"
echo "[gpu_check] $NGPU GPU(s), $LANES lane(s): ${STAGE_LIST[*]}"
declare -a LANE_PIDS=()
for (( lane = 0; lane < LANES; lane++ )); do
    mine=()
    for (( i = 0; i < ${#STAGE_LIST[@]}; i++ )); do
        st=${STAGE_LIST[$i]}
        if [[ "$st" == *@* ]]; then  # "stage@N": pinned to lane N (modulo the lanes there are)
            (( ${st#*@} % LANES == lane )) && mine+=("${st%@*}")
        elif (( i % LANES == lane )); then
            mine+=("$st")
        fi
    done
    (( ${#mine[@]} )) || continue
    if (( LANES > 1 )); then
        ( export CUDA_VISIBLE_DEVICES=$lane; for st in "${mine[@]}"; do run_one_stage "$st"; done ) &
        LANE_PIDS+=($!)
    else
        for st in "${mine[@]}"; do run_one_stage "$st"; done
    fi
done
(( ${#LANE_PIDS[@]} )) && wait "${LANE_PIDS[@]}"

# ---------------------------------------------------------------------------------------------- results back
CARD_DIRS=$(ls -d bench/results/*/ 2>/dev/null)
if [[ -n "$CARD_DIRS" ]]; then
    tar -czf "$OUT/results.tgz" bench/results 2>/dev/null && RES="results.tgz: $(tar -tzf "$OUT/results.tgz" | grep -c -v '/$') files"
else
    RES="no bench/results written"
fi

tar -czf "$OUT/logs.tgz" -C "$LOGS" . 2>/dev/null
if [[ -n "${DG_DIR:-}" && -d "$REPO/.deepgemm" ]]; then
    mkdir -p "$LOGS/dg/prebuilt"
    cp "$DG_DIR"/deep_gemm/_C*.so "$LOGS/dg/prebuilt/" 2>/dev/null
    [[ -d "$REPO/.deepgemm/jit" ]] && cp -r "$REPO/.deepgemm/jit" "$LOGS/dg/"
    tar -czf "$OUT/dg_cache.tgz" -C "$LOGS/dg" . 2>/dev/null && echo "[gpu_check] dg_cache.tgz: $(du -h "$OUT/dg_cache.tgz" | cut -f1)"
fi

# ---------------------------------------------------------------------------------------------- summary LAST
{
    echo
    echo "==================== gpu_check summary ($((SECONDS - START)) s) ===================="
    cat "$ENV_TXT"
    echo "DeepGEMM: $DG_STATUS"
    [[ -f "$LOGS/status" ]] && sed 's/^/stage /' "$LOGS/status"
    echo "$RES"
    for log in quant quantg quantc gemm moe moe2 breakdown sweep main diag moehost proto wgrad retile swiglub export train parity \
               tune tuned tuneq tuneb peer models; do
        [[ -f "$LOGS/$log.log" ]] || continue
        echo "--- $log:"
        if grep -q '^SUMMARY' "$LOGS/$log.log"; then
            grep '^SUMMARY' "$LOGS/$log.log" | sed -E 's/^SUMMARY (quant|quantg|quantc|moe|moe2|breakdown) ?//'
        elif grep -q '^SWEEP' "$LOGS/$log.log"; then
            grep -E '^(SWEEP|FP8_DEEP)' "$LOGS/$log.log"
        else
            tail -n 15 "$LOGS/$log.log"
        fi
        grep -E '^\[(error|warn)\]|MISMATCH|FAILED|Traceback|Error' "$LOGS/$log.log" | head -8
    done
    for log in tests cputests pytest; do
        [[ -f "$LOGS/$log.log" ]] || continue
        echo "--- $log:"
        grep -E '^(FAILED|ERROR)' "$LOGS/$log.log" | head -20
        grep -E '(passed|failed|error|skipped|no tests ran)' "$LOGS/$log.log" | tail -1
    done
} | tee "$OUT/summary.txt"
exit 0
