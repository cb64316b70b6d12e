#!/usr/bin/env python3
"""Latency percentiles at a fixed request rate below saturation, for every server of the suite
(plain, rr, shared, reuseport, Node's rr, ...), side by side in one run.

    cargo build --release -p examples
    python3 benches/latency.py        # RATE_CLOSE=4000 RATE_KA=20000 DURATION=10 ROUNDS=2

`bench-load` (examples/src/bin/bench-load.rs) releases requests open-loop at a constant rate
(wrk2-style: arrivals do not wait for answers): new connections (`Connection: close`) at
RATE_LOW (1000) and RATE_CLOSE (4000) per second, and keep-alive requests over 32 connections
at RATE_KA (20000) per second.
Latency is from a request's release to the end of its answer, in microseconds; medians over
ROUNDS of each percentile. Writes benches/latency.svg (p50 and p99 per server, new connections at
RATE_LOW). Loopback only; each server is stopped after its runs.
"""
import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import suite  # noqa: E402  (servers, start, stop)

LOAD = os.path.join(suite.REL, "bench-load")
RATE_CLOSE = int(os.environ.get("RATE_CLOSE", "4000"))
# A rate every server sustains (Node's rr saturates below RATE_CLOSE on a 2-core machine).
RATE_LOW = int(os.environ.get("RATE_LOW", "1000"))
RATE_KA = int(os.environ.get("RATE_KA", "20000"))
SECONDS = os.environ.get("DURATION", "10")
ROUNDS = int(os.environ.get("ROUNDS", "2"))
KEYS = ["p50_us", "p90_us", "p99_us", "p999_us", "max_us"]


def load(port, rate, mode):
    out = subprocess.run([LOAD, f"127.0.0.1:{port}", str(rate), SECONDS, mode], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"bench-load failed: {out.stderr}")
    return json.loads(out.stdout)


def main():
    if not os.path.exists(LOAD):
        sys.exit("build it first: cargo build --release -p examples")
    results = {}
    for r in range(ROUNDS):
        for name, cmd, env in suite.servers():
            if name in ("rr-least", "rr-sticky", "tokio-mt"):
                continue
            p = suite.start(cmd, env)
            try:
                for label, mode, rate in (
                    (f"close {RATE_LOW}/s", "close", RATE_LOW),
                    (f"close {RATE_CLOSE}/s", "close", RATE_CLOSE),
                    (f"keep-alive {RATE_KA}/s", "keep-alive", RATE_KA),
                ):
                    res = load(suite.PORT, rate, mode)
                    results.setdefault((name, label), []).append(res)
            finally:
                suite.stop(p)
    print(f"open-loop latency, us (medians of {ROUNDS} rounds of {SECONDS}s); new connections (close) and "
          f"keep-alive requests over 32 connections")
    chart = {}
    for mode in dict.fromkeys(label for _, label in results):
        print(f"\n{mode:22} {'p50':>7} {'p90':>7} {'p99':>7} {'p99.9':>7} {'max':>7} {'errors':>7}   p50, p99 vs plain")
        plain = None
        for (name, m), runs in results.items():
            if m != mode:
                continue
            med = {k: statistics.median(run[k] for run in runs) for k in KEYS}
            errors = sum(run["errors"] for run in runs)
            if name == "plain":
                plain = med
            ratio = f"{med['p50_us'] / plain['p50_us']:.2f}x, {med['p99_us'] / plain['p99_us']:.2f}x" if plain else ""
            if mode == f"close {RATE_LOW}/s":
                chart[name] = med
            print(f"{name:22} {med['p50_us']:7.0f} {med['p90_us']:7.0f} {med['p99_us']:7.0f} {med['p999_us']:7.0f} "
                  f"{med['max_us']:7.0f} {errors:7}   {ratio}")
    write_chart(chart)


def write_chart(chart):
    path = os.path.join(suite.ROOT, "benches", "latency.svg")
    svg(chart, f"new connections at {RATE_LOW}/s", path)
    print(f"\nchart: {path}")


def svg(rows, label, path):
    """A bar chart of p50 and p99 per server for one load (`rows`: name -> medians)."""
    names = list(rows)
    w, h, pad = 760, 360, 60
    top = max(rows[n]["p99_us"] for n in names) or 1
    bw = (w - 2 * pad) / len(names) / 2.5
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">',
             f'<text x="{pad}" y="20" font-size="14">latency, us: {label}, open loop, median of {ROUNDS} rounds '
             f'of {SECONDS}s (benches/latency.py)</text>']
    for i, n in enumerate(names):
        x = pad + i * (w - 2 * pad) / len(names)
        for j, (key, color) in enumerate([("p50_us", "#4477aa"), ("p99_us", "#ee6677")]):
            v = rows[n][key]
            bh = (h - 2 * pad) * v / top
            parts.append(f'<rect x="{x + j * bw:.1f}" y="{h - pad - bh:.1f}" width="{bw:.1f}" height="{bh:.1f}" fill="{color}"/>')
            parts.append(f'<text x="{x + j * bw:.1f}" y="{h - pad - bh - 3:.1f}" font-size="9">{v:.0f}</text>')
        parts.append(f'<text x="{x:.1f}" y="{h - pad + 14}">{n}</text>')
    parts.append(f'<rect x="{w - 160}" y="30" width="10" height="10" fill="#4477aa"/><text x="{w - 145}" y="39">p50</text>')
    parts.append(f'<rect x="{w - 110}" y="30" width="10" height="10" fill="#ee6677"/><text x="{w - 95}" y="39">p99</text>')
    parts.append("</svg>")
    open(path, "w").write("\n".join(parts))


if __name__ == "__main__":
    main()
