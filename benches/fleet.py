#!/usr/bin/env python3
"""A fleet behind HAProxy: failed requests per scenario, with and without the stop delay.

Three hosts, each a network namespace of this script's own with a `config-agent` master
(2 workers, admin endpoint on :9100) on 10.213.0.11-13; Redis (the agent's store, and the
`/hits` counter every request increments) in a namespace of its own on 10.213.0.3; HAProxy
from Debian on 10.213.0.2 in a fourth, health-checking `/readyz` every 200 ms (fall 2, rise 2),
asking the admin endpoint's agent-check every 200 ms, and never retrying (`retries 0`, as a
Kubernetes Service does not retry either). All of them hang off one bridge in a hub namespace;
nothing outside these namespaces is ever a target. Two `wrk -t1 -c16` run through HAProxy at
once for each scenario, one keep-alive and one `Connection: close`:

  rolling stop-start   each host in turn: SIGTERM, wait for its processes to exit, start it,
                       wait until HAProxy has it up again
  rolling upgrade      each host in turn: SIGUSR2, wait for the new master and HAProxy
  rolling reload       each host in turn: SIGHUP, wait until every worker is new
  master SIGKILL       host 2's master SIGKILLed (its workers finish what they hold), HAProxy
                       marks it down, then it is started again
  link cut             host 3's link set down until HAProxy marks it down, then up again

    cargo build --release -p examples
    sudo python3 benches/fleet.py            # the table, stop delay 0 and 1000 ms
    sudo OBSERVE=1 python3 benches/fleet.py  # HAProxy also marks a server down at its first
                                             # refused connection (observe layer4)
    sudo SCENARIOS=master_sigkill python3 benches/fleet.py   # only some
    sudo python3 benches/fleet.py --check    # stop delay 1000 ms, the rolling scenarios only:
                                             # exits 1 unless they fail 0 requests, and unless
                                             # HAProxy had each stopping host out of rotation
                                             # (DRAIN or DOWN) before its master exited

Needs root (namespaces), `ip`, haproxy, redis-server and wrk. Every process it starts is
stopped at the end, by pid (whatever is left in its namespaces), and the namespaces deleted.
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from suite import alive, wait  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# FLEET_EXE: another build of config-agent (the integration test passes its debug build).
EXE = os.environ.get("FLEET_EXE") or os.path.join(ROOT, "target", "release", "config-agent")
NET = "10.213.0"
LB, REDIS = f"{NET}.2", f"{NET}.3"
HOSTS = [f"{NET}.{11 + i}" for i in range(3)]
PORT, ADMIN = 8080, 9100
CONNECTIONS = int(os.environ.get("CONNECTIONS", "16"))
# OBSERVE=1: HAProxy also marks a server down at its first failed connection (passive check).
OBSERVE = " observe layer4 error-limit 1 on-error mark-down" if os.environ.get("OBSERVE") == "1" else ""
# SCENARIOS=a,b: only these (names as in the table, with underscores).


def sh(*args, check=True):
    r = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if check and r.returncode != 0:
        raise SystemExit(f"{' '.join(args)}: {r.stderr.strip()}")
    return r.stdout


class Fleet:
    """The namespaces, Redis, HAProxy and three masters; `close()` undoes all of it."""

    def __init__(self, stop_delay_ms):
        self.tag = f"cf{os.getpid() % 100000}"
        self.dir = tempfile.mkdtemp(prefix="cluster-fleet-")
        self.stop_delay_ms = stop_delay_ms
        self.children = []
        self.namespaces = []
        try:
            self.network()
            self.redis = self.spawn("redis", ["redis-server", "--bind", REDIS, "--port", "6379", "--save", "", "--protected-mode", "no",
                                              "--appendonly", "no"], "redis.log")
            wait("Redis", lambda: self.redis_cli("PING") == "PONG")
            self.haproxy = self.spawn("lb", ["haproxy", "-db", "-f", self.haproxy_config()], "haproxy.log")
            self.masters = [self.start(i) for i in range(len(HOSTS))]
            for i in range(len(HOSTS)):
                self.wait_state(i, {"UP"})
            # Each host's agent subscribes once Redis answers it; published until all three heard it.
            wait("the agents to subscribe", lambda: self.redis_cli("PUBLISH", "cluster:config", "fleet") == "3")
            wait("every host to serve the published config", self.config_everywhere)
        except BaseException:
            self.close()
            raise

    def ns(self, name):
        return f"{self.tag}-{name}"

    def network(self):
        hub = self.ns("hub")
        for name in ["hub", "lb", "redis"] + [f"h{i + 1}" for i in range(len(HOSTS))]:
            sh("ip", "netns", "add", self.ns(name))
            self.namespaces.append(self.ns(name))
            sh("ip", "-n", self.ns(name), "link", "set", "lo", "up")
        sh("ip", "-n", hub, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", hub, "link", "set", "br0", "up")
        members = [("lb", LB), ("redis", REDIS)] + [(f"h{i + 1}", a) for i, a in enumerate(HOSTS)]
        for name, addr in members:
            port = self.port(name)
            sh("ip", "link", "add", port, "netns", hub, "type", "veth", "peer", "name", "eth0", "netns",
               self.ns(name))
            sh("ip", "-n", hub, "link", "set", port, "master", "br0", "up")
            sh("ip", "-n", self.ns(name), "addr", "add", f"{addr}/24", "dev", "eth0")
            sh("ip", "-n", self.ns(name), "link", "set", "eth0", "up")

    def redis_cli(self, *args):
        return sh("ip", "netns", "exec", self.ns("lb"), "redis-cli", "-h", REDIS, *args, check=False).strip()

    def port(self, name):
        """The hub's end of `name`'s link (cutting it cuts the host off)."""
        return f"{self.tag}{name}"

    def haproxy_config(self):
        path = os.path.join(self.dir, "haproxy.cfg")
        servers = "\n".join(f"    server h{i + 1} {a}:{PORT}" for i, a in enumerate(HOSTS))
        with open(path, "w") as f:
            f.write(f"""global
    stats socket {self.dir}/haproxy.sock mode 600 level admin
    maxconn 4096
defaults
    mode http
    retries 0
    timeout connect 1s
    timeout client 30s
    timeout server 5s
    timeout check 1s
frontend web
    bind {LB}:80
    default_backend hosts
backend hosts
    balance roundrobin
    option httpchk GET /readyz
    default-server check port {ADMIN} inter 200ms fall 2 rise 2 agent-check agent-port {ADMIN} agent-inter 200ms agent-send "agent\\n"{OBSERVE}
{servers}
""")
        return path

    def spawn(self, ns, args, log, env=None):
        out = open(os.path.join(self.dir, log), "a")
        p = subprocess.Popen(["ip", "netns", "exec", self.ns(ns)] + args, stdin=subprocess.DEVNULL,
                             stdout=out, stderr=out, env=env)
        self.children.append(p)
        return p

    def host_dir(self, i):
        d = os.path.join(self.dir, f"h{i + 1}")
        os.makedirs(d, exist_ok=True)
        return d

    def start(self, i):
        d = self.host_dir(i)
        env = dict(os.environ, HOST=HOSTS[i], PORT=str(PORT), CLUSTER_WORKERS="2", CLUSTER_NAME=f"h{i + 1}",
                   CLUSTER_ADMIN_ADDR=f"{HOSTS[i]}:{ADMIN}", CLUSTER_PID_FILE=os.path.join(d, "pid"),
                   CLUSTER_CONTROL_SOCKET=os.path.join(d, "control.sock"), REDIS_URL=f"redis://{REDIS}:6379",
                   CLUSTER_STOP_DELAY_MS=str(self.stop_delay_ms), CLUSTER_LOG_FORMAT="json")
        try:
            os.unlink(os.path.join(d, "pid"))
        except FileNotFoundError:
            pass
        p = self.spawn(f"h{i + 1}", [EXE], f"h{i + 1}/log", env)
        wait(f"host {i + 1}'s pid file", lambda: self.master(i))
        return p

    def master(self, i):
        try:
            return int(open(os.path.join(self.host_dir(i), "pid")).read().strip())
        except (OSError, ValueError):
            return None

    def pids(self, ns):
        for p in self.children:
            p.poll()  # our exited children are reaped, not listed
        return [int(p) for p in sh("ip", "netns", "pids", self.ns(ns), check=False).split()]

    def status(self, i):
        """The master's `status` reply over its control socket."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(2)
            s.connect(os.path.join(self.host_dir(i), "control.sock"))
            r = s.makefile("rb")
            r.readline()  # the greeting
            s.sendall(b'{"cmd":"status"}\n')
            return json.loads(r.readline())

    def states(self):
        """HAProxy's view: server name -> status (UP, DOWN, DRAIN, "UP 1/2", ...)."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(2)
            try:
                s.connect(os.path.join(self.dir, "haproxy.sock"))
            except (FileNotFoundError, ConnectionRefusedError):
                if self.haproxy.poll() is not None:
                    raise SystemExit("haproxy exited: " + open(os.path.join(self.dir, "haproxy.log")).read())
                return {}
            s.sendall(b"show stat\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        lines = data.decode().splitlines()
        head = lines[0].lstrip("# ").split(",")
        status = head.index("status")
        return {f[1]: f[status] for f in (line.split(",") for line in lines[1:] if line) if f[0] == "hosts"}

    def wait_state(self, i, wanted, timeout=30.0):
        wait(f"HAProxy to have h{i + 1} in {wanted}", lambda: self.states().get(f"h{i + 1}") in wanted, timeout)

    def config_everywhere(self):
        for addr in HOSTS:
            r = subprocess.run(["ip", "netns", "exec", self.ns("lb"), "curl", "-s", "--max-time", "1",
                                f"http://{addr}:{PORT}/config"], stdout=subprocess.PIPE, text=True)
            if r.stdout != "fleet":
                return False
        return True

    def exit_watch(self, i, pid):
        """Waits for host i's processes to be gone; returns HAProxy's state of it when `pid` exited."""
        seen = None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            state = self.states().get(f"h{i + 1}")
            if not alive(pid):
                seen = seen or state
                if not self.pids(f"h{i + 1}"):
                    return seen
            time.sleep(0.005)
        raise TimeoutError(f"host {i + 1}'s processes did not exit")

    def close(self):
        for ns in self.namespaces:
            for pid in self.pids(ns.removeprefix(self.tag + "-")):
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        try:
            wait("the fleet's processes to exit", lambda: not any(self.pids(n.removeprefix(self.tag + "-"))
                                                                  for n in self.namespaces), 20)
        except TimeoutError:
            for ns in self.namespaces:
                for pid in self.pids(ns.removeprefix(self.tag + "-")):
                    os.kill(pid, signal.SIGKILL)
        for p in self.children:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for ns in reversed(self.namespaces):
            sh("ip", "netns", "del", ns, check=False)
        if os.environ.get("KEEP"):
            print(f"left {self.dir}", file=sys.stderr)
        else:
            shutil.rmtree(self.dir, ignore_errors=True)

    # ----- the scenarios: each returns what HAProxy showed of a stopping host as it exited -----

    def rolling_stop_start(self):
        seen = []
        for i in range(len(HOSTS)):
            pid = self.master(i)
            os.kill(pid, signal.SIGTERM)
            seen.append(self.exit_watch(i, pid))
            self.masters[i] = self.start(i)
            self.wait_state(i, {"UP"})
        return seen

    def rolling_upgrade(self):
        for i in range(len(HOSTS)):
            old = self.master(i)
            os.kill(old, signal.SIGUSR2)
            wait(f"host {i + 1}'s new master", lambda: self.master(i) not in (None, old) and not alive(old))
            wait(f"host {i + 1}'s workers", lambda: self.ready(i))
            self.wait_state(i, {"UP"})
        return []

    def rolling_reload(self):
        for i in range(len(HOSTS)):
            before = {w["pid"] for w in self.status(i)["workers"]}
            os.kill(self.master(i), signal.SIGHUP)
            wait(f"host {i + 1}'s reload",
                 lambda: self.ready(i) and not ({w["pid"] for w in self.status(i)["workers"]} & before))
            self.wait_state(i, {"UP"})
        return []

    def ready(self, i):
        s = self.status(i)
        workers = [w for w in s["workers"] if isinstance(w["id"], int)]
        return not s["master"]["reloading"] and len(workers) == 2 and all(w["state"] == "ready" for w in workers)

    def master_sigkill(self):
        i = 1
        os.kill(self.master(i), signal.SIGKILL)
        self.wait_state(i, {"DOWN"})
        wait("host 2's workers to finish and exit", lambda: not self.pids("h2"), 30)
        self.masters[i] = self.start(i)
        self.wait_state(i, {"UP"})
        return []

    def link_cut(self):
        i = 2
        sh("ip", "-n", self.ns("hub"), "link", "set", self.port("h3"), "down")
        try:
            self.wait_state(i, {"DOWN"})
        finally:
            sh("ip", "-n", self.ns("hub"), "link", "set", self.port("h3"), "up")
        self.wait_state(i, {"UP"})
        return []


class Load:
    """A wrk through HAProxy, stopped with SIGINT (it prints its figures then)."""

    def __init__(self, fleet, close):
        args = ["wrk", "-t1", f"-c{CONNECTIONS}", "-d600s", "--timeout", "10s"]
        args += ["-H", "Connection: close"] if close else []
        self.p = subprocess.Popen(["ip", "netns", "exec", fleet.ns("lb")] + args + [f"http://{LB}/hits"],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def stop(self):
        self.p.send_signal(signal.SIGINT)
        out = self.p.communicate(timeout=30)[0]
        m = re.search(r"(\d+) requests in", out)
        if not m:
            raise SystemExit(f"wrk said: {out}")
        e = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
        n = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        failed = (sum(int(x) for x in e.groups()) if e else 0) + (int(n.group(1)) if n else 0)
        return int(m.group(1)), failed


def run(fleet, scenario):
    loads = [Load(fleet, close=False), Load(fleet, close=True)]
    try:
        time.sleep(1.0)  # a second of load before and after: the scenario runs under load
        seen = getattr(fleet, scenario)()
        time.sleep(1.0)
    finally:
        results = [load.stop() for load in loads]
    return results, seen


ROLLING = ["rolling_stop_start", "rolling_upgrade", "rolling_reload"]
ALL = ROLLING + ["master_sigkill", "link_cut"]


def check():
    fleet = Fleet(1000)
    bad = []
    try:
        for scenario in ROLLING:
            ((ka, ka_failed), (cl, cl_failed)), seen = run(fleet, scenario)
            print(f"{scenario}: keep-alive {ka_failed} failed of {ka}, close {cl_failed} failed of {cl}; "
                  f"HAProxy's state of each stopping host as its master exited: {seen}")
            if ka_failed or cl_failed or ka == 0 or cl == 0:
                bad.append(f"{scenario} failed requests (keep-alive {ka_failed}, close {cl_failed})")
            if any(s not in ("DRAIN", "DOWN") for s in seen):
                bad.append(f"{scenario}: a host's master exited while HAProxy still had it in rotation: {seen}")
    finally:
        fleet.close()
    if bad:
        print("\n".join(bad))
        sys.exit(1)


def table():
    print(f"3 hosts x config-agent (2 workers) behind HAProxy (retries 0, httpchk /readyz and agent-check every "
          f"200 ms{', observe layer4' if OBSERVE else ''}), wrk -t1 -c{CONNECTIONS} keep-alive and close at once, "
          "GET /hits")
    print(f"{'scenario':20} {'stop delay':>10}  {'keep-alive failed':>18} {'of':>8}  {'close failed':>13} {'of':>8}")
    for scenario in [x for x in os.environ.get("SCENARIOS", ",".join(ALL)).split(",") if x]:
        for delay in (0, 1000):
            fleet = Fleet(delay)
            try:
                ((ka, ka_failed), (cl, cl_failed)), _ = run(fleet, scenario)
            finally:
                fleet.close()
            print(f"{scenario.replace('_', ' '):20} {delay:>7} ms  {ka_failed:>18} {ka:>8}  {cl_failed:>13} {cl:>8}",
                  flush=True)


def main():
    if os.geteuid() != 0:
        raise SystemExit("fleet.py needs root: it makes network namespaces")
    for program in ("ip", "haproxy", "redis-server", "redis-cli", "wrk", "curl"):
        if not shutil.which(program):
            raise SystemExit(f"fleet.py needs {program}")
    if not os.path.exists(EXE):
        raise SystemExit("build it first: cargo build --release -p examples")
    check() if "--check" in sys.argv[1:] else table()


if __name__ == "__main__":
    main()
