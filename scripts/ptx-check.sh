#!/usr/bin/env bash
# Checks the committed PTX without a GPU:
#   1. every kernels/*.ptx is what its generator kernels/gen_*.py writes (not stale: each
#      generator's --check);
#   2. the PTX interpreter kernels/ptx_sim.py passes its self-test;
#   3. every kernels/*.ptx declares .version <= 8.0 (JIT-able by CUDA 12.0 drivers);
#   4. ptxas assembles each for sm_80 and sm_90 (a file declaring `.target sm_90a`, the
#      Hopper-only wgmma kernels: for sm_90a alone) with -v, --warn-on-spills,
#      --warn-on-local-memory-usage and -Werror: any error, warning, spill or stack use fails;
#   5. prints registers / shared memory / spills per entry and fails above the register budget:
#      MAX_REGS, or the file's own budget from a header line `// vistok: max-regs N` (a
#      tensor-core kernel that keeps whole tiles in registers legitimately needs more).
#
# ptxas comes from PyPI (pinned below) into .cache/cuda-tools (git-ignored), reused when
# present. Needs only python3 with pip and network access to PyPI on first use.
set -euo pipefail
cd "$(dirname "$0")/.."

NVCC_PKG="nvidia-cuda-nvcc-cu12==12.9.86" # ptxas 12.9 (no nvcc inside)
TOOLS=.cache/cuda-tools
PTXAS="$TOOLS/nvidia/cuda_nvcc/bin/ptxas"
MAX_REGS="${MAX_REGS:-64}"
ARCHES=(sm_80 sm_90)

if [ ! -x "$PTXAS" ] || [ "$(cat "$TOOLS/.pinned" 2>/dev/null)" != "$NVCC_PKG" ]; then
    echo "installing $NVCC_PKG into $TOOLS"
    rm -rf "$TOOLS"
    PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check \
        --no-deps --target "$TOOLS" "$NVCC_PKG"
    echo "$NVCC_PKG" >"$TOOLS/.pinned"
fi
"$PTXAS" --version | tail -n 2

for gen in kernels/gen_*.py; do
    python3 "$gen" --check
done
python3 kernels/ptx_sim.py --self-test

shopt -s nullglob
files=(kernels/*.ptx)
if [ ${#files[@]} -eq 0 ]; then
    echo "no PTX files in kernels/" >&2
    exit 1
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
status=0
printf '%-26s %-6s %5s %6s %6s %12s %11s\n' entry arch regs smem stack spill_stores spill_loads
for f in "${files[@]}"; do
    version="$(awk '$1 == ".version" { print $2; exit }' "$f")"
    if [ -z "$version" ] || ! awk -v v="$version" 'BEGIN { split(v, p, "."); exit !(p[1] < 8 || (p[1] == 8 && p[2] <= 0)) }'; then
        echo "$f: .version '$version' is newer than 8.0" >&2
        status=1
    fi
    budget="$(awk '$1 == "//" && $2 == "vistok:" && $3 == "max-regs" { print $4; exit }' "$f")"
    budget="${budget:-$MAX_REGS}"
    arches=("${ARCHES[@]}")
    if [ "$(awk '$1 == ".target" { print $2; exit }' "$f")" = sm_90a ]; then
        arches=(sm_90a)
    fi
    for arch in "${arches[@]}"; do
        log="$work/$(basename "$f" .ptx).$arch.log"
        if ! "$PTXAS" -arch="$arch" -v --warn-on-spills --warn-on-local-memory-usage -Werror \
            "$f" -o "$work/out.cubin" >"$log" 2>&1; then
            echo "ptxas failed on $f for $arch:" >&2
            cat "$log" >&2
            status=1
            continue
        fi
        if grep -qi 'warning' "$log"; then
            echo "ptxas warned on $f for $arch:" >&2
            grep -i 'warning' "$log" >&2
            status=1
        fi
        # Compiling entry function 'X' for 'sm_YY' / N bytes stack frame, N bytes spill stores,
        # N bytes spill loads / Used N registers, [N bytes smem,] ...
        awk -v arch="$arch" -v maxregs="$budget" '
            /Compiling entry function/ { match($0, /\x27[^\x27]+\x27/); name = substr($0, RSTART + 1, RLENGTH - 2) }
            /bytes stack frame/ { stack = $1; stores = $5; loads = $9 }
            /Used [0-9]+ registers/ {
                regs = $0; sub(/.*Used /, "", regs); sub(/ registers.*/, "", regs)
                smem = 0
                if (match($0, /[0-9]+ bytes smem/)) { smem = substr($0, RSTART, RLENGTH); sub(/ .*/, "", smem) }
                printf "%-26s %-6s %5d %6d %6d %12d %11d\n", name, arch, regs, smem, stack, stores, loads
                if (regs + 0 > maxregs || stores + 0 > 0 || loads + 0 > 0 || stack + 0 > 0) bad = 1
                n++
            }
            END { if (n == 0) { print "no entries parsed" > "/dev/stderr"; exit 1 } exit bad }
        ' "$log" || {
            echo "$f ($arch): register budget ($budget) exceeded, spills or stack use" >&2
            status=1
        }
    done
done
if [ "$status" -ne 0 ]; then
    echo "ptx-check: FAILED" >&2
    exit 1
fi
echo "ptx-check: OK (${#files[@]} file(s), ${ARCHES[*]} (sm_90a for .target sm_90a), within register budgets (default $MAX_REGS), no spills)"
