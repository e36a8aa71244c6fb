"""Logging setup: plain or JSON lines. Prompts never appear; callers log hashes."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class PlainFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__()
        self._second = -1
        self._clock = ""

    def _hms(self, created: float) -> str:
        # The account stage logs a line per job: the clock text is made once a second, not per line.
        second = int(created)
        if second != self._second:
            self._second, self._clock = second, time.strftime("%H:%M:%S", time.localtime(created))
        return self._clock

    def format(self, record: logging.LogRecord) -> str:
        base = f"{self._hms(record.created)} {record.levelname:<7} {record.name}: {record.getMessage()}"
        extra = " ".join([f"{k}={v}" for k, v in record.__dict__.items() if k not in _STANDARD])
        if extra:
            base += " " + extra
        if record.exc_info:
            base += "\n" + self.formatException(record.exc_info)
        return base


def setup_logging(level: str = "INFO", *, json_lines: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else PlainFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    quiet_libraries()


def quiet_libraries() -> None:
    """Library loggers stay at WARNING whatever farebox's level: at DEBUG, aiormq logs whole AMQP
    frames, and a frame is a job body with its prompt."""
    for noisy in ("aio_pika", "aiormq", "httpx", "httpcore", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
