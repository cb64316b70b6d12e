#!/usr/bin/env python3
"""The benchmark suite (issue 4): one command, side-by-side figures from one run.

    python3 benches/suite.py            # ROUNDS=3 DURATION=4s by default
    ROUNDS=5 DURATION=5s python3 benches/suite.py
    SERVERS=plain,rr,rr-gather0 python3 benches/suite.py   # only these servers

Servers, all with the identical hello-world handler (examples::bench::serve) except Node:
  cluster rr/round-robin, rr/least-connections, rr/sticky, shared, reuseport (bench-server,
  2 workers); plain (2 SO_REUSEPORT tokio processes, no framework: the speed limit);
  tokio-mt (bench-server with CLUSTER_WORKERS=0: one process, multi-threaded runtime);
  node-rr (../shared/anchors/node/hello-cluster.js, 2 workers) when `node` is present.
Each round starts every server in turn and drives it with wrk (-t1 -c64) keep-alive and
`Connection: close`; medians over rounds, ratios against `plain`; and the CPU time of all
the server's processes per request (utime + stime from /proc over each run), with the
master's share. Then: spawn-to-ready times, RSS, master CPU per 100k dispatched connections,
and how connections spread across workers under each balancer (uniform load, and a mixed
load with slow requests).
Writes benches/results.svg (a bar chart of the medians). Needs wrk and a release build.
"""

import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from http.client import HTTPConnection

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REL = os.path.join(ROOT, "target", "release")
ROUNDS = int(os.environ.get("ROUNDS", "3"))
DURATION = os.environ.get("DURATION", "4s")
PORT = int(os.environ.get("PORT", "18090"))
NODE_JS = os.path.join(ROOT, "..", "shared", "anchors", "node", "hello-cluster.js")


def servers():
    bench = os.path.join(REL, "bench-server")
    base = {"CLUSTER_WORKERS": "2"}
    out = [
        ("plain", [os.path.join(REL, "plain-reuseport")], {"WORKERS": "2"}),
        ("rr", [bench], {**base, "CLUSTER_BALANCER": "round-robin"}),
        ("rr-least", [bench], {**base, "CLUSTER_BALANCER": "least-connections"}),
        ("rr-sticky", [bench], {**base, "CLUSTER_BALANCER": "sticky"}),
        # Two accept threads in the master (`CLUSTER_ACCEPT_THREADS`): what they cost on a
        # machine whose cores are already busy.
        ("rr-2acc", [bench], {**base, "CLUSTER_ACCEPT_THREADS": "2"}),
        # rr without gathering new connections between accept passes (the default gathers
        # for 100 µs while they keep coming): what the gathering saves, and costs.
        ("rr-gather0", [bench], {**base, "CLUSTER_ACCEPT_GATHER_US": "0"}),
        ("shared", [bench], {**base, "CLUSTER_SCHED_POLICY": "shared"}),
        ("reuseport", [bench], {**base, "CLUSTER_SCHED_POLICY": "reuseport"}),
        ("tokio-mt", [bench], {"CLUSTER_WORKERS": "0"}),
    ]
    # BASELINE=<dir with another build's bench-server>: that build's rr beside this one, in the
    # same rounds (to see what a change costs, side by side on this noisy machine).
    baseline = os.environ.get("BASELINE")
    if baseline:
        out.insert(2, ("rr-baseline", [os.path.join(baseline, "bench-server")], {**base}))
    if subprocess.run(["sh", "-c", "command -v node"], capture_output=True).returncode == 0 and os.path.exists(NODE_JS):
        out.append(("node-rr", ["node", NODE_JS], {"WORKERS": "2", "NODE_CLUSTER_SCHED_POLICY": "rr"}))
    # SERVERS=plain,rr,...: only these (the default is every one).
    only = os.environ.get("SERVERS")
    if only:
        out = [server for server in out if server[0] in only.split(",")]
    return out


def start(cmd, env, port=PORT, stderr=subprocess.DEVNULL):
    full = {**os.environ, "HOST": "127.0.0.1", "PORT": str(port), **env}
    p = subprocess.Popen(cmd, env=full, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1).read()
            return p
        except OSError:
            time.sleep(0.05)
    stop(p)
    sys.exit(f"{cmd} did not start")


def stop(p):
    try:
        os.killpg(p.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        p.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def wrk(close, port=PORT):
    args = ["wrk", "-t1", "-c64", f"-d{DURATION}", f"http://127.0.0.1:{port}/"]
    if close:
        args[1:1] = ["-H", "Connection: close"]
    out = subprocess.run(args, capture_output=True, text=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    errors = sum(int(x) for x in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    return rps, total, errors


def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port():
    """A free port on 127.0.0.1, from the OS (bound to 0, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(what, f, timeout=20.0):
    """Polls `f` every 5 ms until it returns something true (returned), or raises TimeoutError
    naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = f()
        if v:
            return v
        time.sleep(0.005)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def alive(pid):
    """Whether process `pid` exists and is not a zombie."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def rss_kib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def children(pid):
    try:
        return [int(c) for c in open(f"/proc/{pid}/task/{pid}/children").read().split()]
    except OSError:
        return []


def tree_cpu(pid):
    """CPU seconds of a server's first process and of its children, by pid."""
    out = {}
    for q in [pid] + children(pid):
        try:
            out[q] = cpu_seconds(q)
        except OSError:
            pass
    return out


def cpu_per_request(before, after, requests, only=None):
    """Microseconds of CPU per request between two `tree_cpu` readings (of `only` if given)."""
    used = sum(after[q] - before.get(q, 0.0) for q in after if only is None or q == only)
    return used / max(requests, 1) * 1e6


def throughput():
    results = {}  # name -> {"ka": [...], "close": [...], "cpu_ka": [...], "cpu_close": [...], ...}
    master_cpu = []  # (cpu seconds, connections) for rr close runs
    for r in range(ROUNDS):
        for name, cmd, env in servers():
            p = start(cmd, env)
            t0 = tree_cpu(p.pid)
            ka = wrk(False)
            t1 = tree_cpu(p.pid)
            cl = wrk(True)
            t2 = tree_cpu(p.pid)
            if name == "rr":
                master_cpu.append((t2.get(p.pid, 0.0) - t1.get(p.pid, 0.0), cl[1]))
            stop(p)
            d = results.setdefault(name, {"ka": [], "close": [], "errors": 0, "cpu_ka": [], "cpu_close": [],
                                          "master_ka": [], "master_close": []})
            d["ka"].append(ka[0])
            d["close"].append(cl[0])
            d["errors"] += ka[2] + cl[2]
            # Server CPU per request: the steadier figure on a shared machine (every process of
            # the server; the master's own share apart, for the clusters).
            d["cpu_ka"].append(cpu_per_request(t0, t1, ka[1]))
            d["cpu_close"].append(cpu_per_request(t1, t2, cl[1]))
            d["master_ka"].append(cpu_per_request(t0, t1, ka[1], only=p.pid))
            d["master_close"].append(cpu_per_request(t1, t2, cl[1], only=p.pid))
            print(f"round {r + 1}: {name:10} keep-alive {ka[0]:>10.0f} req/s   close {cl[0]:>9.0f} req/s", flush=True)
    return results, master_cpu


def spawn_times():
    """Start-to-ready of 50+ worker processes (rolling reloads of 2 workers)."""
    env = {"CLUSTER_WORKERS": "2", "CLUSTER_LOG_FORMAT": "json"}
    p = start([os.path.join(REL, "bench-server")], env, stderr=subprocess.PIPE)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(iter(p.stderr.readline, b"")), daemon=True)
    reader.start()

    def events(name):
        # The master's log events (one JSON object per line); a worker's output may precede one.
        found = []
        for l in list(lines):
            at = l.find(b'{"timestamp"')
            if at >= 0:
                try:
                    e = json.loads(l[at:])
                except ValueError:
                    continue
                if e.get("event") == name:
                    found.append(e)
        return found

    for _ in range(25):
        n = len(events("reload_done"))
        os.kill(p.pid, signal.SIGHUP)
        deadline = time.time() + 10
        while len(events("reload_done")) <= n and time.time() < deadline:
            time.sleep(0.01)
    idle_master, idle_workers = rss_kib(p.pid), [rss_kib(c) for c in children(p.pid)]
    stop(p)
    us = sorted(e["us"] for e in events("ready"))
    return us, idle_master, idle_workers


def spread():
    """Connections per worker under each balancer: uniform, then mixed (10% take 50 ms)."""
    out = {}
    for balancer in ["round-robin", "least-connections", "sticky"]:
        env = {"CLUSTER_WORKERS": "2", "CLUSTER_BALANCER": balancer, "PORT": str(PORT + 1)}
        p = start([os.path.join(ROOT, "target", "release", "hello")], env, port=PORT + 1)
        for mixed in [False, True]:
            counts, lat, lock = {}, [], threading.Lock()

            def client(k):
                for i in range(100):
                    path = "/sleep?ms=50" if mixed and (i + k) % 10 == 0 else "/worker"
                    t = time.perf_counter()
                    c = HTTPConnection("127.0.0.1", PORT + 1, timeout=10)
                    c.request("GET", path, headers={"connection": "close"})
                    body = c.getresponse().read().decode()
                    c.close()
                    with lock:
                        lat.append(time.perf_counter() - t)
                        m = re.search(r'"id":(\d+)', body)
                        if m:
                            counts[int(m.group(1))] = counts.get(int(m.group(1)), 0) + 1

            ts = [threading.Thread(target=client, args=(k,)) for k in range(8)]
            started = time.perf_counter()
            [t.start() for t in ts]
            [t.join() for t in ts]
            wall = time.perf_counter() - started
            lat.sort()
            out[(balancer, mixed)] = (dict(sorted(counts.items())), lat[len(lat) // 2], lat[int(len(lat) * 0.99)], wall)
        stop(p)
    return out


def svg(results, path):
    names = list(results)
    w, h, pad = 760, 360, 60
    top = max(max(statistics.median(results[n]["ka"]), statistics.median(results[n]["close"])) for n in names)
    bw = (w - 2 * pad) / len(names) / 2.5
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">',
             f'<text x="{pad}" y="20" font-size="14">req/s, median of {ROUNDS} rounds (wrk -t1 -c64 {DURATION}, 2 workers)</text>']
    for i, n in enumerate(names):
        x = pad + i * (w - 2 * pad) / len(names)
        for j, (key, color) in enumerate([("ka", "#4477aa"), ("close", "#ee6677")]):
            v = statistics.median(results[n][key])
            bh = (h - 2 * pad) * v / top
            parts.append(f'<rect x="{x + j * bw:.1f}" y="{h - pad - bh:.1f}" width="{bw:.1f}" height="{bh:.1f}" fill="{color}"/>')
            parts.append(f'<text x="{x + j * bw:.1f}" y="{h - pad - bh - 3:.1f}" font-size="9">{v / 1000:.0f}k</text>')
        parts.append(f'<text x="{x:.1f}" y="{h - pad + 14}">{n}</text>')
    parts.append(f'<rect x="{w - 200}" y="30" width="10" height="10" fill="#4477aa"/><text x="{w - 185}" y="39">keep-alive</text>')
    parts.append(f'<rect x="{w - 110}" y="30" width="10" height="10" fill="#ee6677"/><text x="{w - 95}" y="39">Connection: close</text>')
    parts.append("</svg>")
    open(path, "w").write("\n".join(parts))


def main():
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "examples"], cwd=ROOT, check=True)
    print(f"machine: {os.cpu_count()} cpus, {os.uname().release}; ROUNDS={ROUNDS} DURATION={DURATION}\n")
    results, master_cpu = throughput()
    plain = results["plain"]
    print("\n| server | keep-alive req/s | ratio | close req/s | ratio | socket errors |")
    print("|---|---|---|---|---|---|")
    for name, d in results.items():
        ka, cl = statistics.median(d["ka"]), statistics.median(d["close"])
        print(f"| {name} | {ka:.0f} | {ka / statistics.median(plain['ka']):.2f} | {cl:.0f} | "
              f"{cl / statistics.median(plain['close']):.2f} | {d['errors']} |")
    # CPU time of every server process per request: far steadier than req/s on a shared
    # machine. The master's share is its own process (for `plain`, `tokio-mt` and Node, the
    # first process, which serves or forks).
    med = statistics.median
    print("\n| server | CPU µs/request keep-alive | ratio | CPU µs/request close | ratio | first process's share (close) |")
    print("|---|---|---|---|---|---|")
    for name, d in results.items():
        ka, cl = med(d["cpu_ka"]), med(d["cpu_close"])
        print(f"| {name} | {ka:.1f} | {ka / med(plain['cpu_ka']):.2f} | {cl:.1f} | {cl / med(plain['cpu_close']):.2f} | "
              f"{med(d['master_close']):.1f} |")
    if "node-rr" in results:
        ratio = statistics.median(results["rr"]["close"]) / statistics.median(results["node-rr"]["close"])
        print(f"\nrr vs Node cluster rr, new connections: {ratio:.2f}x")
    cpu = sum(c for c, _ in master_cpu) / max(1, sum(n for _, n in master_cpu)) * 100_000
    print(f"master CPU per 100k dispatched connections (rr, close): {cpu:.2f} s")
    us, m_rss, w_rss = spawn_times()
    if us:
        print(f"worker start-to-ready over {len(us)} spawns: p50 {us[len(us) // 2] / 1000:.1f} ms, "
              f"p99 {us[min(len(us) - 1, int(len(us) * 0.99))] / 1000:.1f} ms")
    print(f"RSS idle: master {m_rss} KiB, workers {w_rss} KiB")
    print("\n| balancer | load | connections per worker | p50 | p99 | wall |")
    print("|---|---|---|---|---|---|")
    for (balancer, mixed), (counts, p50, p99, wall) in spread().items():
        load = "mixed (10% sleep 50 ms)" if mixed else "uniform"
        print(f"| {balancer} | {load} | {counts} | {p50 * 1000:.1f} ms | {p99 * 1000:.1f} ms | {wall:.2f} s |")
    svg(results, os.path.join(ROOT, "benches", "results.svg"))
    print("\nchart: benches/results.svg")


if __name__ == "__main__":
    main()
