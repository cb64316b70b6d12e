#!/usr/bin/env python3
"""The control socket against the data path, two builds side by side (issue 23's figures):

- the `{"cmd":"status"}` round trip over one control connection, p50 / p90 / p99 in ms, idle
  and while `wrk -t1 -c64 -H 'Connection: close'` loads bench-server (2 workers);
- the master's CPU time per `status` (all its threads, from /proc/<pid>/task/*/schedstat, in
  ms), with 2 and 32 workers, while a helper holds HOLD established loopback connections
  (2 x HOLD sockets on the host) and the TIME_WAIT sockets of the load are still there: for 50
  requests back to back ("burst", as a dashboard and a scraper asking at once), and for 8
  requests 1.1 s apart, each a full reading ("each"), less the master's own CPU in as long a
  quiet spell.

Rounds take turns (this, base; base, this; ...) so the machine's drift hits both alike.

    BASELINE=<release dir of the other build> python3 benches/control.py [ROUNDS]
    HOLD=9000 (default)

Needs wrk and `cargo build --release -p examples` in both trees.
"""

import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from suite import free_port  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOLD = int(os.environ.get("HOLD", "9000"))


def cpu(pid):
    """CPU time of every thread of `pid`, in seconds, to the nanosecond (schedstat)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            total += int(open(f"/proc/{pid}/task/{tid}/schedstat").read().split()[0])
        except OSError:
            pass
        except (ValueError, IndexError):
            pass
    return total / 1e9


def cpu_per_status(m, n, gap):
    """Master CPU per status (ms) over `n` requests `gap` s apart, less what the master spent
    in as long a quiet spell just before (heartbeats)."""
    quiet = n * gap
    c0 = cpu(m.proc.pid)
    time.sleep(quiet)
    idle = cpu(m.proc.pid) - c0
    c0 = cpu(m.proc.pid)
    t0 = time.time()
    for _ in range(n):
        m.status()
        time.sleep(gap)
    busy = cpu(m.proc.pid) - c0
    idle = idle * (time.time() - t0) / quiet if quiet else 0
    return max(busy - idle, 0) / n * 1000


class Master:
    """bench-server with `workers` workers and a control socket in a directory of its own."""

    def __init__(self, exe, workers):
        self.dir = tempfile.mkdtemp(prefix="cluster-bench-control-")
        os.chmod(self.dir, 0o700)
        self.port = free_port()
        env = dict(os.environ, CLUSTER_WORKERS=str(workers), PORT=str(self.port), HOST="127.0.0.1",
                   XDG_RUNTIME_DIR=self.dir, CLUSTER_NAME="bench", CLUSTER_LOG_FORMAT="json")
        env.pop("RUNTIME_DIRECTORY", None)
        self.proc = subprocess.Popen([exe], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        deadline = time.time() + 30
        self.ctl = None
        while time.time() < deadline and self.ctl is None:
            socks = [f for f in os.listdir(os.path.join(self.dir, "cluster"))] if os.path.isdir(
                os.path.join(self.dir, "cluster")) else []
            for name in socks:
                if name.endswith(".sock"):
                    self.ctl = os.path.join(self.dir, "cluster", name)
            time.sleep(0.05)
        assert self.ctl, "no control socket"
        self.conn = socket.socket(socket.AF_UNIX)
        self.conn.connect(self.ctl)
        self.reader = self.conn.makefile("rb")
        self.reader.readline()  # the greeting
        # Every worker ready.
        while time.time() < deadline:
            workers_ready = [w for w in self.status()["workers"] if w["state"] == "ready"]
            if len(workers_ready) >= workers:
                return
            time.sleep(0.05)
        raise SystemExit("workers did not get ready")

    def status(self):
        self.conn.sendall(b'{"cmd":"status"}\n')
        reply = json.loads(self.reader.readline())
        assert reply["ok"] is True, reply
        return reply

    def rtt(self, n, gap):
        out = []
        for _ in range(n):
            t = time.perf_counter()
            self.status()
            out.append((time.perf_counter() - t) * 1000)
            time.sleep(gap)
        return out

    def stop(self):
        self.conn.close()
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p / 100))]


def hold(n):
    """A process holding `n` established loopback connections (both ends): 2n sockets."""
    code = f"""
import resource, socket, sys, time
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
l = socket.socket(); l.bind(("127.0.0.1", 0)); l.listen(4096)
keep = []
for i in range({n}):
    c = socket.create_connection(l.getsockname()); s, _ = l.accept(); keep += [c, s]
print("held", flush=True)
time.sleep(3600)
"""
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def main():
    if "BASELINE" not in os.environ:
        sys.exit("set BASELINE to the release directory of the build to compare with")
    builds = {
        "this": os.path.join(ROOT, "target", "release", "bench-server"),
        "base": os.path.join(os.environ["BASELINE"], "bench-server"),
    }
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    res = {k: {"idle": [], "load": [], "burst2": [], "each2": [], "burst32": [], "each32": []} for k in builds}
    holder = hold(HOLD)
    try:
        for r in range(rounds):
            order = list(builds.items()) if r % 2 == 0 else list(reversed(builds.items()))
            for name, exe in order:
                m = Master(exe, 2)
                try:
                    res[name]["idle"] += m.rtt(100, 0.01)
                    wrk = subprocess.Popen(["wrk", "-t1", "-c64", "-d7s", "-H", "Connection: close",
                                            f"http://127.0.0.1:{m.port}/"], stdout=subprocess.PIPE, text=True)
                    time.sleep(1)
                    res[name]["load"] += m.rtt(100, 0.04)
                    out = wrk.communicate()[0]
                    assert "requests in" in out, out
                    res[name]["burst2"].append(cpu_per_status(m, 50, 0))
                    res[name]["each2"].append(cpu_per_status(m, 8, 1.1))
                finally:
                    m.stop()
                m = Master(exe, 32)
                try:
                    m.status()
                    res[name]["burst32"].append(cpu_per_status(m, 50, 0))
                    res[name]["each32"].append(cpu_per_status(m, 8, 1.1))
                finally:
                    m.stop()
    finally:
        holder.kill()
    print(f"status round trip over the control socket (ms; {rounds} rounds x 100 each)")
    for name in builds:
        d = res[name]
        print(f"  {name:5} idle p50 {pct(d['idle'], 50):6.2f} p90 {pct(d['idle'], 90):6.2f} p99 {pct(d['idle'], 99):6.2f}"
              f" | under wrk -c64 Connection: close p50 {pct(d['load'], 50):6.2f} p90 {pct(d['load'], 90):6.2f}"
              f" p99 {pct(d['load'], 99):6.2f}")
    print(f"master CPU per status (ms; median of rounds; {2 * HOLD} held sockets on the host)")
    for name in builds:
        d = res[name]
        med = {k: statistics.median(d[k]) for k in ("burst2", "each2", "burst32", "each32")}
        print(f"  {name:5} 2 workers: burst {med['burst2']:6.2f} each {med['each2']:6.2f}"
              f" | 32 workers: burst {med['burst32']:6.2f} each {med['each32']:6.2f}"
              f"   (rounds: {[[round(x, 2) for x in d[k]] for k in ('burst2', 'each2', 'burst32', 'each32')]})")


if __name__ == "__main__":
    main()
