"""Opens N streaming requests to a gateway and keeps them open, idle.

Usage: idle_streams.py HOST PORT MODEL N ROUTES_URL
Prints `open N` once every request is sent and the gateway's /routes shows
them in flight, then waits until killed. Used by dataplane_bench.sh.
"""
import json
import socket
import sys
import time
import urllib.request

host, port, model, n, routes_url = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5]
body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}],
                   "max_tokens": 16, "stream": True}).encode()
req = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\ncontent-type: application/json\r\n"
       f"content-length: {len(body)}\r\n\r\n").encode() + body
socks = []
for i in range(n):
    s = socket.create_connection((host, port))
    s.sendall(req)
    socks.append(s)
deadline = time.time() + 120
in_flight = 0
while time.time() < deadline:
    routes = json.load(urllib.request.urlopen(routes_url))
    in_flight = sum(r["requests_in_flight"] for p in routes["pools"] for r in p["replicas"])
    if in_flight >= n:
        break
    time.sleep(0.5)
print(f"open {len(socks)} connections, {in_flight} requests in flight at the gateway", flush=True)
while True:
    time.sleep(3600)
