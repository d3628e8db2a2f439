"""``nbdcache plot``: a run's JSON-lines log drawn against its watermarks.

Theory of operation
-------------------
Every ``log.stats_interval`` the engine logs a ``stats`` event carrying every
statistic as a field, with an ISO ``timestamp``; the log of a run is thus a
time series.  :func:`read_samples` keeps the lines whose ``event`` is
``stats`` (anything else, including lines that are not JSON, is skipped) and
:func:`plot` draws six panels, the time axis in seconds since the first sample:

1. ``bufspace`` against ``lobufspace`` / ``hibufspace`` (and ``maxbufspace``);
2. ``dirtykvaspace + runningbufspace`` against ``lodirtybufspace``, mid1, mid2
   (``nbdcache.core.bufinit.midpoints``) and ``hidirtybufspace``;
3. ``runningbufspace`` against ``hirunningspace`` and 4/6 of it;
4. ``swap_slots_used`` against the almost-full marks (free slots below
   ``swap_lowat`` sets it, above ``swap_hiwat`` clears it), or "swap off";
5. throughput per interval: write-back MiB/s from ``writeback_bytes``, guest
   reads/s and writes/s from ``reads`` / ``writes``;
6. hit ratio per interval, from the deltas of ``hits`` and ``misses``.

Watermarks are read from each sample, so a live ``nbdcache set`` shows as a
step.  A rate is undefined (a gap) across an interval where a counter went
down (the log holds two runs) or time did not advance.

Drawing uses matplotlib's object API with the Agg canvas: no pyplot, no global
backend switch, safe in any process.  Nothing here touches the server.
"""

from __future__ import annotations

import json
import math
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable

from nbdcache.core.bufinit import midpoints

MiB = 1024 * 1024
NAN = math.nan
LEGEND = {"loc": "upper left", "bbox_to_anchor": (1.08, 1.0), "fontsize": "small"}


class PlotError(ValueError):
    """The log cannot be plotted (missing, or fewer than two stats samples)."""


def read_samples(lines: Iterable[str]) -> list[tuple[float, dict[str, Any]]]:
    """``[(seconds since the first sample, stats event), ...]`` from JSON log lines."""
    raw: list[tuple[float | None, dict[str, Any]]] = []
    for line in lines:
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if not isinstance(ev, dict) or ev.get("event") != "stats":
            continue
        raw.append((_when(ev), ev))
    if not raw:
        return []
    if all(t is not None for t, _ in raw):
        t0 = raw[0][0]
        return [(t - t0, ev) for t, ev in raw]          # type: ignore[operator]
    # No timestamps: fall back on the engine's uptime (one run only).
    up = [float(ev.get("uptime", i)) for i, (_, ev) in enumerate(raw)]
    return [(u - up[0], ev) for u, (_, ev) in zip(up, raw)]


def _when(ev: dict[str, Any]) -> float | None:
    ts = ev.get("timestamp")
    if not isinstance(ts, str):
        return None
    try:
        return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def load(log_path: str | Path) -> list[tuple[float, dict[str, Any]]]:
    """The samples of the log at ``log_path``; PlotError if fewer than two."""
    path = Path(log_path)
    try:
        with path.open(encoding="utf-8", errors="replace") as f:
            samples = read_samples(f)
    except OSError as e:
        raise PlotError(f"{path}: cannot read the log: {e.strerror or e}") from None
    if len(samples) < 2:
        raise PlotError(f"{path}: {len(samples)} `stats` sample(s), at least 2 are needed "
                        "(set log.stats_interval > 0 and let the server run longer than it)")
    return samples


# --------------------------------------------------------------------------- series

def _num(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else NAN


def column(samples: list[tuple[float, dict[str, Any]]], name: str, scale: float = 1.0
           ) -> list[float]:
    return [_num(ev.get(name)) / scale for _, ev in samples]


def rates(samples: list[tuple[float, dict[str, Any]]], name: str, scale: float = 1.0
          ) -> list[float]:
    """Per-second rate of counter ``name`` over each interval (first point NaN)."""
    out = [NAN]
    for (t0, a), (t1, b) in zip(samples, samples[1:]):
        d, dt = _num(b.get(name)) - _num(a.get(name)), t1 - t0
        out.append(d / dt / scale if dt > 0 and d >= 0 else NAN)
    return out


def interval_hit_ratio(samples: list[tuple[float, dict[str, Any]]]) -> list[float]:
    out = [NAN]
    for (_, a), (_, b) in zip(samples, samples[1:]):
        dh = _num(b.get("hits")) - _num(a.get("hits"))
        dm = _num(b.get("misses")) - _num(a.get("misses"))
        out.append(dh / (dh + dm) if dh >= 0 and dm >= 0 and dh + dm > 0 else NAN)
    return out


def dirty_marks(samples: list[tuple[float, dict[str, Any]]]) -> dict[str, list[float]]:
    """lodirtybufspace, mid1, mid2, hidirtybufspace of every sample, in MiB."""
    out: dict[str, list[float]] = {"lodirtybufspace": [], "mid1": [], "mid2": [],
                                   "hidirtybufspace": []}
    for _, ev in samples:
        lo, hi = ev.get("lodirtybufspace"), ev.get("hidirtybufspace")
        if isinstance(lo, int) and isinstance(hi, int):
            m1, m2 = midpoints({"lodirtybufspace": lo, "hidirtybufspace": hi})
            vals = (lo, m1, m2, hi)
        else:
            vals = (NAN,) * 4
        for k, v in zip(out, vals):
            out[k].append(v / MiB)
    return out


def has_swap(samples: list[tuple[float, dict[str, Any]]]) -> bool:
    return any(isinstance(ev.get("swap_slots_used"), (int, float)) for _, ev in samples)


# --------------------------------------------------------------------------- drawing

def plot(log_path: str | Path, out_png: str | Path) -> Path:
    """Draw the log at ``log_path`` into the PNG ``out_png``; return its path.

    Raises PlotError when the log is unreadable or has fewer than two stats samples.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    samples = load(log_path)
    t = [s for s, _ in samples]
    fig = Figure(figsize=(13, 15), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(6, 1, sharex=True)
    fig.suptitle(f"{Path(log_path).name}: {len(samples)} samples over {t[-1]:.1f} s")

    ax = axes[0]
    ax.plot(t, column(samples, "bufspace", MiB), label="bufspace", lw=2)
    ax.plot(t, column(samples, "hibufspace", MiB), "--", label="hibufspace")
    ax.plot(t, column(samples, "lobufspace", MiB), "--", label="lobufspace")
    ax.plot(t, column(samples, "maxbufspace", MiB), ":", label="maxbufspace")
    _finish(ax, "buffer space", "MiB")

    ax = axes[1]
    total = [a + b for a, b in zip(column(samples, "dirtykvaspace", MiB),
                                   column(samples, "runningbufspace", MiB))]
    ax.plot(t, total, label="dirtykvaspace + runningbufspace", lw=2)
    for name, series in dirty_marks(samples).items():
        ax.plot(t, series, "--", label=name)
    _finish(ax, "dirty + running (bd_heatup / bd_wait)", "MiB")

    ax = axes[2]
    ax.plot(t, column(samples, "runningbufspace", MiB), label="runningbufspace", lw=2)
    hirun = column(samples, "hirunningspace", MiB)
    ax.plot(t, hirun, "--", label="hirunningspace")
    ax.plot(t, [v * 4 / 6 for v in hirun], "--", label="4/6 hirunningspace (daemons pause)")
    _finish(ax, "write-back in flight", "MiB")

    _draw_swap(axes[3], t, samples)

    ax = axes[4]
    ax.plot(t, rates(samples, "writeback_bytes", MiB), label="write-back MiB/s", lw=2)
    ax.set_ylabel("MiB/s")
    ops = ax.twinx()
    ops.plot(t, rates(samples, "reads"), ":", color="tab:green", label="reads/s")
    ops.plot(t, rates(samples, "writes"), ":", color="tab:red", label="writes/s")
    ops.set_ylabel("requests/s")
    lines = ax.get_lines() + ops.get_lines()
    ax.legend(lines, [ln.get_label() for ln in lines], **LEGEND)
    ax.set_title("throughput per interval", loc="left")
    ax.grid(True, alpha=0.3)

    ax = axes[5]
    ax.plot(t, interval_hit_ratio(samples), marker=".", label="hits / (hits + misses)")
    ax.set_ylim(-0.05, 1.05)
    _finish(ax, "hit ratio per interval", "ratio")
    ax.set_xlabel("seconds since the first sample")

    out = Path(out_png)
    fig.savefig(out, dpi=80)
    return out


def _draw_swap(ax: Any, t: list[float], samples: list[tuple[float, dict[str, Any]]]) -> None:
    if not has_swap(samples):
        ax.text(0.5, 0.5, "swap off", ha="center", va="center", transform=ax.transAxes,
                fontsize="large", color="grey")
        ax.set_yticks([])
        ax.set_title("swap slots", loc="left")
        return
    ax.plot(t, column(samples, "swap_slots_used"), label="swap_slots_used", lw=2)
    total = column(samples, "swap_slots_total")
    ax.plot(t, total, ":", label="swap_slots_total")
    lowat, hiwat = column(samples, "swap_lowat"), column(samples, "swap_hiwat")
    if not all(math.isnan(v) for v in lowat):
        ax.plot(t, [a - b for a, b in zip(total, lowat)], "--",
                label="almost full above (total - swap_lowat)")
        ax.plot(t, [a - b for a, b in zip(total, hiwat)], "--",
                label="clears below (total - swap_hiwat)")
    full = column(samples, "swap_almost_full")
    for i in range(1, len(t)):
        if full[i - 1] == 1:
            ax.axvspan(t[i - 1], t[i], color="tab:orange", alpha=0.15, lw=0)
    _finish(ax, "swap slots (shaded: swap_almost_full)", "slots")


def _finish(ax: Any, title: str, ylabel: str) -> None:
    ax.set_title(title, loc="left")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(**LEGEND)
