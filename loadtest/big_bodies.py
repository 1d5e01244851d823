#!/usr/bin/env python3
# Usage: python3 loadtest/big_bodies.py GATEWAY_PID PORT CLIENTS BODY_BYTES
# 64 clients each send a maximum-size `prompt: [1,1,...]` body at once to a
# running gateway; reports the gateway's peak RSS growth (VmHWM) and answers.
import socket, sys, threading, time, collections
pid = int(sys.argv[1]); port = int(sys.argv[2]); clients = int(sys.argv[3]); size = int(sys.argv[4])
def status():
    d = {}
    for l in open(f"/proc/{pid}/status"):
        k, v = l.split(":", 1)
        d[k] = v.strip()
    return d
head = b'{"model":"sim-llama","max_tokens":1,"prompt":['
tail = b'1]}'
n = (size - len(head) - len(tail)) // 2
body = head + b"1," * n + tail
assert len(body) <= size
before = status()
answers = collections.Counter()
def one(i):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(body))
    s.sendall(body)
    s.settimeout(60)
    data = b""
    try:
        while True:
            c = s.recv(65536)
            if not c: break
            data += c
    except Exception as e:
        data = data or str(e).encode()
    answers[data.split(b" ", 2)[1].decode() if data.startswith(b"HTTP/") else "closed"] += 1
t0 = time.time()
ts = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
[t.start() for t in ts]; [t.join() for t in ts]
after = status()
kb = lambda s: int(s.split()[0])
print(f"clients={clients} body={len(body)} bytes answers={dict(answers)} secs={time.time()-t0:.1f}")
print(f"VmRSS before={kb(before['VmRSS'])//1024} MiB, VmHWM before={kb(before['VmHWM'])//1024} MiB, VmHWM after={kb(after['VmHWM'])//1024} MiB, growth={(kb(after['VmHWM'])-kb(before['VmRSS']))//1024} MiB")
