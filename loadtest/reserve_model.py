#!/usr/bin/env python3
"""A slot model of one replica under the overload benchmark's load, to see
what a critical reserve buys and costs without preemption (the numbers behind
the reserve rule in docs/admission.md, "Self-tuning").

B slots; each request holds one for S seconds (±10%); standard requests are
always waiting (backlogged) and are placed while fewer than B - r slots are
busy; critical requests arrive as a Poisson stream and take any free slot,
else wait (first come, first served) for the next one. Prints goodput (busy
slots over B) and the critical wait percentiles.

    python3 loadtest/reserve_model.py     # B = 16, S = 0.45 s, critical 20/s and 5/s per replica
    python3 loadtest/reserve_model.py --frontier
        # the overload matrix's six cells without preemption: for each, the
        # smallest reserve that keeps the critical wait within the target
        # (2x unloaded TTFT leaves one unloaded TTFT of wait) and its goodput
"""
import heapq
import random


def run(B, r, lam, S, T=2000.0, seed=1):
    random.seed(seed)
    t, ends, crit_q, crit_in, std_in = 0.0, [], [], 0, 0
    next_arr, done, waits = random.expovariate(lam), 0, []

    def fill(now):
        nonlocal crit_in, std_in
        while crit_q and crit_in + std_in < B:
            waits.append(now - crit_q.pop(0))
            crit_in += 1
            heapq.heappush(ends, (now + S * random.uniform(0.9, 1.1), "c"))
        while crit_in + std_in < B - r:
            std_in += 1
            heapq.heappush(ends, (now + S * random.uniform(0.9, 1.1), "s"))

    fill(0.0)
    while t < T:
        if ends and ends[0][0] < next_arr:
            t, kind = heapq.heappop(ends)
            done += 1
            if kind == "c":
                crit_in -= 1
            else:
                std_in -= 1
        else:
            t = next_arr
            next_arr = t + random.expovariate(lam)
            crit_q.append(t)
        fill(t)
    waits.sort()
    n = len(waits)
    return done / T / (B / S), waits[n // 2], waits[int(n * 0.9)], waits[int(n * 0.99)]


def main():
    B, S = 16, 0.45
    for lam in (20.0, 5.0):
        for r in (0, 1, 2, 4):
            g, p50, p90, p99 = run(B, r, lam, S)
            print(f"critical {lam:.0f}/s ({lam * S / B:.0%} of capacity), reserve {r}: goodput {g:.3f},"
                  f" critical wait p50 {p50 * 1000:.1f} ms, p90 {p90 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms")


# The overload matrix's cells (docs/admission.md, quiet run of 2026-12-07):
# (profile, shape, batch slots per replica, fleet capacity in req/s,
# unloaded critical p99 TTFT in s). Two replicas; critical is 20% of 3x
# capacity, so 60% of it.
MATRIX = [
    ("tiny", "short chat", 16, 70.4, 0.0323),
    ("tiny", "long prompt", 16, 6.5, 0.3037),
    ("tiny", "long output", 16, 4.1, 0.0232),
    ("llama-8b-h100", "short chat", 8, 36.8, 0.0293),
    ("llama-8b-h100", "long prompt", 8, 11.2, 0.2150),
    ("llama-8b-h100", "long output", 8, 2.5, 0.0290),
]


def frontier():
    """Per cell, the fleet as one pool of slots (the gateway's queue feeds
    both replicas): the smallest reserve whose critical p99 wait fits in one
    unloaded TTFT, and the goodput it leaves; then the most reserve that
    keeps goodput at 0.95 and the wait it leaves."""
    for profile, shape, b, capacity, unloaded in MATRIX:
        slots = 2 * b
        service = slots / capacity
        lam = 0.6 * capacity
        rows = [(r, *run(slots, r, lam, service, T=3000.0 * service)) for r in range(slots + 1)]
        fits = [row for row in rows if row[4] <= unloaded]
        keeps = [row for row in rows if row[1] >= 0.95]
        fit = (f"reserve {fits[0][0]} of {slots}: goodput {fits[0][1]:.2f}" if fits
               else f"none (all {slots} slots reserved: wait p99 {rows[-1][4] * 1000:.0f} ms)")
        keep = keeps[-1]
        print(f"{profile} {shape}: wait budget {unloaded * 1000:.0f} ms; fits: {fit};"
              f" goodput >= 0.95: reserve {keep[0]}, wait p99 {keep[4] * 1000:.0f} ms"
              f" ({(keep[4] + unloaded) / unloaded:.1f}x unloaded)")


if __name__ == "__main__":
    import sys

    frontier() if "--frontier" in sys.argv[1:] else main()
