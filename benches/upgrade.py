#!/usr/bin/env python3
"""Failed requests across master upgrades, side by side with stop-and-start restarts of the same
server: `hello` (2 workers) under `wrk -t1 -c32` for DURATION seconds, keep-alive and
`Connection: close` separately, while the master is replaced UPGRADES times, either by SIGUSR2
(an upgrade: the sockets are handed over) or by SIGTERM and a new start (a restart: the socket
is closed and bound again). Prints requests, wrk's socket errors, non-2xx answers, and how long
each replacement took (upgrade: SIGUSR2 until the pid file names the new master; restart:
SIGTERM until the new master answers). A restart under `Connection: close` fails few requests:
the stopping master drops new SYNs (it drains its socket), and clients retransmit them a second
later, by which time the new master listens; that second shows as fewer requests (wrk's latency
figures leave out the connect).

    cargo build --release -p examples
    DURATION=10 UPGRADES=5 python3 benches/upgrade.py

Needs wrk and curl. Loopback only; every process it starts is stopped at the end.
"""
import os, re, signal, statistics, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from suite import alive, free_port, wait  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELLO = os.path.join(ROOT, "target", "release", "hello")
DURATION = int(os.environ.get("DURATION", "10"))
UPGRADES = int(os.environ.get("UPGRADES", "5"))


def up(port):
    return subprocess.run(["curl", "-s", "-o", "/dev/null", "--max-time", "1", f"http://127.0.0.1:{port}/"]).returncode == 0


def read_pid(path):
    try:
        return int(open(path).read().strip())
    except (OSError, ValueError):
        return None


def run(method, close):
    port = free_port()
    tmp = tempfile.mkdtemp(prefix="cluster-bench-upgrade-")
    pid_file = os.path.join(tmp, "pid")
    env = dict(os.environ, CLUSTER_WORKERS="2", PORT=str(port), HOST="127.0.0.1", XDG_RUNTIME_DIR=tmp,
               CLUSTER_PID_FILE=pid_file)
    quiet = dict(stdout=subprocess.DEVNULL, stderr=open(os.path.join(tmp, "log"), "a"))
    started = [subprocess.Popen([HELLO], env=env, **quiet)]
    try:
        return measure(method, close, port, env, pid_file, started, quiet, tmp)
    finally:
        # Whatever happened: the last master (the pid file names it; an upgraded one is not our
        # child) and every process started here are stopped.
        last = read_pid(pid_file)
        if last and alive(last):
            os.kill(last, signal.SIGTERM)
            wait("the last master to exit", lambda: not alive(last))
        for p in started:
            if p.poll() is None:
                p.kill()
            p.wait()


def measure(method, close, port, env, pid_file, started, quiet, tmp):
    wait("the server", lambda: up(port))
    args = ["wrk", "-t1", "-c32", f"-d{DURATION}s"] + (["-H", "Connection: close"] if close else [])
    load = subprocess.Popen(args + [f"http://127.0.0.1:{port}/"], stdout=subprocess.PIPE, text=True)
    took = []
    gap = DURATION / (UPGRADES + 1)
    for i in range(UPGRADES):
        time.sleep(gap if i else gap / 2)
        t0 = time.monotonic()
        if method == "upgrade":
            old = read_pid(pid_file)
            if old is None:
                raise SystemExit("no pid file; the master's log:\n" + open(os.path.join(tmp, "log")).read()[-3000:])
            os.kill(old, signal.SIGUSR2)
            wait("the new master", lambda: read_pid(pid_file) not in (None, old))
        else:
            master = started[-1]
            master.terminate()
            master.wait()
            started.append(subprocess.Popen([HELLO], env=env, **quiet))
            wait("the new server", lambda: up(port))
        took.append((time.monotonic() - t0) * 1000)
    out = load.communicate()[0]
    if "requests in" not in out:
        raise SystemExit(f"wrk said: {out}")
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = sum(int(x) for x in m.groups()) if m else 0
    n = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    non2xx = int(n.group(1)) if n else 0
    return requests, errors, non2xx, took


def main():
    if not os.path.exists(HELLO):
        raise SystemExit("build it first: cargo build --release -p examples")
    print(f"hello, 2 workers, wrk -t1 -c32 -d{DURATION}s, {UPGRADES} replacements of the master per run")
    print(f"{'load':11} {'method':8} {'requests':>9} {'failed':>7} {'(errors':>8} {'non-2xx)':>8}  "
          "replacement ms (median, max)")
    for close in (False, True):
        for method in ("upgrade", "restart"):
            requests, errors, non2xx, took = run(method, close)
            load = "close" if close else "keep-alive"
            print(f"{load:11} {method:8} {requests:9} {errors + non2xx:7} {errors:8} {non2xx:8}  "
                  f"{statistics.median(took):6.1f} {max(took):6.1f}")


if __name__ == "__main__":
    main()
