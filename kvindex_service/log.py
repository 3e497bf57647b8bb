"""Logging setup: stdlib ``logging``, one line per record, text or JSON.

Structured fields travel in ``extra={...}``; both formatters print them (``key=value`` in
text mode, object members in JSON mode), so the access log line carries its request id,
route, status and duration either way.

Text mode escapes control characters in every field (:func:`escape_control`): a request
path, a ZMQ topic or a model name is attacker-chosen text, and a raw newline in one would
forge a log line (``GET /x%0A2025-... INFO ...``). JSON mode needs nothing more: JSON
strings escape them already.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any, TextIO

__all__ = ["JsonFormatter", "TextFormatter", "configure_logging", "escape_control"]

# Attributes every LogRecord has; anything else on a record came from ``extra``.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
    "color_message",
}

_HANDLER_NAME = "kvindex"


# C0 controls, DEL, C1 controls (ESC starts ANSI sequences) and the Unicode line/paragraph
# separators some viewers break lines on.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(m: re.Match[str]) -> str:
    c = m.group()
    named = _NAMED.get(c)
    if named is not None:
        return named
    code = ord(c)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_control(value: object) -> str:
    """``str(value)`` with every control character written as a visible escape (``\\n``,
    ``\\x1b``...), so one record is always one line and cannot drive a terminal."""
    text = value if isinstance(value, str) else str(value)
    return _CONTROL.sub(_escape_char, text)


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, the extras, and exc if any."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update(_extras(record))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    """``2025-01-01T00:00:00.123Z INFO logger: message key=value ...``"""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        esc = escape_control
        line = f"{ts}.{int(record.msecs):03d}Z {record.levelname} {esc(record.name)}: {esc(record.getMessage())}"
        extras = _extras(record)
        if extras:
            line += " " + " ".join(f"{esc(k)}={esc(v)}" for k, v in extras.items())
        if record.exc_info:
            # A traceback keeps its lines, each indented, so none can pass for a record.
            tb = self.formatException(record.exc_info)
            line += "".join("\n    " + esc(part) for part in tb.splitlines())
        return line


def configure_logging(level: str = "INFO", json_lines: bool = False, stream: TextIO | None = None) -> None:
    """Install one handler on the root logger (replacing a previous call's) and route
    uvicorn's loggers through it. Called by the CLI, never at import time."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if handler.get_name() == _HANDLER_NAME:
            root.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter())
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True
    # Our own middleware writes the access log (with a request id); silence uvicorn's.
    logging.getLogger("uvicorn.access").disabled = True
