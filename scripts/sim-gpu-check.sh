#!/usr/bin/env bash
# Runs the CUDA test suites WITHOUT a GPU: tools/simcuda (a stand-in libcuda.so) takes the
# driver's place and runs every launch on kernels/ptx_sim.py, so the host code (cudarc calls,
# buffers, grids, parameter blocks, multi-launch sequences, the C ABI's device entry points)
# runs for real against the real PTX. Slow (a Python interpreter executes every thread), so
# each test runs alone under a time limit; a test that runs out of time is reported as such,
# not as a failure. CI runs --smoke; run the whole of it before spending GPU time.
#
#   bash scripts/sim-gpu-check.sh [FILTER...]     # tests whose name contains a FILTER (default: all)
#   bash scripts/sim-gpu-check.sh --smoke         # CI's quick subset: every family's host path once
#
# Environment: SIM_TEST_TIMEOUT (seconds per test, default 300), SIM_SUITES (the test binaries,
# default: every suite with GPU tests; of the cli_* suites only the `--backend cuda` tests;
# the library's own cuda::* and capi::cuda::* unit tests always),
# plus tools/simcuda/simcuda.c's VISTOK_SIMCUDA_*.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
timeout_s=${SIM_TEST_TIMEOUT:-300}
suites=${SIM_SUITES:-"cuda_patchify cuda_quant cuda_argmin cuda_attention cuda_merge capi_cuda thread_safety cli_run cli_families cli_quant"}

if [ "${1:-}" = --smoke ]; then
    # About two minutes: each family's device path end to end (uploads, launches, downloads,
    # typed errors), other streams and the module cache, the C ABI's devices, two devices at once.
    set -- gpu_round_trip_is_exact gpu_other_stream_and_module_cache gpu_small_shapes bad_input \
        devices_and_their_errors_are_values cuda_devices_at_once lookup_matches_cpu host_helpers
fi

mkdir -p target/simcuda
cc -std=c99 -O2 -Wall -Wextra -Werror -shared -fPIC -fvisibility=hidden \
    -DSIMCUDA_RUNNER="\"$root/tools/simcuda/runner.py\"" \
    -o target/simcuda/libcuda.so tools/simcuda/simcuda.c -lpthread
python3 tools/simcuda/selftest.py target/simcuda/libcuda.so 2> target/simcuda/selftest.log ||
    { cat target/simcuda/selftest.log >&2; exit 1; }

# The test executables (the README test command's build: --all-features, so CI reuses it).
args=(--lib) # the library's own tests: only those under cuda (incl. capi::cuda) run below
for s in $suites; do args+=(--test "$s"); done
cargo test --release --all-features --no-run --quiet "${args[@]}"
cargo test --release --all-features --no-run --message-format=json "${args[@]}" 2>/dev/null |
    python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["target"]["name"], m["executable"])
    elif m.get("reason") == "compiler-artifact" and m.get("executable") and "rlib" in m["target"]["kind"]:
        print("lib", m["executable"])
' > target/simcuda/executables

[ -s target/simcuda/executables ] || { echo "no test executables found" >&2; exit 1; }

export LD_LIBRARY_PATH="$root/target/simcuda${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export VISTOK_REQUIRE_GPU=1 VISTOK_SIMCUDA=1
pass=0 fail=0 slow=0
log=target/simcuda/log
: > "$log"
while read -r suite exe; do
    while IFS= read -r t; do
        t=${t%: test}
        # The command's suites: only their `--backend cuda` tests.
        case "$suite:$t" in cli_*:*cuda*) ;; cli_*) continue ;; esac
        # The library's tests: its CUDA modules' (cuda::*, capi::cuda::*).
        case "$suite:$t" in lib:cuda::* | lib:capi::cuda::*) ;; lib:*) continue ;; esac
        if [ $# -gt 0 ]; then
            hit=0
            for f in "$@"; do case "$t" in *"$f"*) hit=1 ;; esac; done
            [ $hit = 1 ] || continue
        fi
        start=$(date +%s)
        set +e
        timeout "$timeout_s" "$exe" --exact "$t" --test-threads=1 > target/simcuda/one.log 2>&1
        rc=$?
        set -e
        secs=$(( $(date +%s) - start ))
        if [ $rc = 0 ] && grep -q '^test result: ok. 1 passed' target/simcuda/one.log; then
            verdict=ok; pass=$((pass + 1))
        elif [ $rc = 124 ]; then
            verdict="out of time"; slow=$((slow + 1))
        else
            verdict=FAILED; fail=$((fail + 1))
        fi
        printf '%-14s %-60s %-11s %4ds\n' "$suite" "$t" "$verdict" "$secs" | tee -a "$log"
        if [ "$verdict" = FAILED ]; then
            { echo "----- $suite $t"; tail -40 target/simcuda/one.log; echo "-----"; } | tee -a "$log"
        fi
    done < <("$exe" --list 2>/dev/null | grep ': test$')
done < target/simcuda/executables
echo "simulated GPU: $pass passed, $fail failed, $slow out of time (limit ${timeout_s}s each); log: $log"
[ $fail = 0 ]
