"""The reliability suite's switches and its figures table.

* ``--long`` (or ``NBDCACHE_RELIABILITY=long``) selects the long version: at
  least 1000 crash rounds per mode and bigger loads (``make reliability``).  The
  default, short version runs in ``make test``.
* Every test gets a watchdog (pytest-timeout): 60 s in the short version, so a
  hang is reported as a failure instead of stalling the run; the long version
  scales it with the work.  Tests that time out are counted as hangs.
* Tests append their figures (rounds, units lost, false flush successes,
  errors seen, peak dirty and RSS against their bounds, ...) to a session-wide
  registry through the ``figures`` fixture; ``pytest_terminal_summary`` prints
  them as one table at the end of the run.

This file is a ``conftest`` module, so it takes the name ``conftest`` in
``sys.modules`` once pytest has loaded it; ``from conftest import Server`` in
other test files still works because unknown names are looked up in
``tests/conftest.py``.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

SHORT_TIMEOUT = 60
LONG_TIMEOUT = 4 * 3600

_root: Any = None


def __getattr__(name: str) -> Any:
    """Forward ``from conftest import X`` to tests/conftest.py (see the module doc)."""
    global _root
    if _root is None:
        spec = importlib.util.spec_from_file_location("_nbdcache_tests_conftest",
                                                      HERE.parent / "conftest.py")
        _root = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(_root)
    try:
        return getattr(_root, name)
    except AttributeError:
        raise AttributeError(f"module 'conftest' has no attribute {name!r}") from None


class Figures:
    """Rows of (test, figure, value, bound, verdict), printed at the end of the run."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, str, str]] = []

    def add(self, test: str, figure: str, value: Any, bound: Any = "", ok: bool | None = None
            ) -> None:
        verdict = "" if ok is None else ("ok" if ok else "FAIL")
        self.rows.append((test, figure, str(value), str(bound), verdict))

    def tally(self, test: str, figure: str, ok: bool, note: str = "") -> None:
        """Count one case into a row "n of m" (parametrized tests share one row);
        ``note`` lists the cases that were not ok."""
        for k, r in enumerate(self.rows):
            if r[0] == test and r[1] == figure:
                n, m = (int(x) for x in r[2].split(" ")[0].split("/"))
                notes = r[2].partition(" ")[2]
                break
        else:
            k, n, m, notes = len(self.rows), 0, 0, ""
            self.rows.append(("", "", "", "", ""))
        n, m = n + ok, m + 1
        if not ok and note:
            notes = (notes + " " if notes else "not: ") + note
        self.rows[k] = (test, figure, f"{n}/{m} {notes}".rstrip(), "all", "ok" if n == m else "")


FIGURES = Figures()


def is_long(config: pytest.Config) -> bool:
    return bool(config.getoption("--long", default=False)) or \
        os.environ.get("NBDCACHE_RELIABILITY", "").lower() == "long"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--long", action="store_true", default=False,
                     help="run the long version of tests/reliability (>= 1000 crash rounds "
                          "per mode, bigger loads); also NBDCACHE_RELIABILITY=long")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    timeout = LONG_TIMEOUT if is_long(config) else SHORT_TIMEOUT
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents and \
                item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(timeout))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    rep = outcome.get_result()
    if HERE not in Path(str(item.fspath)).resolve().parents:
        return
    if rep.failed and call.excinfo is not None and "Timeout" in str(call.excinfo.value)[:40]:
        FIGURES.add(item.name, "hang (watchdog fired)", 1, 0, False)


@pytest.fixture(scope="session")
def long_mode(request: pytest.FixtureRequest) -> bool:
    return is_long(request.config)


@pytest.fixture(scope="session")
def figures() -> Figures:
    return FIGURES


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config
                            ) -> None:
    rows = FIGURES.rows
    if not rows:
        return
    tr = terminalreporter
    mode = "long" if is_long(config) else "short"
    hangs = sum(1 for r in rows if r[1].startswith("hang"))
    head = ("test", "figure", "value", "bound", "")
    width_cap = (44, 48, 60, 10, 4)
    widths = [min(max(len(r[i]) for r in rows + [head]), width_cap[i]) for i in range(5)]
    tr.write_sep("=", f"reliability figures ({mode} version; hangs: {hangs})")
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    tr.write_line(fmt.format(*head).rstrip())
    for r in rows:
        value = textwrap.wrap(r[2], widths[2]) or [""]
        tr.write_line(fmt.format(r[0][:widths[0]], r[1][:widths[1]], value[0], r[3], r[4])
                      .rstrip())
        for more in value[1:]:
            tr.write_line(fmt.format("", "", more, "", "").rstrip())
