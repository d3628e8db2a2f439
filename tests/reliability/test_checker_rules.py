"""The crash checker's rule, on hand-made histories (no server): what it must accept and
what it must report, so that a green crash run means something."""

from __future__ import annotations

from reliakit import UNIT, History, pattern_bytes, unit_pattern

SIZE = 16 * UNIT


def hist() -> History:
    return History(bytes(SIZE), epoch=7)


def op(h: History, kind: str, off: int = 0, n: int = UNIT, fua: bool = False, acked=True):
    o = h.new(kind, off, n, fua)
    h.sent(o)
    if acked:
        h.done(o, 0)
    return o


def disk(*writes) -> bytearray:
    d = bytearray(SIZE)
    for o in writes:
        d[o.offset:o.end] = pattern_bytes(o.wid, o.offset, o.length) if o.kind == "write" \
            else bytes(o.length)
    return d


def test_acked_write_without_flush_may_vanish():
    h = hist()
    op(h, "write", 0, 4 * UNIT)
    assert h.check(bytes(SIZE)).lost_units == 0


def test_flushed_write_must_survive():
    h = hist()
    w = op(h, "write", 0, 4 * UNIT)
    op(h, "flush")
    assert h.check(bytes(SIZE)).lost_units == 4
    assert h.check(disk(w)).lost_units == 0


def test_fua_write_must_survive_and_in_flight_flush_proves_nothing():
    h = hist()
    f = op(h, "write", 0, UNIT, fua=True)
    w = op(h, "write", UNIT, UNIT)
    op(h, "flush", acked=False)
    assert h.check(disk(w)).lost_units == 1
    assert h.check(disk(f)).lost_units == 0


def test_write_issued_before_flush_reply_may_or_may_not_land():
    h = hist()
    a = op(h, "write", 0, UNIT)
    fl = op(h, "flush", acked=False)
    b = op(h, "write", 0, UNIT)            # issued after a's ack, before the flush reply
    h.done(fl, 0)
    assert h.check(disk(a)).lost_units == 0
    assert h.check(disk(b)).lost_units == 0
    assert h.check(bytes(SIZE)).lost_units == 1


def test_overwritten_value_is_not_acceptable_after_a_flush():
    h = hist()
    a = op(h, "write", 0, UNIT)
    b = op(h, "write", 0, UNIT)
    op(h, "flush")
    assert h.check(disk(b)).lost_units == 0
    assert h.check(disk(a)).lost_units == 1


def test_concurrent_writes_either_may_win():
    h = hist()
    a = h.new("write", 0, UNIT)
    b = h.new("write", 0, UNIT)
    h.sent(a), h.sent(b)
    h.done(b, 0), h.done(a, 0)
    op(h, "flush")
    assert h.check(disk(a)).lost_units == 0
    assert h.check(disk(b)).lost_units == 0


def test_torn_foreign_and_misplaced_units_are_reported():
    h = hist()
    w = op(h, "write", 0, 2 * UNIT)
    op(h, "flush")
    d = disk(w)
    d[100:200] = bytes(100)                               # torn
    d[UNIT:2 * UNIT] = unit_pattern(w.wid, 5)             # right write, wrong place
    d[8 * UNIT:9 * UNIT] = unit_pattern(w.wid, 8)         # foreign data in an untouched unit
    res = h.check(d)
    assert res.lost_units == 3, res.lost


def test_zeroes_and_trim():
    h = hist()
    w = op(h, "write", 0, 4 * UNIT)
    op(h, "flush")
    op(h, "zero", 0, 2 * UNIT)
    t = op(h, "trim", 2 * UNIT, 2 * UNIT)
    op(h, "flush")
    d = disk(w)
    assert h.check(d).lost_units == 2                     # zeroed units must read zero
    d[:2 * UNIT] = bytes(2 * UNIT)
    d[2 * UNIT:4 * UNIT] = b"\xa5" * (2 * UNIT)           # trimmed: anything goes
    assert h.check(d).lost_units == 0
    op(h, "write", 2 * UNIT, UNIT, fua=True)              # rewritten durably: exempt no more
    assert h.check(d).lost_units == 1
    assert t.complete is not None


def test_unaligned_write_is_checked_byte_by_byte():
    h = hist()
    w = op(h, "write", 100, 700)
    op(h, "flush")
    d = disk(w)
    assert h.check(d).lost_units == 0
    d[99] = 1                                             # before the write: base (zero)
    assert h.check(d).lost_units == 1
    d[99] = 0
    d[672] = 0                              # a byte of the write (its id's low byte) lost
    assert h.check(d).lost_units == 1
