#!/usr/bin/env python3
"""Loads the admin endpoint's status page in headless Chromium (Debian's `chromium`), driven
through the DevTools protocol, and reports what the page's script rendered and what it fetched.

    page.py URL [--pids 1,2,3] [--timeout S] [--hold S [--settle S]] [--screenshot FILE] [--size WxH]

Waits (polling, up to --timeout) until the workers' table holds every pid of --pids, then
optionally keeps the page open --hold seconds (reporting the CPU time Chromium's processes used
meanwhile, after --settle seconds for Chromium's own start to be over) and takes a screenshot. Prints one JSON object: the pids in the table, every URL
the page requested, those outside the page's own origin, and the CPU time. Exits 1 when a pid
is missing or anything was requested from elsewhere.
"""

import argparse
import asyncio
import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

import websockets

TICKS = os.sysconf("SC_CLK_TCK")


def tree_cpu_ms(root):
    """CPU time (user + system) of `root` and its descendants, in milliseconds."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append((int(entry), int(fields[11]) + int(fields[12])))
    total, todo = 0, [root]
    try:
        with open(f"/proc/{root}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    except OSError:
        pass
    while todo:
        for pid, ticks in children.get(todo.pop(), []):
            total += ticks
            todo.append(pid)
    return total * 1000 // TICKS


def devtools_port(profile, browser, deadline):
    path = os.path.join(profile, "DevToolsActivePort")
    while time.monotonic() < deadline:
        if browser.poll() is not None:
            sys.exit(f"page.py: chromium exited with {browser.returncode}")
        try:
            with open(path) as f:
                return int(f.readline())
        except (OSError, ValueError):
            time.sleep(0.05)
    sys.exit("page.py: chromium did not open its DevTools port")


async def drive(args, port, browser):
    targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list"))
    page = next(t for t in targets if t["type"] == "page")
    requests = []
    async with websockets.connect(page["webSocketDebuggerUrl"], max_size=64 << 20) as ws:
        ids = iter(range(1, 1 << 30))
        pending = {}

        async def reader():
            async for raw in ws:
                message = json.loads(raw)
                if message.get("method") == "Network.requestWillBeSent":
                    requests.append(message["params"]["request"]["url"])
                elif "id" in message and message["id"] in pending:
                    pending.pop(message["id"]).set_result(message)

        async def call(method, **params):
            n = next(ids)
            pending[n] = asyncio.get_running_loop().create_future()
            await ws.send(json.dumps({"id": n, "method": method, "params": params}))
            reply = await asyncio.wait_for(pending[n], 30)
            if "error" in reply:
                raise RuntimeError(f"{method}: {reply['error']}")
            return reply.get("result", {})

        task = asyncio.create_task(reader())
        width, height = (int(v) for v in args.size.split("x"))
        await call("Network.enable")
        await call("Page.enable")
        await call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
        await call("Page.navigate", url=args.url)
        want = {p for p in args.pids.split(",") if p}
        deadline = time.monotonic() + args.timeout
        shown = []
        while True:
            found = await call(
                "Runtime.evaluate",
                expression="JSON.stringify([...document.querySelectorAll('#workers tr')].map(r => r.dataset.pid))",
                returnByValue=True,
            )
            shown = json.loads(found.get("result", {}).get("value") or "[]")
            if want <= set(shown) and shown:
                break
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        cpu_ms = None
        if args.hold:
            await asyncio.sleep(args.settle)
            before = tree_cpu_ms(browser.pid)
            await asyncio.sleep(args.hold)
            cpu_ms = tree_cpu_ms(browser.pid) - before
        if args.screenshot:
            shot = await call("Page.captureScreenshot", format="png")
            with open(args.screenshot, "wb") as f:
                f.write(base64.b64decode(shot["data"]))
        task.cancel()
    return shown, requests, cpu_ms


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--pids", default="")
    parser.add_argument("--timeout", type=float, default=20)
    parser.add_argument("--hold", type=float, default=0)
    parser.add_argument("--settle", type=float, default=5)
    parser.add_argument("--screenshot")
    parser.add_argument("--size", default="1000x720")
    args = parser.parse_args()
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if not exe:
        sys.exit("page.py: no chromium (apt-get install chromium)")
    origin = "{0.scheme}://{0.netloc}".format(urllib.parse.urlsplit(args.url))
    profile = tempfile.mkdtemp(prefix="page-")
    try:
        browser = subprocess.Popen(
            [
                exe,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--no-first-run",
                "--remote-debugging-port=0",
                f"--user-data-dir={profile}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            port = devtools_port(profile, browser, time.monotonic() + 30)
            shown, requests, cpu_ms = asyncio.run(drive(args, port, browser))
        finally:
            browser.terminate()
            try:
                browser.wait(10)
            except subprocess.TimeoutExpired:
                browser.kill()
                browser.wait()
    finally:
        # Chromium's helpers may still be writing their last files into the profile.
        shutil.rmtree(profile, ignore_errors=True)
    outside = [u for u in requests if not (u == origin or u.startswith(origin + "/"))]
    print(json.dumps({"pids": shown, "requests": requests, "outside": outside, "cpu_ms": cpu_ms}))
    missing = {p for p in args.pids.split(",") if p} - set(shown)
    if missing or outside or not requests:
        sys.exit(f"page.py: missing pids {sorted(missing)}, requests outside {origin}: {outside}")


if __name__ == "__main__":
    main()
