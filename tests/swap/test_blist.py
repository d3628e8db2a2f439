"""nbdcache.swap.blist: the radix-tree slot allocator against a brute-force bitmap.

The model is a bytearray of b"1" (free) / b"0" (allocated), one byte per slot,
so "the first free run of k slots at or after c" is ``model.find(b"1" * k, c)``.
The allocator's contract is exact next-fit: the lowest start >= cursor, else
the lowest start >= 0, and failure only when the model has no run at all.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from nbdcache.swap.blist import (
    BLIST_MAX_ALLOC, SWAPBLK_NONE, Blist, BlistError, BlistFreeError, BlistInvariantError, main,
)

ROOT = Path(__file__).resolve().parents[2]

SIZES = st.one_of(
    st.integers(1, 200),
    st.sampled_from([63, 64, 65, 127, 129, 1000, 1023, 1024, 1025, 1087, 2047, 3000, 4097,
                     16384 + 70]),
)


def model_alloc(model: bytearray, count: int, cursor: int) -> int:
    run = b"1" * count
    slot = model.find(run, cursor)
    if slot < 0 and cursor:
        slot = model.find(run, 0)
    return slot


class BlistModel(RuleBasedStateMachine):
    @initialize(n=SIZES, full=st.booleans())
    def setup(self, n: int, full: bool) -> None:
        self.n = n
        self.bl = Blist(n)
        self.model = bytearray(b"1" * n)
        self.cursor = 0
        self.runs: list[tuple[int, int]] = []     # allocated pieces we may free
        if full:                # frees then carve holes into a full device: tight hints
            assert self.bl.fill(0, n) == n
            self._take(0, n)

    def _take(self, slot: int, count: int) -> None:
        assert 0 <= slot and slot + count <= self.n, (slot, count)
        assert self.model[slot:slot + count] == b"1" * count, "overlaps an allocated slot"
        self.model[slot:slot + count] = b"0" * count
        self.runs.append((slot, count))

    def _release(self, slot: int, n: int) -> None:
        """Free [slot, slot+n) in both, and cut it out of the pieces we own."""
        self.bl.free(slot, n)
        assert self.model[slot:slot + n] == b"0" * n
        self.model[slot:slot + n] = b"1" * n
        end = slot + n
        pieces = []
        for s, c in self.runs:
            if s + c <= slot or s >= end:
                pieces.append((s, c))
                continue
            if s < slot:
                pieces.append((s, slot - s))
            if s + c > end:
                pieces.append((end, s + c - end))
        self.runs = pieces

    @rule(count=st.integers(1, BLIST_MAX_ALLOC))
    def alloc(self, count: int) -> None:
        want = model_alloc(self.model, count, self.cursor)
        got = self.bl.alloc(count)
        assert got == (want if want >= 0 else SWAPBLK_NONE), (count, self.cursor, want, got)
        # coverage, shown by --hypothesis-show-statistics
        if got < 0:
            event("alloc: no run (device too full or fragmented)")
        elif got // 64 != (got + count - 1) // 64:
            event("alloc: run crosses a leaf word")
        if 0 < self.cursor and 0 <= got < self.cursor:
            event("alloc: wrapped past the cursor")
        if got >= 0:
            self._take(got, count)
            self.cursor = got + count if got + count < self.n else 0

    @rule(count=st.integers(1, BLIST_MAX_ALLOC), times=st.integers(1, 80))
    def alloc_many(self, count: int, times: int) -> None:
        for _ in range(times):
            self.alloc(count)
            if self.model.find(b"1" * count) < 0:
                break

    @precondition(lambda self: self.runs)
    @rule(data=st.data())
    def free(self, data) -> None:
        """Free an allocated run, or a piece of one (splitting it)."""
        slot, count = self.runs[data.draw(st.integers(0, len(self.runs) - 1))]
        off = data.draw(st.integers(0, count - 1))
        n = data.draw(st.one_of(st.integers(1, min(count - off, 40)),   # keeps hints tight
                                st.integers(1, count - off)))
        self._release(slot + off, n)

    @precondition(lambda self: len(self.runs) > 1)
    @rule(data=st.data())
    def free_adjacent(self, data) -> None:
        """Free every run inside a window at once, when they tile it (long frees, many leaves)."""
        runs = sorted(self.runs)
        i = data.draw(st.integers(0, len(runs) - 1))
        j = i
        while j + 1 < len(runs) and runs[j + 1][0] == runs[j][0] + runs[j][1]:
            j += 1
        slot = runs[i][0]
        end = runs[j][0] + runs[j][1]
        self._release(slot, end - slot)

    @rule(data=st.data(), unit=st.sampled_from([64, 1024, 16384]))
    def free_at_boundary(self, data, unit: int) -> None:
        """Free allocated slots next to or across a leaf / level-1 / level-2 boundary.

        The delicate case: the run grows backwards into a node whose hint a
        failed search has made tight.
        """
        if unit >= self.n:
            return
        b = data.draw(st.integers(1, (self.n - 1) // unit)) * unit
        lo = self.model.rfind(b"1", 0, b) + 1          # allocated stretch around b
        hi = self.model.find(b"1", b)
        hi = self.n if hi < 0 else hi
        if lo == hi:
            return
        first, last = max(lo, b - 40), min(b, hi - 1)
        start = data.draw(st.one_of(st.just(last), st.integers(first, last)))
        top = min(hi, max(b, start) + 40)
        end = data.draw(st.one_of(st.just(max(b, start + 1)), st.integers(start + 1, top)))
        self._release(start, end - start)

    @rule(data=st.data())
    def fill(self, data) -> None:
        slot = data.draw(st.one_of(
            st.integers(0, self.n - 1),
            st.builds(lambda k, d: min(self.n - 1, max(0, k * 1024 + d)),
                      st.integers(0, self.n // 1024), st.integers(-40, 40))))
        count = data.draw(st.integers(1, min(self.n - slot, 300)))
        segment = self.model[slot:slot + count]
        assert self.bl.fill(slot, count) == segment.count(b"1")
        pos = 0
        while (pos := segment.find(b"1", pos)) >= 0:      # the newly allocated pieces
            stop = segment.find(b"0", pos)
            stop = count if stop < 0 else stop
            self._take(slot + pos, stop - pos)
            pos = stop

    @precondition(lambda self: b"1" in self.model)
    @rule(data=st.data())
    def double_free(self, data) -> None:
        """A range holding at least one free slot is refused, and nothing changes."""
        free_slots = [i for i, c in enumerate(self.model) if c == ord("1")]
        hit = data.draw(st.sampled_from(free_slots))
        slot = data.draw(st.integers(max(0, hit - 40), hit))
        count = data.draw(st.integers(hit - slot + 1, min(self.n - slot, hit - slot + 40)))
        before = self.bl.free_bitmap(), self.bl.avail
        with pytest.raises(BlistFreeError):
            self.bl.free(slot, count)
        assert (self.bl.free_bitmap(), self.bl.avail) == before

    @invariant()
    def matches_model(self) -> None:
        if not hasattr(self, "bl"):
            return
        self.bl.check_invariants()
        assert self.bl.free_bitmap() == int(self.model[::-1], 2)
        assert self.bl.avail == self.model.count(b"1")
        assert self.bl.cursor == self.cursor


TestBlistModel = BlistModel.TestCase
TestBlistModel.settings = settings(max_examples=300, stateful_step_count=60, deadline=None,
                                   suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------------ edge cases

def test_alloc_at_the_very_end():
    bl = Blist(100)
    assert bl.fill(0, 90) == 90
    assert bl.alloc(10) == 90
    assert bl.cursor == 0                       # wrapped
    assert bl.alloc(1) == SWAPBLK_NONE
    assert bl.avail == 0
    bl.check_invariants()


def test_last_slot_of_a_device_that_is_a_multiple_of_64():
    bl = Blist(128)
    bl.fill(0, 127)
    assert bl.alloc(2) == SWAPBLK_NONE
    assert bl.alloc(1) == 127
    bl.check_invariants()


@pytest.mark.parametrize("n, at", [(200, 60), (2048, 1020), (20000, 16380)])
def test_run_across_leaf_and_meta_boundaries(n, at):
    """1020..1027 crosses a level-1 node; 16380..16387 crosses the level-2 node too."""
    bl = Blist(n)
    bl.fill(0, at)
    assert bl.alloc(8) == at
    bl.check_invariants()
    bl.free(at, 8)
    bl.check_invariants()
    bl.cursor = 0
    assert bl.alloc(32) == at


def test_free_across_leaf_boundaries_then_hint_lets_run_be_found():
    bl = Blist(4096)
    bl.fill(0, 4096)
    bl.free(1000, 50)                           # crosses 1024: two level-1 nodes
    bl.check_invariants()
    assert bl.alloc(32) == 1000
    bl.free(100, 1)
    bl.free(102, 1)
    bl.free(101, 1)                             # merges 100..102 into a run of 3
    bl.check_invariants()
    assert bl.alloc(3) == 1032                  # next fit: the rest of 1000..1049 first
    bl.fill(1035, 15)
    assert bl.alloc(4) == SWAPBLK_NONE
    assert bl.alloc(3) == 100                   # wrapped to slot 0, found the merged run


def test_free_lengthens_a_run_that_starts_in_the_previous_node():
    bl = Blist(4096)
    bl.fill(0, 4096)
    bl.free(1020, 4)                            # 1020..1023, the end of level-1 node 0
    assert bl.alloc(5) == SWAPBLK_NONE
    bl.free(1024, 4)                            # now 1020..1027, still starting in node 0
    bl.check_invariants()
    assert bl.alloc(8) == 1020


def test_long_free_and_fill():
    bl = Blist(70000)
    assert bl.fill(5, 69000) == 69000
    bl.check_invariants()
    assert bl.fill(0, 70000) == 1000
    assert bl.avail == 0
    bl.free(1, 69998)
    bl.check_invariants()
    assert bl.avail == 69998


def test_double_free_raises_and_changes_nothing():
    bl = Blist(300)
    a = bl.alloc(10)
    bl.free(a, 10)
    snapshot = bl.free_bitmap(), bl.avail
    with pytest.raises(BlistFreeError, match="freeing free slot 0"):
        bl.free(a, 10)
    b = bl.alloc(5)
    assert b == 10                              # next fit, after the first run
    with pytest.raises(BlistFreeError, match="freeing free slot 15"):
        bl.free(b, 6)                           # one slot too many
    assert bl.avail == snapshot[1] - 5
    bl.check_invariants()


@pytest.mark.parametrize("call", [
    lambda bl: bl.alloc(0), lambda bl: bl.alloc(33), lambda bl: bl.free(-1, 1),
    lambda bl: bl.free(99, 2), lambda bl: bl.free(0, 0), lambda bl: bl.fill(100, 1),
    lambda bl: bl.is_free(100),
])
def test_bad_arguments(call):
    bl = Blist(100)
    bl.fill(0, 100)
    with pytest.raises(BlistError):
        call(bl)


@pytest.mark.parametrize("n", [0, -3, 2.5, True])
def test_bad_size(n):
    with pytest.raises(BlistError):
        Blist(n)


def test_checker_catches_a_hint_that_hides_free_space():
    bl = Blist(5000)
    bl.fill(0, 5000)
    bl.free(2040, 20)       # starts in level-1 node 1 [1024, 2048), ends in node 2
    bl.check_invariants()
    bl._hint[1][1], bl._hint[1][2] = 20, 12     # exact: 2040..2059 and 2048..2059
    bl.check_invariants()
    bl._hint[1][2] = 11
    with pytest.raises(BlistInvariantError, match="bighint 11 < 12"):
        bl.check_invariants()
    bl._hint[1][2] = 32                         # overestimates are allowed
    bl._hint[1][1] = 19
    with pytest.raises(BlistInvariantError, match="bighint 19 < 20"):
        bl.check_invariants()


def test_checker_catches_a_bad_count():
    bl = Blist(3000)
    bl._avail[1][0] -= 1
    with pytest.raises(BlistInvariantError, match="avail 1023 != 1024"):
        bl.check_invariants()


def test_sixteen_mi_tree_is_cheap_and_depth_is_logarithmic():
    bl = Blist(16 << 20)
    assert (bl.depth, Blist(16 << 10).depth, Blist(64).depth) == (5, 2, 1)
    assert bl.avail == len(bl) == 16 << 20
    assert len(bl._leaves) == (16 << 20) // 64
    assert bl.alloc(32) == 0


def test_hints_prune_the_search():
    """Counters, not timing: a request no node can satisfy visits few nodes."""
    n = 1 << 20
    bl = Blist(n)
    bl.fill(0, n)
    for slot in range(0, n, 4096):              # 256 isolated free slots
        bl.free(slot, 1)
    bl.check_invariants()
    before = bl.nvisits
    assert bl.alloc(2) == SWAPBLK_NONE          # every hint says 1: root rejects at once
    assert bl.nvisits - before == 0
    bl.free(n - 3, 2)                           # the only run of 2, at the far end
    bl.check_invariants()
    before = bl.nvisits
    assert bl.alloc(2) == n - 3
    assert bl.nvisits - before == bl.depth      # straight down one path


def test_dump_is_compact():
    bl = Blist(5000)
    bl.fill(0, 3000)
    bl.free(100, 3)
    text = bl.dump()
    lines = [line.strip() for line in text.splitlines()]
    assert "meta [0, 1024) avail=3 bighint=3" in lines
    assert "leaf [64, 128) 0000007000000000" in lines       # slots 100..102, 1 = free
    assert "[128, 1024) all allocated" in lines
    assert "[3072, 5000) all free" in lines
    assert len(lines) == 12


# ---------------------------------------------------------------- the shell

def run_shell(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nbdcache.swap.blist", *args], input=script,
                          capture_output=True, text=True, cwd=ROOT, timeout=60)


def test_shell_scripted_session():
    r = run_shell("a 5\na 40\na 32\nf 0 5\nf 0 5\nl 0 3\np\nc\nbogus\nf x 1\n\nq\na 1\n", "100")
    out = r.stdout.splitlines()
    assert out[0].startswith("BLIST representing 100 slots")
    assert out[1] == "0"
    assert out[2] == "5"                        # "a 40" is rejected (max 32), so 32 comes next
    assert out[3] == "freed [0, 5)"
    assert out[4] == "filled [0, 3): 3 were free"
    assert any(line.startswith("BLIST nblocks=100 avail=") for line in out)
    assert out[-1] == "ok"                      # "a 1" after q never ran
    err = r.stderr
    assert "alloc count must be 1..32" in err
    assert "freeing free slot 0" in err
    assert "unknown command 'bogus'" in err
    assert "expected integers for SLOT N" in err
    assert r.returncode == 1


def test_shell_clean_run_exits_zero_and_handles_eof():
    r = run_shell("a 3\nc\n", "0x40")
    assert r.stdout.splitlines()[1:] == ["0", "ok"]
    assert r.returncode == 0 and r.stderr == ""


def test_shell_reports_failed_alloc_and_bad_size():
    r = run_shell("a 8\na 8\n", "10")
    assert r.stdout.splitlines()[1:] == ["0", "-1 (no free run of 8)"]
    assert run_shell("", "zero").returncode == 2
    assert "usage" in run_shell("", "0").stderr


def test_shell_main_in_process(capsys):
    import io
    status = main(["64"], stdin=io.StringIO("a 64\nh\n"))
    assert status == 1                          # 64 > BLIST_MAX_ALLOC
    out = capsys.readouterr()
    assert "commands:" in out.out
