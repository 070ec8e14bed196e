#!/usr/bin/env bash
# GPU check in two halves, for a GPU machine without a Rust toolchain or network:
#
#   scripts/gpu-check.sh build   here: builds every test executable (release, --features cuda,capi)
#                                and the patchify_cuda bench, packs them into gpu-bin/bins.tar.xz
#                                (git-ignored; carry gpu-bin to the GPU machine: loose, they
#                                would pass the 64 MiB a device call carries with the tree).
#   scripts/gpu-check.sh run     there, from the repository root: unpacks them, runs the test executables
#                                that touch the device or the PTX (cuda_*, ptx_abi, cli_*,
#                                capi_cuda, thread_safety, the lib's unit tests;
#                                GPU_CHECK_ALL=1: every one; the PTX-interpreter tests are
#                                skipped, they run in CI: GPU_CHECK_EMULATION=1 keeps them) with
#                                VISTOK_REQUIRE_GPU=1 (no silent skips; the open issues'
#                                suites first, none started after TESTS_BUDGET seconds: those
#                                count as failed), then `vistok bench
#                                --quick` on the cuda rows (family by family, attention, argmin
#                                and merge first, sharing BENCH_TIMEOUT: no case starts past a
#                                family's share, a started one may end after it), then torch on the same
#                                shapes (scripts/gpu_peers.py) for same-session ratios, then the
#                                criterion patchify_cuda bench; prints a summary; exits non-zero
#                                if a test or bench failed.
#   scripts/gpu-check.sh         build if cargo exists, then run.
#
# The binaries load libcuda at run time and embed the PTX; they need nothing from the tree
# except kernels/ (the PTX-generator check reads it; it is part of the checkout anyway).
# When $OUT is a directory, the log is also written to $OUT/gpu-check.log.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=gpu-bin
TEST_TIMEOUT="${TEST_TIMEOUT:-150}"  # seconds per test executable
TESTS_BUDGET="${TESTS_BUDGET:-300}"  # seconds for all of them: none starts after that
BENCH_TIMEOUT="${BENCH_TIMEOUT:-240}"  # seconds for all of `vistok bench`, shared by the families
CRITERION_TIMEOUT="${CRITERION_TIMEOUT:-90}"
PEERS_TIMEOUT="${PEERS_TIMEOUT:-150}"

build() {
    command -v cargo >/dev/null || { echo "gpu-check build: cargo not found" >&2; exit 1; }
    rm -rf "$BIN"
    mkdir -p "$BIN"
    echo "== building tests (release, --features cuda)"
    cargo test --release --features cuda,capi --no-run --message-format=json-render-diagnostics >"$BIN/.tests.json"
    echo "== building the patchify_cuda bench"
    cargo bench --features cuda --bench patchify_cuda --no-run --message-format=json-render-diagnostics >"$BIN/.bench.json"
    echo "== building the vistok command (release, --features cuda)"
    cargo build --release --features cuda --bin vistok
    cp "${CARGO_TARGET_DIR:-target}/release/vistok" "$BIN/vistok"
    python3 - "$BIN" <<'EOF'
import json, shutil, sys, os
out = sys.argv[1]
copied = []
for src, want in ((".tests.json", "test"), (".bench.json", "bench")):
    for line in open(os.path.join(out, src), encoding="utf-8"):
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if msg.get("reason") != "compiler-artifact" or not msg.get("executable"):
            continue
        kinds, name = msg["target"]["kind"], msg["target"]["name"]
        if want == "test" and msg["profile"]["test"] and "bench" not in kinds:
            prefix = "lib" if ("lib" in kinds or "rlib" in kinds) else "test"
            dst = f"test-{prefix}-{name}" if prefix == "lib" else f"test-{name}"
            # The device check runs only what touches the device or the PTX (see `run`); the
            # rest would only make the folder too big to carry (64 MiB with the tree).
            device = prefix == "lib" or name.startswith(("cuda_", "cli_")) or name in ("ptx_abi", "capi_cuda", "thread_safety")
            if not device and os.environ.get("GPU_CHECK_ALL", "0") != "1":
                continue
        elif want == "bench" and "bench" in kinds and name == "patchify_cuda":
            dst = f"bench-{name}"
        else:
            continue
        shutil.copy2(msg["executable"], os.path.join(out, dst))
        copied.append(dst)
if not any(c.startswith("bench-") for c in copied) or not any(c.startswith("test-") for c in copied):
    sys.exit(f"gpu-check build: missing executables (got {copied})")
print("\n".join(sorted(copied)))
EOF
    rm -f "$BIN"/.tests.json "$BIN"/.bench.json
    if command -v strip >/dev/null; then
        strip --strip-debug "$BIN"/test-* "$BIN"/bench-* "$BIN"/vistok
    fi
    {
        echo "built $(date -u +%Y-%m-%dT%H:%M:%SZ) from $(git rev-parse --short HEAD 2>/dev/null || echo '?') on $(uname -m)"
        if command -v objdump >/dev/null; then
            echo "newest glibc symbol needed: $(objdump -T "$BIN"/test-* "$BIN"/bench-* 2>/dev/null | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -n 1)"
        fi
    } >"$BIN/MANIFEST"
    cat "$BIN/MANIFEST"
    # Packed: the loose executables (~60 MiB) plus the tree would pass the 64 MiB a device call
    # may carry; xz makes them ~7 MiB. `run` unpacks them.
    (cd "$BIN" && XZ_OPT="${XZ_OPT:--6 -T0}" tar -cJf bins.tar.xz test-* bench-* vistok && rm -f test-* bench-* vistok)
    local tree carried
    # A report only: a failure here (no git, a deleted tracked file) must not fail the build.
    tree=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -n 1 | cut -f1) || tree=0
    carried=$(du -sb "$BIN" | cut -f1) || carried=0
    echo "$BIN/: $((carried / 1048576)) MiB; with the working tree $(((tree + carried) / 1048576)) MiB of the 64 MiB a device call carries"
}

# Unpacks what `build` packed (GNU tar with xz, or Python's tarfile where xz is missing).
unpack() {
    [ -f "$BIN/bins.tar.xz" ] || return 0
    echo "unpacking $BIN/bins.tar.xz"
    tar -xJf "$BIN/bins.tar.xz" -C "$BIN" 2>/dev/null ||
        python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' "$BIN/bins.tar.xz" "$BIN"
}

find_libcuda() {
    if ldconfig -p 2>/dev/null | grep -q 'libcuda\.so'; then
        return
    fi
    for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/lib/x86_64-linux-gnu /usr/lib64 /usr/local/cuda/compat; do
        if [ -e "$d/libcuda.so.1" ] || [ -e "$d/libcuda.so" ]; then
            export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
            echo "using libcuda from $d"
            return
        fi
    done
    echo "warning: libcuda not found by ldconfig nor in the usual folders" >&2
}

run() {
    [ -d "$BIN" ] || { echo "gpu-check run: no $BIN/ (run 'scripts/gpu-check.sh build' first)" >&2; exit 1; }
    unpack
    [ -f "$BIN/MANIFEST" ] && cat "$BIN/MANIFEST"
    find_libcuda
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    export VISTOK_REQUIRE_GPU=1 RUST_BACKTRACE=1
    # The CLI tests start this vistok (built with --features cuda) instead of the path cargo
    # compiled into them, so `vistok run --backend cuda` is checked on the GPU too.
    export VISTOK_BIN="$PWD/$BIN/vistok"
    export CRITERION_HOME="${TMPDIR:-/tmp}/vistok-criterion"
    local failed=() summary=() start t rc
    start=$(date +%s)
    # The PTX interpreter runs (`kernels/gen_*.py --emulate`, minutes of Python each) need no
    # GPU and run in CI: skipped here unless GPU_CHECK_EMULATION=1.
    local skip=(--skip ptx_runs_on_the_interpreter)
    [ "${GPU_CHECK_EMULATION:-0}" != 1 ] || skip=()
    # The suites of the open work first, so that a budget cut leaves the rest.
    local ordered=() name
    for name in cuda_attention cuda_argmin cuda_merge cuda_quant lib-vistok capi_cuda thread_safety cuda_patchify ptx_abi; do
        [ -x "$BIN/test-$name" ] && ordered+=("$BIN/test-$name")
    done
    for exe in "$BIN"/test-*; do
        case " ${ordered[*]} " in *" $exe "*) ;; *) ordered+=("$exe") ;; esac
    done
    for exe in "${ordered[@]}"; do
        # The CPU-only suites (property tests of the host backends) run in CI; on the lent GPU
        # (minutes of device time) only what touches the device or the PTX runs, unless
        # GPU_CHECK_ALL=1.
        case "$(basename "$exe")" in
            test-cuda_* | test-ptx_abi | test-cli_* | test-lib-* | test-capi_cuda | test-thread_safety) ;;
            *)
                if [ "${GPU_CHECK_ALL:-0}" != 1 ]; then
                    summary+=("$(printf '%-40s %s' "$(basename "$exe")" "not run (CPU-only; GPU_CHECK_ALL=1 runs it)")")
                    continue
                fi
                ;;
        esac
        if [ $(($(date +%s) - start)) -ge "$TESTS_BUDGET" ]; then
            summary+=("$(printf '%-40s %s' "$(basename "$exe")" "NOT RUN (TESTS_BUDGET=${TESTS_BUDGET}s spent)")")
            failed+=("$(basename "$exe")(not run)")
            continue
        fi
        echo
        echo "=== $exe"
        t=$(date +%s)
        rc=0
        timeout "$TEST_TIMEOUT" "$exe" --color never "${skip[@]}" || rc=$?
        summary+=("$(printf '%-40s %s %4ss' "$(basename "$exe")" "$([ $rc -eq 0 ] && echo ok || echo "FAILED($rc)")" $(($(date +%s) - t)))")
        [ $rc -eq 0 ] || failed+=("$(basename "$exe")")
    done
    # The harness next, family by family in the order of what the open issues wait for, each
    # with a share of BENCH_TIMEOUT as its --time-limit (it starts no case past it, lists the
    # ones left out, and streams each row to the log as it finishes, so even a run killed from
    # outside keeps its figures). Then the peers, then the criterion bench (naming check).
    if [ -x "$BIN/vistok" ]; then
        local fam share deadline=$(($(date +%s) + BENCH_TIMEOUT)) left
        for fam in attention argmin merge lfq fsq patchify unpatchify; do
            left=$((deadline - $(date +%s)))
            case "$fam" in attention | argmin | merge) share=$((BENCH_TIMEOUT / 5)) ;; *) share=$((BENCH_TIMEOUT / 12)) ;; esac
            [ "$share" -le "$((left - 15))" ] || share=$((left - 15))
            echo
            echo "=== vistok bench --quick --filter '$fam/cuda/*' --time-limit $share (the harness, on the GPU)"
            if [ "$share" -le 0 ]; then
                summary+=("$(printf '%-40s %s' "vistok bench $fam (cuda)" "not run (BENCH_TIMEOUT spent)")")
                continue
            fi
            t=$(date +%s)
            rc=0
            local extra=()
            if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then
                extra=(--json "$OUT/bench-gpu-$fam.json" --plot "$OUT/roofline-gpu-$fam.svg")
            fi
            # --time-limit bounds the start of the last case; the timeout (one case's worth more)
            # only catches a hang.
            timeout "$((share + 60))" "$BIN/vistok" bench --quick --filter "$fam/cuda/*" --time-limit "$share" "${extra[@]}" || rc=$?
            summary+=("$(printf '%-40s %s %4ss' "vistok bench $fam (cuda)" "$([ $rc -eq 0 ] && echo ok || echo "FAILED($rc)")" $(($(date +%s) - t)))")
            [ $rc -eq 0 ] || failed+=("vistok-bench-$fam")
        done
    fi
    if command -v python3 >/dev/null; then
        echo
        echo "=== torch on the same GPU, same session (scripts/gpu_peers.py): the peers' numbers for ratios"
        t=$(date +%s)
        rc=0
        timeout "$PEERS_TIMEOUT" python3 scripts/gpu_peers.py || rc=$?
        # A peer is context, not a check: its failure is reported, not fatal.
        summary+=("$(printf '%-40s %s %4ss' "gpu peers (torch)" "$([ $rc -eq 0 ] && echo ok || echo "rc=$rc (not fatal)")" $(($(date +%s) - t)))")
    fi
    for exe in "$BIN"/bench-*; do
        echo
        echo "=== $exe --bench"
        t=$(date +%s)
        rc=0
        timeout "$CRITERION_TIMEOUT" "$exe" --bench --noplot --warm-up-time 0.5 --measurement-time 1.5 || rc=$?
        summary+=("$(printf '%-40s %s %4ss' "$(basename "$exe")" "$([ $rc -eq 0 ] && echo ok || echo "FAILED($rc)")" $(($(date +%s) - t)))")
        [ $rc -eq 0 ] || failed+=("$(basename "$exe")")
    done
    echo
    echo "=== summary ($(($(date +%s) - start)) s)"
    printf '%s\n' "${summary[@]}"
    if [ ${#failed[@]} -ne 0 ]; then
        echo "gpu-check: FAILED: ${failed[*]}"
        return 1
    fi
    echo "gpu-check: OK"
}

main() {
    case "${1:-all}" in
        build) build ;;
        run) run ;;
        all)
            if command -v cargo >/dev/null; then build; fi
            run
            ;;
        *) echo "usage: $0 [build|run]" >&2; exit 64 ;;
    esac
}

if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ] && [ -w "${OUT:-}" ]; then
    set -o pipefail
    main "$@" 2>&1 | tee "$OUT/gpu-check.log"
else
    main "$@"
fi
