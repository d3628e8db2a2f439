"""Process crash: nothing acknowledged is lost when nbdcache is SIGKILLed.

Each round starts nbdcache (file backend, a randomly drawn cache geometry) on the
same image, first reads the whole disk back and checks it against what the
previous round acknowledged (``reliakit.History.check``), then runs random
writes (4 KiB to 1 MiB, some byte-unaligned), FUA writes, WRITE_ZEROES, TRIM,
flushes and reads from four connections (libnbd aio, four requests in flight
each) and SIGKILLs the server's process group at a random moment.  The image
file lives in the host's page cache, so a process crash loses exactly what
nbdcache held in RAM: the check finds any acknowledged-and-flushed (or FUA)
unit that the cache failed to write back, wrote to the wrong place, or tore.

Short: 20 rounds.  Long (--long): 1000 rounds.
"""

from __future__ import annotations

import functools
import random
import time
from pathlib import Path

from reliakit import (
    KiB, MiB, Stack, crash_rounds, make_image, nbdcache_yaml, report_crash, seed_from_env,
)

DISK = 32 * MiB


def random_geometry(rng: random.Random) -> dict:
    bs = rng.choice([4 * KiB, 16 * KiB, 64 * KiB, 256 * KiB])
    return {"ram": max(16 * bs, rng.choice([2, 4, 8, 16]) * MiB), "block_size": bs,
            "daemon_interval": rng.choice([0.05, 0.2, 1.0]), "readahead": rng.choice([0, 4])}


def start_nbdcache(serve, rng: random.Random, backend: dict, r: int) -> Stack:
    return Stack(serve(nbdcache_yaml(backend=backend, cache=random_geometry(rng)),
                       name="crash"))


def test_crash_process_loses_nothing_acknowledged(serve, tmp_path: Path, long_mode, figures):
    rounds = 1000 if long_mode else 20
    seed = seed_from_env()
    rng = random.Random(seed)
    img = tmp_path / "disk.img"
    make_image(img, DISK)
    t0 = time.monotonic()
    t = crash_rounds(functools.partial(start_nbdcache, serve, rng, {"path": str(img)}),
                     DISK, rounds, rng, seed)
    report_crash(figures, "crash: process (SIGKILL)", t, rounds, seed, time.monotonic() - t0)
    assert not t.failure, t.failure
    assert t.flushes > 0 and t.durable > 0, "the workload never made data durable"


def test_crash_process_negative_control_memory_backend(serve, figures):
    """The same rounds on the volatile memory backend (its flush is a no-op) MUST be
    caught losing data: proof that the check can fail end to end."""
    seed = seed_from_env()
    rng = random.Random(seed)
    t = crash_rounds(functools.partial(start_nbdcache, serve, rng,
                                       {"type": "memory", "size": DISK}),
                     DISK, 4, rng, seed, kill_window=(0.3, 0.6))
    figures.add("crash: negative control (memory backend)", "units lost (must be > 0)",
                t.lost, "> 0", t.lost > 0)
    assert t.lost > 0, "a volatile backend lost nothing: the check cannot fail"
