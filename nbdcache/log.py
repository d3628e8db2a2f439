"""The one place structlog is configured.

Events have stable dotted names (``engine.start``, ``flush.error``,
``bd_wait.block``, ``stats``) and are emitted on state changes; per-request
events exist only at debug level.  Output is JSON lines (or a console format)
to a file or stderr.  ``configure`` may be called again (tests, the CLI); the
last call wins.
"""

from __future__ import annotations

import logging
import sys
from typing import IO, Any

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}
_stream: IO[str] | None = None


def configure(level: str = "info", file: str | None = None, fmt: str = "json") -> None:
    """Route every nbdcache event to ``file`` (appending) or stderr, at ``level`` and above."""
    global _stream
    if _stream is not None and _stream not in (sys.stderr, sys.stdout):
        _stream.close()
    _stream = open(file, "a", buffering=1) if file else sys.stderr
    renderer: Any = (structlog.processors.JSONRenderer() if fmt == "json"
                     else structlog.dev.ConsoleRenderer(colors=False))
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=_stream),
        cache_logger_on_first_use=False,
    )


def get(name: str) -> Any:
    """A logger bound to ``component=name``."""
    return structlog.get_logger().bind(component=name)
