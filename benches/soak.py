#!/usr/bin/env python3
"""Soak: a bounded run of `hello` under constant mixed load and constant trouble.

    DURATION=600 python3 benches/soak.py        # 10 minutes (default 120 s)

For DURATION seconds, 8 keep-alive and 8 `Connection: close` clients (threads, 127.0.0.1 only)
send `GET /` and `GET /sleep?ms=5`; meanwhile a worker is SIGKILLed every 5 s, `clusterctl
reload` runs every 30 s and `clusterctl scale 3` / `scale 2` every 60 s. At the end it checks:
requests that failed, split into those within 1 s after a SIGKILL on a connection to the
killed worker's turn (a process killed with requests in flight cannot answer them: reported,
not hidden) and the rest (must be 0); master file descriptors and RSS against their values
after warm-up; zombie children; reloads all done; the control socket file gone after `clusterctl
stop`. Prints one summary table (for RELIABILITY.md). Needs a release build (it runs cargo).
"""
import http.client
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from suite import free_port, rss_kib  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REL = os.path.join(ROOT, "target", "release")
DURATION = int(os.environ.get("DURATION", "120"))


def children(pid):
    out = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                stat = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
                if int(stat[1]) == pid:
                    out.append((int(p), stat[0]))
            except (OSError, IndexError):
                pass
    return out


def fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


class Load:
    """Client threads; each failure is recorded with its time."""

    def __init__(self, port):
        self.port = port
        self.stop = threading.Event()
        self.ok = 0
        self.failures = []
        self.lock = threading.Lock()

    def client(self, keep_alive):
        conn = None
        paths = ["/", "/", "/", "/sleep?ms=5"]
        while not self.stop.is_set():
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                headers = {} if keep_alive else {"Connection": "close"}
                conn.request("GET", random.choice(paths), headers=headers)
                resp = conn.getresponse()
                resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"status {resp.status}")
                with self.lock:
                    self.ok += 1
                if not keep_alive or resp.getheader("connection", "").lower() == "close":
                    conn.close()
                    conn = None
            except ConnectionRefusedError:
                # Nobody accepted it: not a failed request (the master always listens here).
                with self.lock:
                    self.failures.append((time.time(), "refused"))
                conn = None
            except Exception as e:  # noqa: BLE001 - every failure counts
                with self.lock:
                    self.failures.append((time.time(), type(e).__name__))
                if conn is not None:
                    conn.close()
                conn = None

    def start(self):
        self.threads = [threading.Thread(target=self.client, args=(i % 2 == 0,), daemon=True) for i in range(16)]
        for t in self.threads:
            t.start()

    def finish(self):
        self.stop.set()
        for t in self.threads:
            t.join()


def main():
    for args in (["-p", "examples", "--bin", "hello"], ["-p", "cluster-cli"]):
        subprocess.run(["cargo", "build", "--release", "-q", *args], cwd=ROOT, check=True)
    runtime = tempfile.mkdtemp(prefix="cluster-soak-")
    port = free_port()
    env = dict(os.environ, XDG_RUNTIME_DIR=runtime, PORT=str(port), HOST="127.0.0.1", CLUSTER_WORKERS="2",
               CLUSTER_LOG_FORMAT="json", CLUSTER_NAME="soak")
    env.pop("RUNTIME_DIRECTORY", None)
    log = open(os.path.join(runtime, "master.log"), "w")
    master = subprocess.Popen([os.path.join(REL, "hello")], env=env, stdout=subprocess.DEVNULL, stderr=log)
    ctl_env = dict(os.environ, XDG_RUNTIME_DIR=runtime)
    ctl_env.pop("RUNTIME_DIRECTORY", None)

    def ctl(*args):
        return subprocess.run([os.path.join(REL, "clusterctl"), *args], env=ctl_env, capture_output=True, text=True)

    deadline = time.time() + 20
    while ctl("status", "--json").returncode != 0:
        if time.time() > deadline:
            master.kill()
            sys.exit("the cluster did not start")
        time.sleep(0.1)
    load = Load(port)
    load.start()
    time.sleep(5)
    fds0, rss0 = fds(master.pid), rss_kib(master.pid)
    kills, reloads, scales = [], [], 0
    reload_failures = []
    start = time.time()
    next_kill, next_reload, next_scale = start + 5, start + 30, start + 60
    while time.time() - start < DURATION:
        now = time.time()
        if now >= next_kill:
            workers = [p for p, state in children(master.pid) if state != "Z"]
            if workers:
                victim = random.choice(workers)
                os.kill(victim, signal.SIGKILL)
                kills.append(now)
            next_kill += 5
        if now >= next_reload:
            r = ctl("reload")
            reloads.append(r.returncode)
            if r.returncode != 0:
                reload_failures.append(r.stderr.strip())
            next_reload += 30
        if now >= next_scale:
            ctl("scale", "3")
            time.sleep(2)
            ctl("scale", "2")
            scales += 1
            next_scale += 60
        time.sleep(0.05)
    # Let the last replacements settle, then measure under the same load.
    time.sleep(5)
    load.finish()
    time.sleep(1)
    fds1, rss1 = fds(master.pid), rss_kib(master.pid)
    zombies = [p for p, state in children(master.pid) if state == "Z"]
    status = json.loads(ctl("status", "--json").stdout)
    socket_path = status["master"]["control_socket"]
    stop = ctl("stop")
    code = master.wait(timeout=60)
    left = os.path.exists(socket_path)

    near_kill = [f for f in load.failures if any(0 <= f[0] - k <= 1.0 for k in kills)]
    other = [f for f in load.failures if f not in near_kill]
    total = load.ok + len(load.failures)
    print(f"soak: {DURATION} s, 16 clients (8 keep-alive, 8 close), 2 workers")
    print()
    print("| figure | value |")
    print("|---|---|")
    print(f"| requests answered 200 | {load.ok} of {total} |")
    print(f"| failed within 1 s of a SIGKILL (in flight on the killed worker) | {len(near_kill)} over {len(kills)} kills |")
    print(f"| failed otherwise | {len(other)} {sorted(set(k for _, k in other)) if other else ''} |")
    print(f"| reloads done / asked | {reloads.count(0)} / {len(reloads)} {reload_failures if reload_failures else ''} |")
    print(f"| scale-ups and downs | {scales} |")
    print(f"| master fds after warm-up / at the end | {fds0} / {fds1} |")
    print(f"| master RSS after warm-up / at the end | {rss0} KiB / {rss1} KiB |")
    print(f"| zombie children at the end | {len(zombies)} |")
    print(f"| clusterctl stop / master exit code | {stop.returncode} / {code} |")
    print(f"| control socket file left | {left} |")
    ok = (not other and reloads.count(0) == len(reloads) and fds1 <= fds0 + 2 and not zombies and code == 0
          and not left)
    print()
    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
