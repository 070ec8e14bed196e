#!/usr/bin/env bash
# Deterministic regression check of the CPU kernels: instruction counts (valgrind / callgrind
# `Ir`) of benches/patchify_instructions.rs, compared with benches/instructions-baseline.json.
#
#   bash scripts/instructions-check.sh                  # compare; fail on a >2 % increase
#   bash scripts/instructions-check.sh --threshold 0.5  # a tighter threshold, in percent
#   bash scripts/instructions-check.sh --update         # rewrite the baseline (commit it)
#   bash scripts/instructions-check.sh --once           # one run instead of two
#
# Needs valgrind (`apt-get install valgrind`) and python3. The first run installs
# gungraun-runner into .cache/gungraun/ (git-ignored) with `cargo install --locked`, at the
# version that Cargo.toml pins for the `gungraun` dev-dependency: the runner and the library
# must match exactly. Respects CARGO_TARGET_DIR.
#
# The bench binary is built once and run twice; the script fails if any count differs between
# the runs (they are single-threaded and the environment is cleared, so they must not).
#
# Exit status: 0 when no count grew by more than the threshold, 1 when some did (each named)
# or a run was not repeatable or a baseline entry is missing, 2 on a usage or setup error.
# Improvements and new benches are reported, not failures.
#
# Under valgrind the CPU reports no AVX-512, so `Backend::Cpu` measures the AVX2 (v3) path:
# these counts do not cover the AVX-512 micro-kernels (the criterion bench does).
#
# Counts depend on the compiler and valgrind versions too: the baseline records both, and the
# script warns when yours differ (rebaseline with --update on an unchanged tree then).
set -euo pipefail
cd "$(dirname "$0")/.."

BENCH=patchify_instructions
BASELINE=benches/instructions-baseline.json
THRESHOLD=2
UPDATE=0
RUNS=2

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
    case "$1" in
        --update) UPDATE=1 ;;
        --once) RUNS=1 ;;
        --threshold) THRESHOLD="${2:?--threshold needs a percentage}"; shift ;;
        --threshold=*) THRESHOLD="${1#*=}" ;;
        -h|--help) usage; exit 0 ;;
        *) echo "instructions-check: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done
[[ "$THRESHOLD" =~ ^[0-9]+([.][0-9]+)?$ ]] || { echo "instructions-check: --threshold '$THRESHOLD' is not a percentage" >&2; exit 2; }

command -v valgrind >/dev/null || { echo "instructions-check: valgrind not found (apt-get install valgrind)" >&2; exit 2; }
command -v python3 >/dev/null || { echo "instructions-check: python3 not found" >&2; exit 2; }

# The runner, at exactly the library's version.
VERSION=$(sed -n 's/^gungraun = "=\([0-9.]*\)".*/\1/p' Cargo.toml)
[ -n "$VERSION" ] || { echo "instructions-check: no pinned 'gungraun = \"=X.Y.Z\"' in Cargo.toml" >&2; exit 2; }
ROOT="$PWD/.cache/gungraun"
RUNNER="$ROOT/bin/gungraun-runner"
if [ ! -x "$RUNNER" ] || [ "$("$RUNNER" --version 2>/dev/null)" != "gungraun-runner $VERSION" ]; then
    echo "instructions-check: installing gungraun-runner $VERSION into $ROOT (once; a few minutes)" >&2
    # Its own target dir, so the install neither disturbs nor is disturbed by the crate's.
    CARGO_TARGET_DIR="$ROOT/build" cargo install gungraun-runner --version "=$VERSION" --locked --root "$ROOT" >&2
    rm -rf "$ROOT/build"
fi
export GUNGRAUN_RUNNER="$RUNNER"

START=$SECONDS
echo "instructions-check: building the bench" >&2
EXE=$(cargo bench --bench "$BENCH" --no-run --message-format=json-render-diagnostics \
    | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == sys.argv[1] and m.get("executable"):
        print(m["executable"])
' "$BENCH") || { echo "instructions-check: building the bench failed (cargo's errors above)" >&2; exit 2; }
[ -n "$EXE" ] || { echo "instructions-check: cargo did not report the $BENCH executable" >&2; exit 2; }

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
for run in $(seq 1 "$RUNS"); do
    echo "instructions-check: run $run of $RUNS under valgrind" >&2
    # As `cargo bench` runs it: from the package root, with the package's name for the output dir.
    if ! CARGO_PKG_NAME=vistok "$EXE" --bench --output-format=json >"$TMP/run$run.json" 2>"$TMP/run$run.err"; then
        cat "$TMP/run$run.err" >&2
        echo "instructions-check: the bench failed under valgrind (output above)" >&2
        exit 2
    fi
done

rc=0
python3 - "$BASELINE" "$THRESHOLD" "$UPDATE" "$TMP" "$RUNS" "$VERSION" <<'PY' || rc=$?
import json, os, re, subprocess, sys

baseline_path, threshold, update, tmp, runs, version = sys.argv[1:]
threshold, update, runs = float(threshold), update == "1", int(runs)


def counts(path):
    """bench id (`function/bench`) -> Ir, from gungraun's JSON lines."""
    out = {}
    for line in open(path):
        if line.strip():
            b = json.loads(line)
            out[f"{b['function_name']}/{b['id']}"] = int(b["profiles"][0]["data"]["total"]["metrics"]["Ir"]["values"]["new"])
    return out


results = [counts(os.path.join(tmp, f"run{i}.json")) for i in range(1, runs + 1)]
current = results[0]
if not current:
    sys.exit("instructions-check: the bench reported no counts")
unstable = [k for k in current if any(r.get(k) != current[k] for r in results[1:])]

first_line = lambda cmd: subprocess.run(cmd, capture_output=True, text=True).stdout.splitlines()[0].strip()
env = {"rustc": first_line(["rustc", "--version"]), "valgrind": first_line(["valgrind", "--version"]),
       "gungraun": version}

print("Instruction counts (callgrind Ir), 1 thread. Under valgrind the CPU reports no AVX-512:")
print("`cpu` (Backend::Cpu) measures the AVX2 (v3) path, like `v3`; AVX-512 is not covered here.")
if runs > 1:
    print(f"{runs} runs: " + ("identical counts." if not unstable else f"counts DIFFER for {', '.join(unstable)}"))

if update:
    if unstable:
        sys.exit("instructions-check: not writing a baseline from counts that are not repeatable")
    doc = {"note": "Written by scripts/instructions-check.sh --update; callgrind Ir per bench of "
                   "benches/patchify_instructions.rs. Counts depend on rustc and valgrind too.",
           **env, "ir": dict(sorted(current.items()))}
    with open(baseline_path, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    width = max(map(len, current))
    for k, v in current.items():
        print(f"  {k:<{width}}  {v:>10}")
    print(f"instructions-check: wrote {len(current)} counts to {baseline_path}")
    sys.exit(0)

try:
    base_doc = json.load(open(baseline_path))
except FileNotFoundError:
    sys.exit(f"instructions-check: no baseline {baseline_path}; create it with --update")
base = base_doc["ir"]
for key, now in env.items():
    if base_doc.get(key) != now:
        print(f"warning: baseline made with {key} '{base_doc.get(key)}', this is '{now}': "
              "counts may differ for that reason alone")

regressed, improved, new, missing = [], [], [], sorted(set(base) - set(current))
width = max(map(len, list(current) + list(base)))
print(f"  {'bench':<{width}}  {'baseline':>10}  {'now':>10}  change")
for k, now in current.items():
    if k not in base:
        new.append(k)
        print(f"  {k:<{width}}  {'-':>10}  {now:>10}  new")
        continue
    pct = 100.0 * (now - base[k]) / base[k] if base[k] else (0.0 if now == 0 else float("inf"))
    tag = ""
    if pct > threshold:
        regressed.append((k, pct))
        tag = "  REGRESSED"
    elif pct < -threshold:
        improved.append((k, pct))
        tag = "  improved"
    print(f"  {k:<{width}}  {base[k]:>10}  {now:>10}  {pct:+6.2f}%{tag}")

for k, pct in improved:
    print(f"improved: {k} ({pct:+.2f}%); consider --update to lock it in")
for k in new:
    print(f"new: {k} (not in the baseline; --update adds it)")
for k in missing:
    print(f"MISSING: {k} is in the baseline but did not run (renamed? --update)")
for k, pct in regressed:
    print(f"REGRESSED: {k}: Ir {pct:+.2f}% (threshold {threshold:g}%)")
failed = bool(regressed or missing or unstable)
print(f"instructions-check: {'FAILED' if failed else 'ok'}: {len(current)} benches, {len(regressed)} regressed, "
      f"{len(improved)} improved, {len(new)} new, {len(missing)} missing (threshold {threshold:g}%)")
sys.exit(1 if failed else 0)
PY
echo "instructions-check: $((SECONDS - START)) s (build + $RUNS valgrind runs)" >&2
exit "$rc"
