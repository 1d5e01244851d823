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


if __name__ == "__main__":
    main()
