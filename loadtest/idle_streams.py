"""Opens N streaming requests to a gateway and keeps them open, idle.

Usage: idle_streams.py HOST PORT MODEL N ROUTES_URL [TIMEOUT_S]

Sends every request, then polls the gateway's /routes (each replica's
`requests_in_flight`, the gateway's own in-flight accounting) until all N are
in flight at the gateway, i.e. each holds its client connection, its parsed
request and an upstream connection. Only then does it print
`open N connections, N requests in flight at the gateway` (the line
dataplane_bench.sh waits for before reading RSS). If they are not all in
flight within TIMEOUT_S (default 300), or a stream was closed or failed
(shed, error status, SSE error event), it prints `incomplete ...` and exits 1. Then it waits until
killed, holding the streams open.
"""
import json
import os
import select
import socket
import sys
import time
import urllib.request

host, port, model, n, routes_url = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5]
timeout_s = float(sys.argv[6]) if len(sys.argv) > 6 else 300.0
body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}],
                   "max_tokens": 16, "stream": True}).encode()
# IDLE_HEADER="name: value" adds a header to every request (an API key).
extra = os.environ.get("IDLE_HEADER", "")
extra = f"{extra}\r\n" if extra else ""
req = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\ncontent-type: application/json\r\n"
       f"{extra}content-length: {len(body)}\r\n\r\n").encode() + body


def in_flight():
    routes = json.load(urllib.request.urlopen(routes_url, timeout=10))
    return sum(r["requests_in_flight"] for p in routes["pools"] for r in p["replicas"])


def failed(socks):
    """Streams the gateway closed or answered with an error or a non-200 status
    (an open idle stream may have sent its 200 head, SSE comments or a role
    chunk, never an error)."""
    bad = 0
    for s in socks:
        s.setblocking(False)
        try:
            data = s.recv(65536, socket.MSG_PEEK)
        except BlockingIOError:
            continue  # nothing yet: open
        except OSError:
            bad += 1
            continue
        finally:
            s.setblocking(True)
        if not data or not data.startswith(b"HTTP/1.1 200") or b'"error"' in data:
            bad += 1
    return bad


socks = []
t0 = time.time()
for i in range(n):
    s = socket.create_connection((host, port))
    s.sendall(req)
    socks.append(s)
sent_s = time.time() - t0
deadline = time.time() + timeout_s
count = 0
while time.time() < deadline:
    count = in_flight()
    if count >= n:
        break
    time.sleep(0.5)
bad = failed(socks)
if count < n or bad:
    print(f"incomplete: {len(socks)} connections, {count} of {n} requests in flight at the gateway, "
          f"{bad} closed or failed", flush=True)
    sys.exit(1)
print(f"open {len(socks)} connections, {count} requests in flight at the gateway "
      f"(sent in {sent_s:.1f}s, all in flight after {time.time() - t0:.1f}s)", flush=True)
while True:
    time.sleep(3600)
