"""Blist allocation cost against device size: 16 Ki slots versus 16 Mi slots.

Each device is first fragmented the way a busy swap device is: runs of random
length 1..32 are allocated until it is full, then every other run is freed,
leaving holes of 1..32 slots all over it at 50 % occupancy.  Then, per cycle,
one allocation of a random size 1..32 and one free of a random live run keep
the occupancy steady; after a short untimed warm-up the allocations and frees
are timed one by one.  The claim under test: cost grows with the tree depth
(2 meta levels against 5), not with the device size (1024 times larger), so the
ratio of microseconds per allocation stays below 3.

    python bench/blist_bench.py [--cycles N] [--seed S]

Exit status 1 if the ratio is 3 or more.  CPU: about 10 s on one core, most of
it fragmenting the 16 Mi device.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nbdcache.swap.blist import BLIST_MAX_ALLOC, SWAPBLK_NONE, Blist  # noqa: E402

SIZES = (16 << 10, 16 << 20)
LIMIT = 3.0


def fragment(bl: Blist, rng: random.Random) -> list[tuple[int, int]]:
    """Fill with random runs, free every other one; return the live runs."""
    runs = []
    while bl.avail >= BLIST_MAX_ALLOC:
        count = rng.randint(1, BLIST_MAX_ALLOC)
        runs.append((bl.alloc(count), count))
    for slot, count in runs[::2]:
        bl.free(slot, count)
    return runs[1::2]


def cycles(bl: Blist, live: list[tuple[int, int]], n: int, rng: random.Random) -> dict:
    """n x (alloc a random size, free a random live run); time each call."""
    t_alloc = t_free = 0
    fails = 0
    visits = bl.nvisits
    clock = time.perf_counter_ns
    for _ in range(n):
        count = rng.randint(1, BLIST_MAX_ALLOC)
        t0 = clock()
        slot = bl.alloc(count)
        t1 = clock()
        t_alloc += t1 - t0
        if slot == SWAPBLK_NONE:
            fails += 1
        else:
            live.append((slot, count))
        i = rng.randrange(len(live))
        live[i], live[-1] = live[-1], live[i]
        slot, count = live.pop()
        t0 = clock()
        bl.free(slot, count)
        t_free += clock() - t0
    return {"alloc_us": t_alloc / n / 1e3, "free_us": t_free / n / 1e3, "fails": fails,
            "visits": (bl.nvisits - visits) / n}


def run(nblocks: int, n: int, seed: int) -> dict:
    rng = random.Random(seed)
    t0 = time.perf_counter()
    bl = Blist(nblocks)
    build = time.perf_counter() - t0
    tree_bytes = sys.getsizeof(bl._leaves) + sum(
        sys.getsizeof(row) for rows in (bl._avail, bl._hint) for row in rows)
    t0 = time.perf_counter()
    live = fragment(bl, rng)
    frag = time.perf_counter() - t0
    occupancy = 1 - bl.avail / nblocks
    cycles(bl, live, max(n // 10, 100), rng)          # warm-up: hints settle
    result = cycles(bl, live, n, rng)
    if nblocks <= 1 << 16:
        bl.check_invariants()                      # cheap here; minutes at 16 Mi
    result.update(nblocks=nblocks, depth=bl.depth, build_s=build, tree_kib=tree_bytes / 2**10,
                  frag_s=frag, occupancy=occupancy)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=20000, help="timed alloc+free cycles")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    print(f"{'slots':>9} {'depth':>5} {'build s':>8} {'tree KiB':>8} {'frag s':>7} "
          f"{'used':>5} {'us/alloc':>8} {'us/free':>7} {'visits':>6} {'fails':>5}")
    results = []
    for nblocks in SIZES:
        r = run(nblocks, args.cycles, args.seed)
        results.append(r)
        print(f"{r['nblocks']:>9} {r['depth']:>5} {r['build_s']:>8.4f} {r['tree_kib']:>8.0f} "
              f"{r['frag_s']:>7.2f} {r['occupancy']:>5.0%} {r['alloc_us']:>8.2f} "
              f"{r['free_us']:>7.2f} {r['visits']:>6.2f} {r['fails']:>5}", flush=True)
    ratio = results[1]["alloc_us"] / results[0]["alloc_us"]
    size = SIZES[1] // SIZES[0]
    verdict = "ok" if ratio < LIMIT else "TOO SLOW"
    print(f"alloc cost ratio {ratio:.2f} for {size}x the slots (limit {LIMIT}): {verdict}")
    return 0 if ratio < LIMIT else 1


if __name__ == "__main__":
    raise SystemExit(main())
