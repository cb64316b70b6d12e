#!/usr/bin/env python3
"""The application's metrics, side by side in one run (issue 24's figures):

- keep-alive req/s (wrk -t1 -c64 -d4s) of `metrics-hello` (2 workers) with the feature on,
  and the same program built with `--no-default-features` (its records go to the facade's no-op
  recorder), rounds taking turns;
- the time of a scrape of the admin endpoint's /metrics with 8 workers, first with the master's
  own series only, then with 1,000 series in each worker (`/labels?n=1000` on every worker),
  median of 20, and its size.

    python3 benches/metrics.py [ROUNDS]

Builds both in release mode (the second into target/no-metrics). Needs wrk and curl.
"""

import os
import statistics
import subprocess
import sys
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from suite import free_port  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build():
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "examples", "--bin", "metrics-hello"], cwd=ROOT, check=True)
    env = dict(os.environ, CARGO_TARGET_DIR=os.path.join(ROOT, "target", "no-metrics"))
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "examples", "--no-default-features", "--bin", "metrics-hello"],
                   cwd=ROOT, check=True, env=env)
    return {
        "on": os.path.join(ROOT, "target", "release", "metrics-hello"),
        "off": os.path.join(ROOT, "target", "no-metrics", "release", "metrics-hello"),
    }


def start(exe, workers, admin=None, debug=False):
    port = free_port()
    env = dict(os.environ, CLUSTER_WORKERS=str(workers), PORT=str(port), HOST="127.0.0.1")
    if admin:
        env["CLUSTER_ADMIN_ADDR"] = f"127.0.0.1:{admin}"
    if debug:
        env["HELLO_DEBUG"] = "1"
    p = subprocess.Popen([exe], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    for _ in range(400):
        if subprocess.run(["curl", "-s", "-o", "/dev/null", f"http://127.0.0.1:{port}/"]).returncode == 0:
            break
        time.sleep(0.05)
    return p, port


def stop(p):
    p.terminate()
    p.wait()


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 4
    exes = build()
    rps = {k: [] for k in exes}
    for r in range(rounds):
        for name in (list(exes) if r % 2 == 0 else list(reversed(list(exes)))):
            p, port = start(exes[name], 2)
            out = subprocess.run(["wrk", "-t1", "-c64", "-d4s", f"http://127.0.0.1:{port}/"], capture_output=True, text=True).stdout
            rps[name].append(float(out.split("Requests/sec:")[1].split()[0]))
            stop(p)
    admin = free_port()
    p, port = start(exes["on"], 8, admin=admin, debug=True)

    def scrapes():
        times, body = [], b""
        for _ in range(20):
            t = time.perf_counter()
            body = urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics").read()
            times.append((time.perf_counter() - t) * 1000)
        return times, body

    own, own_body = scrapes()
    for _ in range(32):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/labels?n=1000").read()
    times, body = scrapes()
    size = len(body)
    series = sum(1 for line in body.decode().splitlines() if line.startswith("hello_labelled_total{"))
    stop(p)
    print(f"keep-alive req/s of metrics-hello, 2 workers, wrk -t1 -c64 -d4s (median of {rounds}):")
    for name in exes:
        print(f"  feature {name:3}: {statistics.median(rps[name]):9.0f}   rounds {[int(x) for x in rps[name]]}")
    ratio = statistics.median(rps["on"]) / statistics.median(rps["off"])
    print(f"  on / off: {ratio:.3f}")
    print(f"scrape of /metrics, 8 workers, the master's own series only ({len(own_body)} bytes):"
          f" median {statistics.median(own):.1f} ms, max {max(own):.1f} ms")
    print(f"scrape of /metrics, 8 workers x 1000 series ({series} series of hello_labelled_total shown, {size} bytes):"
          f" median {statistics.median(times):.1f} ms, max {max(times):.1f} ms")


if __name__ == "__main__":
    main()
