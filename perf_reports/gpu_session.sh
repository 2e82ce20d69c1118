#!/usr/bin/env bash
# One step of a GPU session, sized for one device call (10 minutes), results packed for the trip home.
#
#   bash perf_reports/gpu_session.sh check   # environment, install, GPU test suite       (~4 min)
#   bash perf_reports/gpu_session.sh tune    # `dynconv autotune --quick` -> autotune_configs/
#   bash perf_reports/gpu_session.sh bench   # `dynconv bench --quick` -> perf_reports/<gpu>/
#   bash perf_reports/gpu_session.sh profile # Nsight Compute over perf_reports/ncu_cases.py -> ncu.csv
#   bash perf_reports/gpu_session.sh sanitize # compute-sanitizer memcheck over the unmasked kernels' tests
#   bash perf_reports/gpu_session.sh overhead # host µs per op call, real launches (dynconv overhead)
#   bash perf_reports/gpu_session.sh measure # time every launch the static model predicts -> measured.jsonl
#   bash perf_reports/gpu_session.sh all     # tune then bench, each with half the budget
#   bash perf_reports/gpu_session.sh lease   # a whole 15-minute lease in one call: the kernel tests,
#                                            # memcheck (40 s), the static model's launches timed
#                                            # (150 s), a bf16 bench of the reference shapes with default
#                                            # configs, ncu on two cases, each boxed in time (LEASE_S,
#                                            # default 540 s)
#
# Set DYNCONV_COMMIT to the commit sent: the device's copy of .git can be stale (it was on the first
# lease), and the commit goes into every measured row.
#
# The device machine sends back only what lands under $OUT (at most 8 files), so each step writes
# its log and one tarball of what it changed in the tree there; unpack the tarball in the checkout
# and commit. Every step stops itself before the call's limit (STEP_BUDGET_S, default 540 s) and
# keeps what it measured: bench rewrites its csv after every pass, autotune writes after each kernel.
set -uo pipefail
cd "$(dirname "$0")/.."

step=${1:?usage: gpu_session.sh check|tune|bench|profile|sanitize|overhead|measure|all|lease}
OUT=${OUT:-/tmp/dynconv-out}
BUDGET=${STEP_BUDGET_S:-540}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

environment() {
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv || true
    $PY - <<'EOF'
import os, subprocess, torch, triton
commit = os.environ.get("DYNCONV_COMMIT") or subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                                                            capture_output=True, text=True).stdout.strip()
print(f"gpu={torch.cuda.get_device_name()} torch={torch.__version__} triton={triton.__version__} commit={commit or 'unknown'}")
EOF
}

install() {  # its log stays off $OUT: a call brings back 8 files at most
    $PY -m pip install -q --no-deps --no-build-isolation -e . >/tmp/dynconv-install.log 2>&1 \
        || { tail -20 /tmp/dynconv-install.log; exit 1; }
}

sanitize_tests() {  # memcheck over the unmasked, scattering and staged kernels' tests, boxed by $1 s (default the budget)
    command -v compute-sanitizer >/dev/null || { echo "compute-sanitizer is not on PATH here"; return 0; }
    # Without torch's caching allocator every tensor is its own allocation, so a read past its end
    # is outside any allocation rather than inside a cached block, where memcheck cannot see it.
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 DYNCONV_TEST_DEVICE=cuda timeout -s INT -k 10 "${1:-$BUDGET}" \
        compute-sanitizer --tool memcheck \
        --error-exitcode 86 --log-file "$OUT/sanitize.log" $PY -m pytest -q -x -p no:cacheprovider \
        tests/test_involution_nchw.py::test_pair_kernels_forward_input_and_weight_gradients \
        tests/test_involution_nchw.py::test_weight_gradient_pairs_shift_every_row_they_read_into_x \
        tests/test_involution_nchw.py::test_nchw_kernels_forward_input_and_weight_gradients \
        tests/test_involution_nchw.py::test_weight_gradient_in_batches_of_chunks_with_a_partial_last \
        tests/test_dynamic_dwconv.py::test_channels_last_walk_runs_interior_programs_unmasked \
        tests/test_dynamic_dwconv.py::test_nchw_walks_read_vectors_in_interior_tiles \
        tests/test_region_conv.py::test_region_bias_gradient_sums_each_region_s_pixels \
        tests/test_involution.py::test_staged_pair_tiles_by_triton \
        tests/test_region_tables.py 2>&1 | tail -5
    echo "compute-sanitizer exit ${PIPESTATUS[0]} (86: memcheck found errors, see sanitize.log)"
}

# Nsight Compute over every launch between cudaProfilerStart/Stop of perf_reports/ncu_cases.py (warm,
# one fwd+bwd per case), torch's own kernels included: what the op costs is all of them.
NCU_METRICS=gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum
NCU_METRICS+=,dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__throughput.avg.pct_of_peak_sustained_elapsed
NCU_METRICS+=,launch__registers_per_thread,launch__grid_size,launch__block_size,sm__warps_active.avg.pct_of_peak_sustained_active
NCU_METRICS+=,lts__t_bytes.sum,l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum,l1tex__t_requests_pipe_lsu_mem_global_op_ld.sum

ncu_cases() {  # ncu_cases SECONDS "EXTRA NCU OPTIONS" [CASE ...] -> $OUT/ncu.csv; --clock-control none: leave clocks alone
    local seconds=$1 extra=$2
    shift 2
    # shellcheck disable=SC2086  # the extra options are words
    timeout -k 5 "$seconds" ncu --clock-control none --profile-from-start off --nvtx --csv --page raw $extra \
        --metrics "$NCU_METRICS" --log-file "$OUT/ncu.csv" $PY perf_reports/ncu_cases.py "$@"
}

measure_launches() {  # measure_launches SECONDS: each static-model row's launch timed, bf16 rows first
    # The rows append to measured.jsonl as they finish, so a timeout keeps what was measured. The
    # launches compile ahead in parallel processes first (16 cores; the timing itself is serial).
    local t0=$SECONDS dtype left
    for dtype in bf16 fp32; do
        left=$(( $1 - (SECONDS - t0) ))
        [ "$left" -ge 20 ] || break
        timeout -s INT -k 10 "$left" $PY -m dynconv.cli inspect --bounds --measure "$OUT/measured.jsonl" \
            --case "$dtype" 2>&1 | tail -3
    done
}

pack() {  # pack <name> <paths...>: a tarball of whatever of <paths> exists
    local name=$1; shift
    local present=()
    for p in "$@"; do [ -e "$p" ] && present+=("$p"); done
    [ ${#present[@]} -gt 0 ] && tar czf "$OUT/$name.tar.gz" "${present[@]}" && echo "packed $OUT/$name.tar.gz: ${present[*]}"
}

case $step in
  check)
    environment | tee "$OUT/environment.txt"
    install
    DYNCONV_TEST_DEVICE=cuda timeout $((BUDGET - 30)) $PY -m pytest -q -n 8 --ignore=tests/test_aot.py \
        -p no:cacheprovider --junitxml="$OUT/gpu-tests.xml" 2>&1 | tee "$OUT/gpu-tests.log" | tail -40
    ;;
  tune)
    environment | tee "$OUT/environment.txt"
    install
    timeout "$BUDGET" $PY -m dynconv.cli autotune --quick --output autotune_configs 2>&1 | tee "$OUT/tune.log" | tail -40
    pack tune autotune_configs
    ;;
  bench)
    environment | tee "$OUT/environment.txt"
    install
    timeout "$BUDGET" $PY -m dynconv.cli bench --quick 2>&1 | tee "$OUT/bench.log" | tail -60
    pack bench perf_reports
    ;;
  profile)
    environment | tee "$OUT/environment.txt"
    install
    command -v ncu >/dev/null || { echo "ncu is not on PATH here"; exit 1; }
    ncu_cases "$BUDGET" "" 2>&1 | tee "$OUT/profile.log" | tail -30
    ;;
  sanitize)
    # compute-sanitizer's memcheck over the tests of the kernels that load without masks (clamped
    # or shifted addresses: the pair kernels, the dwconv interior walks) and of the region tables
    # (pixel ids stored at computed slots). The interpreter checks no address, so only a GPU can
    # show a stray read or write.
    environment | tee "$OUT/environment.txt"
    install
    sanitize_tests
    ;;
  measure)
    environment | tee "$OUT/environment.txt"
    install
    measure_launches "$BUDGET"
    ;;
  overhead)
    environment | tee "$OUT/environment.txt"
    install
    timeout "$BUDGET" $PY -m dynconv.cli overhead 2>&1 | tee "$OUT/overhead.log" | tail -40
    ;;
  lease)
    # When a session is lent one machine for 15 minutes, one call must do the lot, most needed
    # first: do the compiled kernels compute what the interpreter says (the kernel test files; the
    # tooling tests need no GPU), then what the ops cost, then counters. Each step is boxed; pytest
    # and bench are stopped with SIGINT so they still report (bench keeps every finished pass).
    # No tuning here: on the first lease (2026-12-04) `autotune --quick` spent its 90 s on the
    # ahead-of-time pruning of 302 candidates, and bench's run-time tuning took 350 s for R1's
    # forward alone. bench runs the launchers' default configs (DYNCONV_AUTOTUNE=0): say so.
    start=$SECONDS
    box() {  # seconds left in the lease after keeping $1 for later steps; never under 5 (timeout 0 waits forever)
        local s=$((${LEASE_S:-540} - (SECONDS - start) - $1)); echo $((s < 5 ? 5 : s)); }
    { environment; nvidia-smi -q -d CLOCK,POWER,PERFORMANCE 2>/dev/null | grep -E 'Graphics|SM|Memory|Power Draw|Slowdown|Throttle' | head -20; } \
        | tee "$OUT/environment.txt"
    install
    tests=(test_dynamic_dwconv test_expert_conv test_expert_conv_rows test_involution_nchw test_involution test_involution_autograd
           test_expert_autograd test_involution_fused test_region_conv test_region_tables test_na2d test_index64
           test_cuda_graph test_involution_fused_autograd test_involution_api test_expert_modules
           test_modules_dropin test_launch_plans test_eager_path test_configs test_thread_safety
           test_peer_checkpoints)
    DYNCONV_TEST_DEVICE=cuda timeout -s INT -k 20 ${LEASE_TEST_S:-200} $PY -m pytest -q -n 16 -rfE \
        -p no:cacheprovider --junitxml="$OUT/gpu-tests.xml" $(printf 'tests/%s.py ' "${tests[@]}") 2>&1 \
        | tee "$OUT/gpu-tests.log" | tail -30
    echo "== tests done at $((SECONDS - start)) s"
    sanitize_tests ${LEASE_SANITIZE_S:-40}
    echo "== sanitize done at $((SECONDS - start)) s"
    measure_launches ${LEASE_MEASURE_S:-150}
    echo "== measure done at $((SECONDS - start)) s"
    DYNCONV_AUTOTUNE=0 timeout -s INT -k 10 $(box 60) $PY -m dynconv.cli bench --quick --quiet --dtypes bf16 \
        --passes forward backward --shapes ${LEASE_SHAPES:-R1 R4 E1 D1 R1-layer R2 E2 R3 N1} 2>&1 \
        | tee "$OUT/bench.log" | tail -25
    pack bench perf_reports/*_H200* perf_reports/*_H100*
    echo "== bench done at $((SECONDS - start)) s"
    if command -v ncu >/dev/null; then
        # The sections bring achieved occupancy and the warps' stall reasons: the first lease's R1
        # forward ran at a fifth of the static model's bound, which counts no latency.
        DYNCONV_AUTOTUNE=0 ncu_cases $(box 5) \
            "--section SpeedOfLight --section Occupancy --section WarpStateStats --section LaunchStats" \
            R1:bf16 R4:bf16 2>&1 | tail -5
    fi
    echo "== lease done at $((SECONDS - start)) s"
    ;;
  all)
    STEP_BUDGET_S=$((BUDGET / 2)) bash "$0" tune
    STEP_BUDGET_S=$((BUDGET / 2)) bash "$0" bench
    ;;
  *)
    echo "unknown step: $step (check|tune|bench|profile|sanitize|overhead|measure|all|lease)" >&2; exit 2 ;;
esac
