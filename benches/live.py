#!/usr/bin/env python3
"""What watching a cluster costs, side by side in one run: `hello` with 8 workers and an admin
endpoint, 256 idle keep-alive connections held open (so each status counts real connections),
measured for DURATION seconds each:

  - nobody watching (the master's baseline, its history sampler included);
  - `clusterctl top` in a tmux pane (100x30) at the default 1 s interval: the view's own CPU,
    and the master's;
  - the status page open in headless Chromium (`integration-tests/clients/page.py --hold`):
    Chromium's CPU (all its processes, after 5 s for its own start), and the master's;
  - Chromium with a static page (`/healthz`), for what Chromium costs by itself.

CPU is utime + stime from /proc (the master: schedstat of its threads, to the nanosecond), as
% of one core over the phase.

    cargo build --release -p examples -p cluster-cli
    DURATION=60 python3 benches/live.py
    BASELINE=../old/target/release DURATION=60 python3 benches/live.py   # and an older build's
                                                                         # idle master first

Needs tmux and chromium. Loopback only; every process it starts is stopped at the end.
"""
import json, os, signal, socket, subprocess, sys, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from suite import alive, free_port, wait  # noqa: E402
from control import cpu as master_cpu  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REL = os.path.join(ROOT, "target", "release")
DURATION = float(os.environ.get("DURATION", "60"))
HELD = 256


def cpu_s(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def idle_master(rel):
    """The idle master's CPU (seconds over DURATION) of the `hello` in `rel`, as in `main`."""
    port, admin = free_port(), free_port()
    env = {**os.environ, "HOST": "127.0.0.1", "PORT": str(port), "CLUSTER_WORKERS": "8",
           "CLUSTER_ADMIN_ADDR": f"127.0.0.1:{admin}", "CLUSTER_CONTROL_SOCKET": "off"}
    master = subprocess.Popen([os.path.join(rel, "hello")], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    held = []
    try:
        wait("8 ready workers", lambda: ready(admin) >= 8)
        held = hold(port)
        before = master_cpu(master.pid)
        time.sleep(DURATION)
        return master_cpu(master.pid) - before
    finally:
        for s in held:
            s.close()
        stop(master)


def hold(port):
    held = []
    for _ in range(HELD):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        s.recv(4096)
        held.append(s)
    return held


def stop(master):
    try:
        os.killpg(master.pid, signal.SIGTERM)
        master.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(master.pid, signal.SIGKILL)
        master.wait()


def main():
    baseline = os.environ.get("BASELINE")
    before_build = idle_master(baseline) if baseline else None
    port, admin = free_port(), free_port()
    runtime = f"/tmp/cluster-live-bench-{os.getpid()}"
    os.makedirs(runtime, mode=0o700, exist_ok=True)
    env = {**os.environ, "HOST": "127.0.0.1", "PORT": str(port), "CLUSTER_WORKERS": "8", "CLUSTER_NAME": "live",
           "CLUSTER_ADMIN_ADDR": f"127.0.0.1:{admin}", "XDG_RUNTIME_DIR": runtime}
    master = subprocess.Popen([os.path.join(REL, "hello")], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    tmux = ["tmux", "-L", f"cluster-live-bench-{os.getpid()}"]
    held = []
    try:
        wait("8 ready workers", lambda: ready(admin) >= 8)
        held = hold(port)
        rows = []
        if before_build is not None:
            rows.append(("nobody watching, BASELINE build", None, before_build))

        before = master_cpu(master.pid)
        time.sleep(DURATION)
        rows.append(("nobody watching", None, master_cpu(master.pid) - before))

        ctl = os.path.join(REL, "clusterctl")
        command = f"XDG_RUNTIME_DIR={runtime} exec {ctl} -t live top"
        subprocess.run(tmux + ["new-session", "-d", "-x", "100", "-y", "30", "-s", "top", command], check=True)
        pane = int(subprocess.run(tmux + ["display", "-p", "-t", "top", "#{pane_pid}"], capture_output=True,
                                  text=True, check=True).stdout)
        wait("top to draw the workers", lambda: "8/8 ready" in subprocess.run(
            tmux + ["capture-pane", "-p", "-t", "top"], capture_output=True, text=True).stdout)
        view, before = cpu_s(pane), master_cpu(master.pid)
        time.sleep(DURATION)
        rows.append(("clusterctl top (1 s)", cpu_s(pane) - view, master_cpu(master.pid) - before))
        subprocess.run(tmux + ["send-keys", "-t", "top", "q"], check=True)
        wait("top to exit", lambda: not alive(pane))

        page = os.path.join(ROOT, "integration-tests", "clients", "page.py")
        before = master_cpu(master.pid)
        started = time.monotonic()
        out = subprocess.run([sys.executable, page, f"http://127.0.0.1:{admin}/", "--hold", str(DURATION), "--settle", "5"],
                             capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"page.py failed: {out.stdout}{out.stderr}")
        # The master's share over the whole page.py run (load, hold, screenshot-less exit).
        spent, wall = master_cpu(master.pid) - before, time.monotonic() - started
        chromium = json.loads(out.stdout)["cpu_ms"] / 1000
        rows.append(("status page in Chromium (1 s)", chromium, spent * DURATION / wall))
        # Chromium's own cost with a page that does nothing (/healthz: text, no script).
        out = subprocess.run([sys.executable, page, f"http://127.0.0.1:{admin}/healthz", "--hold", str(DURATION),
                              "--settle", "5", "--timeout", "1"], capture_output=True, text=True)
        rows.append(("a static page in Chromium", json.loads(out.stdout)["cpu_ms"] / 1000, None))

        print(f"8 workers, {HELD} idle keep-alive connections held, {DURATION:.0f} s per phase; % of one core")
        print(f"{'':34} {'the view':>10} {'the master':>11}")
        for name, view, m in rows:
            shown = "-" if view is None else f"{100 * view / DURATION:.2f}%"
            spent = "-" if m is None else f"{100 * m / DURATION:.3f}%"
            print(f"{name:34} {shown:>10} {spent:>11}")
        base = rows[-4][2]
        for name, _, m in rows[-3:-1]:
            print(f"  serving {name}: +{100 * (m - base) / DURATION:.3f}% of a core for the master")
        if before_build is not None:
            print(f"  this build's idle master against BASELINE's: {100 * (base - before_build) / DURATION:+.3f}% of a core")
    finally:
        for s in held:
            s.close()
        subprocess.run(tmux + ["kill-server"], stderr=subprocess.DEVNULL)
        stop(master)
        subprocess.run(["rm", "-rf", runtime])


def ready(admin):
    try:
        with socket.create_connection(("127.0.0.1", admin), timeout=1) as s:
            s.sendall(b"GET /readyz HTTP/1.1\r\nhost: x\r\n\r\n")
            text = s.recv(4096).decode()
            return int(text.split("\r\n\r\n", 1)[1].split("/")[0])
    except (OSError, ValueError, IndexError):
        return 0


if __name__ == "__main__":
    main()
