#!/usr/bin/env python3
"""The overload benchmark over every workload shape and simulator profile, with
infergate's DEFAULT admission config (`overload.py --defaults`), engine-side
priority off and on; prints one markdown table with each target's verdict.
Engine priority runs the sim as vLLM V1 schedules (`--scheduling-policy
priority`: the queue by priority, no preemption for a batch slot);
`--engine-policy priority-preemptive` runs an engine that preempts for a slot
(SGLang, vLLM V0) instead.

Shapes: short chat (64 prompt + 32 output tokens), long prompts (2,000 + 32),
long outputs (64 + 500). Profiles: `tiny` (16 sequences per batch, time scale
0.25) and `llama-8b-h100` (8 sequences per batch, time scale 0.5).

Usage (from the repo root, after `cargo build --release --bin infergate --bin infergate-load`):
    python3 loadtest/overload_matrix.py [--duration 15] [--min-critical 100] [--out /tmp/overload-matrix.jsonl]
        [--only-profile tiny] [--only-shape short] [--only-engine-priority on] [--bin-dir target/release]
        [--engine-policy priority|priority-preemptive] [--budget-extra 'critical_reserve: 0']
    python3 loadtest/overload_matrix.py --table /tmp/overload-matrix.jsonl   # the table of a past run
"""

import argparse
import json
import os
import subprocess
import sys

PROFILES = {
    "tiny": ["--profile", "tiny", "--max-num-seqs", "16", "--time-scale", "0.25"],
    "llama-8b-h100": ["--profile", "llama-8b-h100", "--max-num-seqs", "8", "--time-scale", "0.5"],
}
SHAPES = {
    "short": ("short chat", 64, 32),
    "long-prompt": ("long prompt", 2000, 32),
    "long-output": ("long output", 64, 500),
}


def verdict(ok):
    return "met" if ok else "**missed**"


def unloaded_runs(r):
    """The unloaded reference's runs before and after the overload (the lower counts)."""
    runs = [u["critical_p99_ms"] for u in r.get("unloaded_runs", []) if u.get("critical_p99_ms")]
    return " (" + " / ".join(f"{v:.1f}" for v in runs) + ")" if len(runs) > 1 else ""


def gateway_side(r):
    """A note where the refusal check was judged on the gateway's clock (the load generator lagged)."""
    how = r.get("shed_refusal_judged") or "client"
    return "" if how == "client" else f" ({how})"


def table(rows):
    out = [
        "| profile | shape (prompt + output) | engine priority | capacity req/s | unloaded critical p99 TTFT (before / after) "
        "| critical p99 TTFT | × unloaded | goodput | sheddable refusal p99 | tenant share (a) | max engine queue "
        "| load generator lag p99 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    misses = []
    for r in rows:
        shape = next((n for n, pt, mt in SHAPES.values() if (pt, mt) == (r["prompt_tokens"], r["max_tokens"])), "?")
        ep = ("on" + (" (preemptive)" if r.get("engine_policy") == "priority-preemptive" else "")
              if r["engine_priority"] else "off")
        bound = 1.3 if r["engine_priority"] else 2.0
        f = lambda v, fmt: (fmt % v) if v is not None else "-"
        ratio, good, shed, share = r["ratio"], r["goodput"], r["shed_refusal_p99_ms"], r["share_a"]
        checks = {
            f"critical ≤ {bound}×": ratio is not None and ratio <= bound,
            "goodput ≥ 0.95": good >= 0.95,
            # Judged on the gateway's own clock when the load generator lagged (overload.py).
            "refusal < 5 ms": r.get("shed_refusal_ok", shed is not None and shed < 5.0),
            "shares 0.45–0.55": share is not None and 0.45 <= share <= 0.55,
        }
        for c, ok in checks.items():
            if not ok:
                misses.append(f"{r['profile']} / {shape} / engine priority {ep}: {c}")
        mark = lambda ok, text: text if ok else f"**{text}**"
        out.append(
            f"| {r['profile']} (B={r['max_num_seqs']}) | {shape} ({r['prompt_tokens']} + {r['max_tokens']}) | {ep} "
            f"| {r['capacity_req_s']:.1f} | {f(r['unloaded_p99_ms'], '%.1f ms')}{unloaded_runs(r)} "
            f"| {f(r['critical_p99_ms'], '%.1f ms')} | {mark(checks[f'critical ≤ {bound}×'], f(ratio, '%.2f×'))} "
            f"| {mark(checks['goodput ≥ 0.95'], f(good, '%.2f'))} "
            f"| {mark(checks['refusal < 5 ms'], f(shed, '%.2f ms') + gateway_side(r))} "
            f"| {mark(checks['shares 0.45–0.55'], f(share, '%.3f'))} | {r['max_engine_waiting']:.0f} "
            f"| {f(r.get('schedule_lag_p99_ms'), '%.0f ms')} |"
        )
    out.append("")
    out.append(f"{len(rows) * 4 - len(misses)} of {len(rows) * 4} checks met." + (
        " Missed: " + "; ".join(misses) + "." if misses else ""))
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=15)
    ap.add_argument("--min-critical", type=int, default=100,
                    help="per cell, lengthen the window to about this many critical requests (overload.py)")
    ap.add_argument("--out", default="/tmp/overload-matrix.jsonl")
    ap.add_argument("--only-profile", default="")
    ap.add_argument("--only-shape", default="")
    ap.add_argument("--bin-dir", default="target/release", help="where infergate and infergate-load are")
    ap.add_argument("--engine-policy", default="priority", choices=["priority", "priority-preemptive"],
                    help="the sim's policy in the engine-priority cells: priority (vLLM V1: the queue by "
                         "priority, no preemption for a slot) or priority-preemptive (SGLang, vLLM V0)")
    ap.add_argument("--budget-extra", default="",
                    help="YAML flow items added to infergate's budget (overload.py), e.g. 'critical_reserve: 0'")
    ap.add_argument("--only-engine-priority", default="", choices=["", "on", "off"],
                    help="run only the cells with engine priority on (or off)")
    ap.add_argument("--table", default="", help="print the table of this JSON-lines file and exit")
    args = ap.parse_args()
    if args.table:
        with open(args.table) as f:
            print(table([json.loads(line) for line in f if line.strip()]))
        return
    here = os.path.dirname(os.path.abspath(__file__))
    for prof, pargs in PROFILES.items():
        if args.only_profile and prof != args.only_profile:
            continue
        for key, (_, pt, mt) in SHAPES.items():
            if args.only_shape and key != args.only_shape:
                continue
            for ep in ([], ["--engine-priority", "--engine-policy", args.engine_policy]):
                if args.only_engine_priority and (args.only_engine_priority == "on") != bool(ep):
                    continue
                cmd = [sys.executable, os.path.join(here, "overload.py"), "--only", "infergate", "--defaults",
                       "--bin-dir", args.bin_dir,
                       *pargs, *ep, "--prompt-tokens", str(pt), "--max-tokens", str(mt),
                       "--duration", str(args.duration), "--min-critical", str(args.min_critical),
                       "--results-jsonl", args.out]
                if args.budget_extra:
                    cmd += ["--budget-extra", args.budget_extra]
                logf = f"/tmp/overload-matrix-{prof}-{key}-{'ep' if ep else 'fcfs'}.log"
                print(f"[matrix] {' '.join(cmd)}  (log: {logf})", file=sys.stderr, flush=True)
                with open(logf, "w") as log:
                    subprocess.run(cmd, check=True, stderr=log)
    with open(args.out) as f:
        print(table([json.loads(line) for line in f if line.strip()]))


if __name__ == "__main__":
    main()
