#!/usr/bin/env bash
# Quick side-by-side: bench-server under the cluster (rr, 2 workers) vs plain-reuseport (2
# SO_REUSEPORT processes, same handler), wrk keep-alive and Connection: close, rounds
# interleaved, medians printed. Not the full suite issue 4 asks for.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3} DURATION=${DURATION:-4s} PORT=${PORT:-18080}
cargo build --release -q -p examples
T=target/release
declare -A ka cl
for round in $(seq "$ROUNDS"); do
  for s in cluster plain; do
    if [ $s = cluster ]; then CLUSTER_WORKERS=2 PORT=$PORT setsid $T/bench-server >/dev/null 2>&1 &
    else WORKERS=2 PORT=$PORT setsid $T/plain-reuseport >/dev/null 2>&1 & fi
    pid=$!
    for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$PORT/" && break; sleep 0.05; done
    ka[$s]+=" $(wrk -t1 -c64 -d"$DURATION" "http://127.0.0.1:$PORT/" | awk '/Requests\/sec/{print $2}')"
    cl[$s]+=" $(wrk -t1 -c64 -d"$DURATION" -H 'Connection: close' "http://127.0.0.1:$PORT/" | awk '/Requests\/sec/{print $2}')"
    kill -TERM -- -$pid; wait $pid 2>/dev/null || true
  done
done
median() { tr ' ' '\n' | grep . | sort -n | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}'; }
for load in keepalive close; do
  if [ $load = keepalive ]; then c=$(echo "${ka[cluster]}" | median); p=$(echo "${ka[plain]}" | median)
  else c=$(echo "${cl[cluster]}" | median); p=$(echo "${cl[plain]}" | median); fi
  echo "$load: cluster $c req/s, plain $p req/s, ratio $(awk -v c="$c" -v p="$p" 'BEGIN{printf "%.2f", c/p}')"
done
