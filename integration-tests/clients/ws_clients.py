#!/usr/bin/env python3
"""WebSocket clients for integration-tests/tests/long_lived.rs, with Python's `websockets`
(PyPI), a client nobody here wrote.

    ws_clients.py URL N

N clients each send numbered text messages one at a time and wait for each echo. A client
whose connection closes records the close code and the time (time.monotonic(), the clock
Rust's Instant also reads), reconnects at once and sends the message that was not echoed
again, so nothing may be lost. Commands on stdin, one per line:

    mark    record the time (a reload or an upgrade is about to be asked for)
    ready?  answer `ready` once every client is connected
    stop    let every client finish its message, then print the report (one JSON line)

It prints `connected N` once the N clients are first connected.
"""

import asyncio
import json
import sys
import time

import websockets

URL, N = sys.argv[1], int(sys.argv[2])
marks, closes = [], []
connected = set()
stats = {"sent": 0, "echoed": 0, "resent": 0, "refused": 0}
stopping = asyncio.Event()


async def client(i):
    n, pending = 0, None
    while not stopping.is_set():
        try:
            async with websockets.connect(URL, open_timeout=5, close_timeout=2, ping_interval=None) as ws:
                connected.add(i)
                while not stopping.is_set():
                    if pending is None:
                        n += 1
                        pending = f"{i}-{n}"
                        stats["sent"] += 1
                    else:
                        stats["resent"] += 1
                    await ws.send(pending)
                    reply = await asyncio.wait_for(ws.recv(), 10)
                    if reply != pending:
                        raise SystemExit(f"client {i}: echo {reply!r} for {pending!r}")
                    stats["echoed"] += 1
                    pending = None
                    await asyncio.sleep(0.01)
                await ws.close()
                return
        except websockets.ConnectionClosed as e:
            connected.discard(i)
            closes.append([i, time.monotonic(), e.rcvd.code if e.rcvd else None])
        except (OSError, asyncio.TimeoutError, websockets.InvalidHandshake):
            connected.discard(i)
            stats["refused"] += 1
            await asyncio.sleep(0.02)


async def commands():
    loop = asyncio.get_running_loop()
    while True:
        line = (await loop.run_in_executor(None, sys.stdin.readline)).strip()
        if line == "mark":
            marks.append(time.monotonic())
        elif line == "ready?":
            while len(connected) < N:
                await asyncio.sleep(0.01)
            print("ready", flush=True)
        elif line in ("stop", ""):
            stopping.set()
            return


async def main():
    clients = [asyncio.create_task(client(i)) for i in range(N)]
    while len(connected) < N:
        await asyncio.sleep(0.01)
    print(f"connected {N}", flush=True)
    await commands()
    await asyncio.gather(*clients)
    print(json.dumps({"marks": marks, "closes": closes, **stats}), flush=True)


asyncio.run(main())
