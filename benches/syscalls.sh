#!/usr/bin/env bash
# System calls per connection, counted with `strace -c`: bench-server under the cluster (rr,
# 2 workers; the master and the workers counted apart) and plain-reuseport (2 SO_REUSEPORT
# processes, no framework), each driven by wrk with `Connection: close` (one request per
# connection, so "per request" is "per connection"). strace slows every process a lot, so
# batches are smaller than at full speed: these are upper bounds for the cluster's handoff.
#
#   bash benches/syscalls.sh        # needs strace, wrk, curl and a release build
set -euo pipefail
cd "$(dirname "$0")/.."
PORT=${PORT:-18113} DURATION=${DURATION:-4s}
cargo build --release -q -p examples
T=target/release
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

# count NAME PIDS...: traces PIDS (all their threads) during one wrk run; prints per-connection counts.
run() {
  local name=$1; shift
  local tracers=()
  for p in "$@"; do strace -c -f -p "$p" -o "$out/$name.$p" 2>/dev/null & tracers+=($!); done
  sleep 1
  wrk -t1 -c32 -d"$DURATION" -H 'Connection: close' "http://127.0.0.1:$PORT/" | awk '/requests in/{print $1}' > "$out/n"
  kill -INT "${tracers[@]}"; wait "${tracers[@]}" 2>/dev/null || true
}

# table FILES...: syscall counts summed over FILES, divided by the connection count.
table() {
  cat "$@" | awk -v n="$(cat "$out/n")" '
    $NF == "total" || $NF == "syscall" || $1 ~ /^-/ || NF < 5 { next }
    { calls[$NF] += $4 }
    END { for (k in calls) { t += calls[k]; printf "  %-14s %6.2f\n", k, calls[k] / n }; printf "  %-14s %6.2f\n", "= total", t / n }' \
    | sort -k2 -rn
}

start() {
  setsid "$@" >/dev/null 2>&1 &
  pid=$!
  for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$PORT/" && return; sleep 0.05; done
  echo "server did not start" >&2; exit 1
}

CLUSTER_WORKERS=2 PORT=$PORT start $T/bench-server
master=$pid
workers=$(pgrep -P "$master" | tr '\n' ' ')
# shellcheck disable=SC2086
run cluster "$master" $workers
n_cluster=$(cat "$out/n")
echo "cluster rr, $n_cluster connections; master, per connection:"
table "$out/cluster.$master"
echo "cluster rr; workers (both), per connection:"
# shellcheck disable=SC2086
table $(for w in $workers; do echo "$out/cluster.$w"; done)
kill -TERM -- -"$master"; wait "$master" 2>/dev/null || true

WORKERS=2 PORT=$PORT start $T/plain-reuseport
plain=$pid
children=$(pgrep -P "$plain" | tr '\n' ' ')
# shellcheck disable=SC2086
run plain $children
echo "plain-reuseport, $(cat "$out/n") connections; both processes, per connection:"
# shellcheck disable=SC2086
table $(for c in $children; do echo "$out/plain.$c"; done)
kill -TERM -- -"$plain"; wait "$plain" 2>/dev/null || true
