#!/usr/bin/env bash
# Context switches per connection of the master and of the workers (voluntary + involuntary,
# from /proc/<pid>/task/*/status), bench-server under `rr` with 2 workers, while
# `wrk -t1 -c64 -d3s -H 'Connection: close'` runs: how often the data path puts each process
# to sleep and wakes it. With BASELINE=<release dir of another build>, that build's
# bench-server takes turns with this one, round by round; medians are printed.
#
#   bash benches/wakeups.sh [ROUNDS]          # needs wrk, curl and a release build
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-5} PORT=${PORT:-18520}
cargo build --release -q -p examples
declare -A builds=([this]=target/release/bench-server)
[ -n "${BASELINE:-}" ] && builds[base]=$BASELINE/bench-server
declare -A master workers

# Every thread's (the master's data path runs on threads of its own).
switches() { local t=0 p; for p in "$@"; do t=$((t + $(cat /proc/$p/task/*/status | awk '/ctxt_switches/{s+=$2} END{print s+0}'))); done; echo $t; }

for round in $(seq "$ROUNDS"); do
  for name in "${!builds[@]}"; do
    CLUSTER_WORKERS=2 PORT=$PORT HOST=127.0.0.1 setsid "${builds[$name]}" >/dev/null 2>&1 &
    pid=$!
    for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$PORT/" && break; sleep 0.05; done
    kids=$(pgrep -P $pid | tr '\n' ' ')
    m0=$(switches $pid); w0=$(switches $kids)
    n=$(wrk -t1 -c64 -d3s -H 'Connection: close' "http://127.0.0.1:$PORT/" | awk '/requests in/{print $1}')
    m1=$(switches $pid); w1=$(switches $kids)
    master[$name]+=" $(awk -v a="$m0" -v b="$m1" -v n="$n" 'BEGIN{printf "%.3f", (b-a)/n}')"
    workers[$name]+=" $(awk -v a="$w0" -v b="$w1" -v n="$n" 'BEGIN{printf "%.3f", (b-a)/n}')"
    kill -TERM -- -$pid; wait $pid 2>/dev/null || true
    PORT=$((PORT + 1))
  done
done
median() { tr ' ' '\n' | grep . | sort -n | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}'; }
for name in "${!builds[@]}"; do
  echo "$name: context switches per connection: master $(echo "${master[$name]}" | median) (rounds${master[$name]}), workers $(echo "${workers[$name]}" | median) (rounds${workers[$name]})"
done
