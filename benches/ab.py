#!/usr/bin/env python3
"""Two builds of bench-server side by side, interleaved round by round (A B, B A, ...), so that
the machine's drift hits both alike: keep-alive and `Connection: close` req/s (wrk -t1 -c64),
and, steadier than req/s on a shared machine, the CPU time of all server processes (and of the
master alone) per request under `Connection: close`, read from /proc. Medians over rounds.

    BASELINE=<release dir of the other build> python3 benches/ab.py [ROUNDS]

Needs wrk, curl and `cargo build --release -p examples` in both trees.
"""
import os, subprocess, time, re, statistics, sys
def cpu(pid):
    try:
        f = open(f"/proc/{pid}/stat").read().rsplit(")",1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    except Exception: return 0.0
def tree(pid):
    out=[pid]
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                if open(f"/proc/{p}/stat").read().rsplit(")",1)[1].split()[1]==str(pid): out.append(int(p))
            except Exception: pass
    return out
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if "BASELINE" not in os.environ:
    sys.exit("set BASELINE to the release directory of the build to compare with")
builds = {
    "this": os.path.join(ROOT, "target", "release", "bench-server"),
    "base": os.path.join(os.environ["BASELINE"], "bench-server"),
}
res = {k: {"ka":[], "close":[], "cpu_close":[], "master_close":[]} for k in builds}
port = 18190
for r in range(int(sys.argv[1]) if len(sys.argv)>1 else 4):
    for name, exe in (builds.items() if r%2==0 else reversed(list(builds.items()))):
        env = dict(os.environ, CLUSTER_WORKERS="2", PORT=str(port), HOST="127.0.0.1")
        p = subprocess.Popen([exe], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(200):
            if subprocess.run(["curl","-s","-o","/dev/null",f"http://127.0.0.1:{port}/"]).returncode==0: break
            time.sleep(0.05)
        out = subprocess.run(["wrk","-t1","-c64","-d4s",f"http://127.0.0.1:{port}/"],capture_output=True,text=True).stdout
        res[name]["ka"].append(float(re.search(r"Requests/sec:\s+([\d.]+)",out).group(1)))
        pids = tree(p.pid); c0 = {q:cpu(q) for q in pids}
        out = subprocess.run(["wrk","-t1","-c64","-d4s","-H","Connection: close",f"http://127.0.0.1:{port}/"],capture_output=True,text=True).stdout
        reqs = int(re.search(r"(\d+) requests in",out).group(1))
        c1 = {q:cpu(q) for q in pids}
        res[name]["close"].append(float(re.search(r"Requests/sec:\s+([\d.]+)",out).group(1)))
        res[name]["cpu_close"].append(sum(c1[q]-c0[q] for q in pids)/reqs*1e6)
        res[name]["master_close"].append((c1[p.pid]-c0[p.pid])/reqs*1e6)
        p.terminate(); p.wait()
        port += 1
for name in builds:
    m = {k: statistics.median(v) for k,v in res[name].items()}
    print(f"{name:5} keep-alive {m['ka']:9.0f} req/s  close {m['close']:8.0f} req/s  server CPU/req (close) {m['cpu_close']:5.1f} us  master {m['master_close']:5.1f} us   rounds: ka {[int(x) for x in res[name]['ka']]} close {[int(x) for x in res[name]['close']]}")
