#!/usr/bin/env python3
"""Overload benchmark: 3x the fleet's capacity, mixed priorities, on simulated
replicas; infergate side by side with vllm-router and sglang-router (their own
admission flags) on the same load.

Reports, per gateway:
  - p99 TTFT of critical requests, and its ratio to the same fleet unloaded
    (target: at most 2x);
  - the time to reject a sheddable request (p99 of its error answers; target
    under 5 ms). The client's clock includes the load generator's own delays;
    when its schedule lag p99 is 5 ms or more it cannot measure a 5 ms bound,
    and the gateway's own histogram judges (99% of sheds within 5 ms; the
    verdict says which clock judged);
  - goodput (successful requests per second) against the fleet's capacity
    (target: at least 95%);
  - the largest engine-side queue (`vllm:num_requests_waiting`) any replica
    reached during the run (infergate keeps it under its threshold);
  - the served-token shares of two backlogged tenants of the standard band at
    equal weight (`x-gateway-inference-fairness-id` a and b; target 0.45 to 0.55).

Capacity is measured by driving one replica directly at its batch size and at
twice it, each for a window long enough for long requests (about five request
lifetimes, after a warm-up of one and a half, from a first probe of the
lifetime); the better of the two counts. The unloaded reference (critical
requests alone at a quarter of capacity, through the gateway) runs before and
after the overload; the lower of its two p99s counts. The load generator's lag
(how late it sent its requests: a busy machine shows here first) is reported
for every run.

Usage (from the repo root, after `cargo build --release --bin infergate --bin infergate-load`):
    python3 loadtest/overload.py [--duration 15] [--replicas 2] [--time-scale 0.25]
        [--profile tiny] [--defaults] [--engine-priority]
        [--prompt-tokens 64 --max-tokens 32]   # the workload shape
        [--results-jsonl FILE]                 # append one JSON line per gateway

Everything listens on 127.0.0.1. Needs /tmp/peers-venv (../shared/peers/setup.sh)
for the peer routers; without it only infergate runs.
"""

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

MODEL = "m"


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def wait_http(url, timeout=60.0):
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status < 500:
                    return
        except Exception:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} never answered")


class Procs:
    def __init__(self):
        self.procs = []

    def start(self, name, cmd, env=None):
        log(f"[start] {name}: {' '.join(cmd)}")
        p = subprocess.Popen(
            cmd,
            stdout=subprocess.DEVNULL,
            stderr=open(f"/tmp/overload-{name}.log", "w"),
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        self.procs.append((name, p))
        return p

    def stop(self, p):
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()

    def stop_all(self):
        for _, p in reversed(self.procs):
            self.stop(p)


class QueueWatch(threading.Thread):
    """Polls every replica's /metrics and keeps the largest waiting queue."""

    def __init__(self, urls):
        super().__init__(daemon=True)
        self.urls = urls
        self.max_waiting = 0.0
        self.samples = 0
        self.running = True

    def run(self):
        pat = re.compile(r"^vllm:num_requests_waiting(\{[^}]*\})?\s+([0-9.eE+-]+)", re.M)
        while self.running:
            for u in self.urls:
                try:
                    with urllib.request.urlopen(u + "/metrics", timeout=1) as r:
                        text = r.read().decode()
                    for m in pat.finditer(text):
                        self.max_waiting = max(self.max_waiting, float(m.group(2)))
                    self.samples += 1
                except Exception:
                    pass
            time.sleep(0.1)


def kv_cache_tokens(url):
    """The replica's KV cache size in tokens, from its vLLM-style metrics."""
    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    m = re.search(r'^vllm:cache_config_info\{([^}]*)\}', text, re.M)
    labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1))) if m else {}
    return int(labels.get("block_size", 0)) * int(labels.get("num_gpu_blocks", 0))


def run_load(load_bin, url, args, classes, rate=None, concurrency=None, duration=None, seed=0, warmup=None):
    cmd = [
        load_bin, "--url", url, "--workload", "stream", "--model", MODEL,
        "--prompt-tokens", str(args.prompt_tokens), "--max-tokens", str(args.max_tokens),
        "--distinct", str(args.distinct),
        "--duration", str(duration or args.duration),
        "--warmup", str(args.warmup if warmup is None else warmup),
        "--timeout", "30", "--max-in-flight", "4096", "--seed", str(seed), "--json",
    ]
    if rate is not None:
        cmd += ["--rate", f"{rate:.2f}"]
    else:
        cmd += ["--concurrency", str(concurrency)]
    for c in classes:
        cmd += ["--class", c]
    log(f"[load] {' '.join(cmd)}")
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def p(d, *keys):
    for k in keys:
        if d is None:
            return None
        d = d.get(k)
    return d



def refusal_verdict(client_p99, lag_p99, gateway_fast, shed_total):
    """Whether sheddable refusals meet < 5 ms at p99, and on whose clock.

    The client's figure counts the load generator's own delays (it reads the
    answer late when its runtime lags). When its schedule lag p99 is 5 ms or
    more, the client cannot measure a 5 ms bound, so the gateway's own
    histogram judges instead: at least 99% of the shed requests answered
    within 5 ms (`infergate_request_duration_seconds`, replica "-").
    Returns (met, how)."""
    if client_p99 is not None and client_p99 < 5.0:
        return True, "client"
    if lag_p99 is not None and lag_p99 >= 5.0 and gateway_fast is not None and shed_total:
        share = min(1.0, gateway_fast / shed_total)
        return share >= 0.99, (f"gateway side: {share * 100:.1f}% within 5 ms "
                               f"(load generator lag p99 {lag_p99:.0f} ms)")
    return False, "client"

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin-dir", default="target/release")
    ap.add_argument("--load-seed", type=int, default=3,
                    help="seed of the overload phase's arrivals and classes (another seed: another sample of the same load)")
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--profile", default="tiny",
                    help="the simulator profile (tiny, llama-8b-h100, ...)")
    ap.add_argument("--defaults", action="store_true",
                    help="infergate with the default admission config: only the queue deadline; no "
                         "request cap, token budget, reserve, engine queue or prefill cap (self-tuning "
                         "derives them; the tuning flags below are ignored)")
    ap.add_argument("--engine-priority", action="store_true",
                    help="run the simulator with --scheduling-policy priority (see --engine-policy) and "
                         "declare engine_priority: vllm on infergate's pool")
    ap.add_argument("--budget-extra", default="",
                    help="YAML flow items added to infergate's budget (with --defaults too), e.g. "
                         "'critical_reserve: 0' to compare a hand-set knob with the derived one")
    ap.add_argument("--engine-policy", default="priority", choices=["priority", "priority-preemptive"],
                    help="with --engine-priority, the sim's --scheduling-policy: priority (vLLM V1: the waiting "
                         "queue by priority; only a full KV cache preempts) or priority-preemptive (also "
                         "preempts for a batch slot: SGLang, vLLM V0)")
    ap.add_argument("--time-scale", type=float, default=0.25)
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--output-len", default="max-tokens",
                    help="the sim's output length: max-tokens, or uniform:MIN:MAX (capped by --max-tokens)")
    ap.add_argument("--duration", type=float, default=60)
    ap.add_argument("--min-critical", type=int, default=0,
                    help="lengthen the measured overload window until it is expected to hold this many "
                         "critical requests (a p99 over fewer is about the maximum; long outputs serve "
                         "few requests per second)")
    ap.add_argument("--warmup", type=float, default=2)
    ap.add_argument("--overload", type=float, default=3.0)
    ap.add_argument("--deadline-ms", type=int, default=2000)
    ap.add_argument("--critical-reserve", type=float, default=0.25,
                    help="infergate budget.critical_reserve (share of each replica kept for critical)")
    ap.add_argument("--critical-engine-queue", type=int, default=1,
                    help="infergate budget.critical_engine_queue (critical requests a replica may "
                         "take beyond its request cap, waiting in the engine's queue)")
    ap.add_argument("--max-prefill-tokens", type=int, default=80,
                    help="infergate budget.max_prefill_tokens_per_replica (0: unset): unanswered prompt "
                         "tokens per replica above which non-critical requests wait")
    ap.add_argument("--engine-queue-threshold", type=int, default=5,
                    help="an engine queue (vllm:num_requests_waiting) above this counts as overloaded "
                         "(5: the Gateway API Inference Extension's queue-depth threshold, and infergate's "
                         "routing.saturation.max_waiting default)")
    ap.add_argument("--peers-venv", default="/tmp/peers-venv")
    ap.add_argument("--base-port", type=int, default=18700)
    ap.add_argument("--results-jsonl", default="",
                    help="append one JSON line per gateway with the run's figures to this file")
    ap.add_argument("--only", default="", help="comma list of gateways to run (infergate,vllm-router,sglang-router)")
    args = ap.parse_args()
    if args.profile != "tiny" and not args.defaults:
        ap.error("the tuned budget is sized for the tiny profile's KV cache: use --defaults with other profiles")

    infergate = os.path.join(args.bin_dir, "infergate")
    load_bin = os.path.join(args.bin_dir, "infergate-load")
    bp = args.base_port
    sim_urls = [f"http://127.0.0.1:{bp + i}" for i in range(args.replicas)]
    procs = Procs()
    results = {}
    try:
        procs.start("sim", [
            infergate, "sim", "--profile", args.profile, "--replicas", str(args.replicas),
            "--base-port", str(bp), "--time-scale", str(args.time_scale),
            "--served-model-name", MODEL, "--max-num-seqs", str(args.max_num_seqs),
            "--output-len", args.output_len,
            "--scheduling-policy", args.engine_policy if args.engine_priority else "fcfs",
        ])
        for u in sim_urls:
            wait_http(u + "/health")
        # Distinct prompts: four times what the fleet's KV caches hold, so
        # that a prompt is not still cached when it comes round again (with
        # the load generator's default of 64, every 2,000-token prompt of the
        # llama-8b-h100 profile hit the prefix cache from the second round
        # on, and a capacity run after another with the same prompts served
        # them cached: 2.5x the requests per second).
        kv = kv_cache_tokens(sim_urls[0])
        args.distinct = min(20000, max(64, -(-4 * kv * args.replicas // max(1, args.prompt_tokens))))
        log(f"[prompts] KV cache {kv} tokens per replica: {args.distinct} distinct prompts")

        # A request's lifetime at a full batch (a first probe), so that the
        # capacity window holds several lifetimes even for long outputs.
        probe = run_load(load_bin, sim_urls[0], args, [], concurrency=args.max_num_seqs, duration=0.5,
                         seed=1, warmup=0)
        lifetime = (p(probe, "e2e_ms", "p50") or p(probe, "classes", "default", "e2e_ms", "p50") or 1000) / 1000
        cap_warmup = max(2.0, 1.5 * lifetime)
        cap_window = max(10.0, 5 * lifetime)
        log(f"[capacity] request lifetime {lifetime:.2f} s: window {cap_window:.1f} s after {cap_warmup:.1f} s")
        # Capacity: one replica driven directly at its batch size and at twice
        # it, times the replicas; the better of the two. At twice the batch
        # the engine's own queue is full, and an engine that prefills every
        # waiting prompt at once (chunked prefill up to its step budget)
        # stalls its decodes: long prompts then serve fewer requests per
        # second than at exactly the batch, and a gateway that paces them
        # would show a goodput above 1 against that figure.
        per_conc = {}
        for i, conc in enumerate((args.max_num_seqs, 2 * args.max_num_seqs)):
            # Each run its own prompts (the seed labels them): none cached by the other.
            direct = run_load(load_bin, sim_urls[0], args, [], concurrency=conc,
                              duration=cap_warmup + cap_window, seed=10 + i, warmup=cap_warmup)
            # Requests served per second of the window they were sent in (not
            # over the window plus the drain after it, which a long request's
            # lifetime would stretch); the overload run is counted the same way.
            per_conc[conc] = direct["ok"] / cap_window
        per_replica = max(per_conc.values())
        capacity = per_replica * args.replicas
        log(f"[capacity] req/s per replica by concurrency {per_conc} -> fleet {capacity:.1f} req/s")

        # infergate: admission sized to the engine (batch size and KV cache).
        kv_tokens = 256 * 16  # the tiny profile's KV cache
        reserve = f", critical_reserve: {args.critical_reserve}" if args.critical_reserve > 0 else ""
        reserve += f", critical_engine_queue: {args.critical_engine_queue}"
        if args.max_prefill_tokens > 0:
            reserve += f", max_prefill_tokens_per_replica: {args.max_prefill_tokens}"
        budget = f"tokens_per_replica: {int(kv_tokens * 0.9)}, max_requests_per_replica: {args.max_num_seqs}{reserve}"
        if args.defaults:
            budget = ""
        if args.budget_extra:
            budget = ", ".join(b for b in (budget, args.budget_extra) if b)
        engine_priority = "\n    engine_priority: vllm" if args.engine_priority else ""
        cfg = f"""
listeners:
  main: {{ address: "127.0.0.1:{bp + 100}" }}
  admin: {{ address: "127.0.0.1:{bp + 101}" }}
logging: {{ level: warn }}
pools:
  - name: p
    endpoints: [{", ".join(f'"{u}"' for u in sim_urls)}]{engine_priority}
routes:
  - model: {MODEL}
    pool: p
    admission:
      budget: {{ {budget} }}
      queue: {{ timeout_ms: {args.deadline_ms}, max_requests: 4096 }}
"""
        cfg_file = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False)
        cfg_file.write(cfg)
        cfg_file.close()
        targets = {
            "infergate": (
                [infergate, "serve", "--config", cfg_file.name],
                f"http://127.0.0.1:{bp + 100}",
                f"http://127.0.0.1:{bp + 101}/readyz",
                {},
            ),
        }
        venv = args.peers_venv
        peer_env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "1"}
        slots = args.replicas * args.max_num_seqs
        peer_admission = [
            "--max-concurrent-requests", str(slots), "--queue-size", "4096",
            "--queue-timeout-secs", str(max(1, args.deadline_ms // 1000)),
            "--rate-limit-tokens-per-second", "100000",
        ]
        if os.path.exists(f"{venv}/bin/vllm-router"):
            targets["vllm-router"] = (
                [f"{venv}/bin/vllm-router", "--host", "127.0.0.1", "--port", str(bp + 110),
                 "--worker-urls", *sim_urls, "--policy", "round_robin",
                 "--prometheus-host", "127.0.0.1", "--prometheus-port", str(bp + 111),
                 "--worker-startup-check-interval", "1", *peer_admission],
                f"http://127.0.0.1:{bp + 110}",
                f"http://127.0.0.1:{bp + 110}/health",
                peer_env,
            )
        if os.path.exists(f"{venv}/bin/sglang-router"):
            targets["sglang-router"] = (
                [f"{venv}/bin/sglang-router", "launch", "--host", "127.0.0.1", "--port", str(bp + 120),
                 "--worker-urls", *sim_urls, "--policy", "round_robin",
                 "--prometheus-host", "127.0.0.1", "--prometheus-port", str(bp + 121),
                 "--worker-startup-check-interval", "1", *peer_admission],
                f"http://127.0.0.1:{bp + 120}",
                f"http://127.0.0.1:{bp + 120}/health",
                peer_env,
            )
        only = [x for x in args.only.split(",") if x]
        # Standard traffic is two tenants at equal weight, each backlogged at 3x.
        classes = [
            "critical=0.2,x-infergate-priority:critical",
            "standard-a=0.2,x-infergate-priority:standard,x-gateway-inference-fairness-id:a",
            "standard-b=0.2,x-infergate-priority:standard,x-gateway-inference-fairness-id:b",
            "sheddable=0.4,x-infergate-priority:sheddable",
        ]
        if args.min_critical > 0:
            need = args.min_critical / (0.2 * args.overload * capacity)
            if need > args.duration:
                log(f"[duration] {args.duration:.0f} s -> {need:.0f} s for {args.min_critical} critical requests")
                args.duration = round(need)
        # The load after warm-up: at least the lifetime of a request under load.
        load_warmup = max(args.warmup, 1.5 * lifetime)
        unloaded = None
        unloaded_runs = []

        def unloaded_run(name, url, seed):
            # The same fleet unloaded: critical only, at a quarter of capacity.
            base = run_load(load_bin, url, args, ["critical=1,x-infergate-priority:critical"],
                            rate=capacity * 0.25, seed=seed, warmup=load_warmup,
                            duration=load_warmup + max(5.0, args.duration / 2))
            v = p(base, "classes", "critical", "ttft_ms", "p99")
            lag = p(base, "schedule_lag_ms", "p99")
            log(f"[unloaded via {name}] critical p99 TTFT {v} ms (load generator lag p99 {lag} ms)")
            unloaded_runs.append({"critical_p99_ms": v, "schedule_lag_p99_ms": lag})

        for name, (cmd, url, ready, env) in targets.items():
            if only and name not in only:
                continue
            proc = procs.start(name, cmd, env)
            wait_http(ready)
            time.sleep(2 if name != "infergate" else 0.2)
            # The unloaded reference runs before and after the overload (the
            # machine's noise comes and goes); the lower p99 counts, so a busy
            # moment during one of them cannot flatter the ratio.
            first_gateway = unloaded is None
            if first_gateway:
                unloaded_run(name, url, 2)
            watch = QueueWatch(sim_urls)
            watch.start()
            r = run_load(load_bin, url, args, classes, rate=capacity * args.overload, seed=args.load_seed, warmup=load_warmup,
                         duration=load_warmup + args.duration)
            watch.running = False
            watch.join()
            if first_gateway:
                # Let the overload's queues drain before measuring "unloaded".
                time.sleep(args.deadline_ms / 1000 + 1)
                unloaded_run(name, url, 4)
                unloaded = min(u["critical_p99_ms"] for u in unloaded_runs if u["critical_p99_ms"]) \
                    if any(u["critical_p99_ms"] for u in unloaded_runs) else None
            gateway_side = None
            shed_total = None
            fast = None
            if name == "infergate":
                # The gateway's own view: time critical requests waited in its
                # queue, and how many refusals (replica "-") took under 5 ms.
                with urllib.request.urlopen(f"http://127.0.0.1:{bp + 101}/metrics", timeout=5) as m:
                    for line in m.read().decode().splitlines():
                        if line.startswith("infergate_admission_queue_wait_seconds") and "critical" in line:
                            log(f"[infergate metrics] {line}")
                        if (line.startswith("infergate_request_duration_seconds_bucket")
                                and 'replica="-"' in line and 'le="0.005"' in line):
                            fast = float(line.rsplit(" ", 1)[1])
                            log(f"[infergate metrics] {line}")
                        if line.startswith("infergate_admission_rejected_total") and 'reason="shed"' in line:
                            shed_total = float(line.rsplit(" ", 1)[1])
                            log(f"[infergate metrics] {line}")
            if fast is not None:
                gateway_side = (fast, shed_total)
            results[name] = (r, watch.max_waiting, gateway_side)
            procs.stop(proc)
            time.sleep(1)
    finally:
        procs.stop_all()

    tuning = ("default admission config" if args.defaults else
              f"infergate critical reserve {args.critical_reserve}, critical engine queue {args.critical_engine_queue},"
              f" prefill cap {args.max_prefill_tokens or 'none'}")
    if args.budget_extra:
        tuning += f", plus {args.budget_extra}"
    print(f"fleet: {args.replicas} x sim {args.profile} (max_num_seqs {args.max_num_seqs}, time scale {args.time_scale},"
          f" engine priority {args.engine_policy if args.engine_priority else 'off'}),"
          f" capacity {capacity:.1f} req/s; offered {args.overload:.1f}x = {capacity * args.overload:.1f} req/s"
          f" for {args.duration}s (warm-up {args.warmup}s), stream chat {args.prompt_tokens}+{args.max_tokens} tokens,"
          f" 20% critical / 40% standard / 40% sheddable; queue deadline {args.deadline_ms} ms; {tuning}")
    runs = ", ".join(f"{u['critical_p99_ms']:.1f} ms (lag p99 {u['schedule_lag_p99_ms']} ms)"
                     for u in unloaded_runs if u["critical_p99_ms"])
    print(f"unloaded critical p99 TTFT: {unloaded:.1f} ms, the lower of before and after the overload: {runs}"
          if unloaded else "unloaded: n/a")
    print(f"capacity per replica by concurrency (req/s): {per_conc}")
    hdr = f"{'gateway':<14}{'crit p99 TTFT':>14}{'x unloaded':>11}{'crit ok%':>9}{'shed reject p99':>16}{'goodput':>9}{'ok req/s':>9}{'max engine queue':>17}  statuses"
    print(hdr)
    for name, (r, maxq, fast_refusals) in results.items():
        crit = p(r, "classes", "critical")
        shed = p(r, "classes", "sheddable")
        crit_p99 = p(crit, "ttft_ms", "p99")
        ratio = crit_p99 / unloaded if crit_p99 and unloaded else None
        crit_ok = 100.0 * crit["ok"] / crit["requests"] if crit and crit["requests"] else 0.0
        shed_rej = p(shed, "error_e2e_ms", "p99")
        log(f"[{name}] critical TTFT ms {p(crit, 'ttft_ms')}; sheddable refusal ms {p(shed, 'error_e2e_ms')};"
            f" schedule lag ms {r.get('schedule_lag_ms')}")
        goodput = r["ok"] / args.duration / capacity
        statuses = {"ok": r["ok"], **r["errors"]}
        # Served output tokens of the two standard tenants.
        ta = p(r, "classes", "standard-a", "output_tokens") or 0
        tb = p(r, "classes", "standard-b", "output_tokens") or 0
        share_a = ta / (ta + tb) if ta + tb else None
        fmt = lambda v, f: (f % v) if v is not None else "-"
        print(f"{name:<14}{fmt(crit_p99, '%.1f ms'):>14}{fmt(ratio, '%.2fx'):>11}{crit_ok:>8.1f}%"
              f"{fmt(shed_rej, '%.2f ms'):>16}{goodput * 100:>8.1f}%{r['ok'] / args.duration:>9.1f}{maxq:>17.0f}  {json.dumps(statuses)}")
        if name == "infergate":
            bound = 1.3 if args.engine_priority else 2.0
            refusal_ok, refusal_how = refusal_verdict(
                shed_rej, p(r, "schedule_lag_ms", "p99"),
                *(fast_refusals if fast_refusals is not None else (None, None)))
            checks = [
                (f"critical p99 TTFT <= {bound}x unloaded", ratio is not None and ratio <= bound),
                (f"sheddable refusal p99 < 5 ms ({refusal_how})", refusal_ok),
                ("goodput >= 95% of capacity", goodput >= 0.95),
                ("tenant shares 0.45-0.55", share_a is not None and 0.45 <= share_a <= 0.55),
                (f"engine queues <= {args.engine_queue_threshold}", maxq <= args.engine_queue_threshold),
            ]
            print(f"{'':<14}standard tenants' served tokens: a {ta}, b {tb}, share of a "
                  f"{fmt(share_a, '%.3f')}")
            print(f"{'':<14}targets: " + "; ".join(f"{c}: {'met' if ok else 'MISSED'}" for c, ok in checks))
        if fast_refusals is not None:
            fast, shed_all = fast_refusals
            print(f"{'':<14}gateway side (whole run, warm-up included): {fast:.0f} refusals answered within 5 ms;"
                  f" {shed_all if shed_all is None else int(shed_all)} sheddable requests shed"
                  f" (503 deadline refusals take {args.deadline_ms} ms, so the fast ones are the 429s)")
        if args.results_jsonl:
            row = {
                "gateway": name, "profile": args.profile, "max_num_seqs": args.max_num_seqs,
                "time_scale": args.time_scale, "prompt_tokens": args.prompt_tokens, "distinct_prompts": args.distinct,
                "max_tokens": args.max_tokens, "engine_priority": args.engine_priority,
                "engine_policy": args.engine_policy if args.engine_priority else "fcfs",
                "defaults": args.defaults, "budget_extra": args.budget_extra, "duration_s": args.duration, "lifetime_s": lifetime,
                "capacity_req_s": capacity, "capacity_by_concurrency": per_conc,
                "unloaded_p99_ms": unloaded, "unloaded_runs": unloaded_runs, "critical_p99_ms": crit_p99,
                "ratio": ratio, "critical_ok": crit_ok / 100, "shed_refusal_p99_ms": shed_rej,
                # Judged on the gateway's own histogram when the load
                # generator lagged (`refusal_verdict`).
                "shed_refusal_ok": refusal_ok if name == "infergate" else None,
                "shed_refusal_judged": refusal_how if name == "infergate" else None,
                "shed_gateway_fast": fast_refusals[0] if fast_refusals else None,
                "shed_total": fast_refusals[1] if fast_refusals else None,
                "goodput": goodput, "share_a": share_a, "max_engine_waiting": maxq, "statuses": statuses,
                "critical_ttft_ms": p(crit, "ttft_ms"),
                # How late the load generator sent its requests: a loaded
                # machine shows here first.
                "schedule_lag_p99_ms": p(r, "schedule_lag_ms", "p99"),
            }
            with open(args.results_jsonl, "a") as out:
                out.write(json.dumps(row) + "\n")
    with open("/tmp/overload-results.json", "w") as out:
        json.dump({k: {"report": v[0], "max_engine_waiting": v[1]} for k, v in results.items()}, out)


if __name__ == "__main__":
    main()
