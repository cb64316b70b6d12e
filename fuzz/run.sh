#!/usr/bin/env bash
# Runs every fuzz target for FUZZ_SECONDS (default 20), JOBS at a time (default 1), each from
# its committed seeds (fuzz/seeds/TARGET) and the corpus of earlier runs (fuzz/corpus/TARGET,
# not committed), and prints one line of figures per target. A crash stops the run with the
# target's output; its input is in fuzz/artifacts/TARGET/. Needs `cargo +nightly` and
# cargo-fuzz (`cargo install cargo-fuzz`).
#
#     bash fuzz/run.sh                              # 20 s each (what .ci/run does)
#     FUZZ_SECONDS=900 JOBS=2 bash fuzz/run.sh      # the long runs in RELIABILITY.md
set -euo pipefail
cd "$(dirname "$0")"
seconds="${FUZZ_SECONDS:-20}"
jobs="${JOBS:-1}"
targets=(to_master to_worker fragments control_line admin_head upgrade_handshake settings)

cargo +nightly fuzz build -O >/dev/null 2>&1 || cargo +nightly fuzz build -O
mkdir -p logs
run() {
    local t="$1"
    mkdir -p "corpus/$t"
    if ! cargo +nightly fuzz run -O "$t" "corpus/$t" "seeds/$t" -- -max_total_time="$seconds" -print_final_stats=1 \
        >"logs/$t.log" 2>&1; then
        echo "fuzz: $t FAILED (its output: fuzz/logs/$t.log; the input: fuzz/artifacts/$t/)" >&2
        tail -40 "logs/$t.log" >&2
        return 1
    fi
    # The last status line: executions, coverage (edges), features, corpus; exec/s.
    local done
    done=$(grep -E '^#[0-9]+[[:space:]]+DONE' "logs/$t.log" | tail -1)
    printf '%-18s %s s  %s\n' "$t" "$seconds" "$(echo "$done" | sed -E 's/^#([0-9]+)[[:space:]]+DONE[[:space:]]+/\1 runs  /')"
}
failed=0
pids=()
for t in "${targets[@]}"; do
    run "$t" &
    pids+=($!)
    if [ "${#pids[@]}" -ge "$jobs" ]; then
        wait "${pids[0]}" || failed=1
        pids=("${pids[@]:1}")
    fi
done
for p in "${pids[@]}"; do
    wait "$p" || failed=1
done
exit "$failed"
