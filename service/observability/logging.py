"""Structured one-line logs (JSON objects) that carry the request id of the request being served.

The doors set `request_id_var` when a request arrives, so any log line written while serving it
(adapter, engine, error handler) is tagged without passing the id around by hand.
"""
from __future__ import annotations

import contextvars
import logging
import os
import sys
import threading
import time

import orjson

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

ACCESS_LOGGER = "detserve.access"

# LogRecord attributes that are not user-supplied `extra=` fields.
_RESERVED = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "color_message"}


def new_request_id() -> str:
    """32 random hex digits, the shape uuid4().hex had, at a quarter of its cost (5.4 -> 1.5 us on
    the 2-core VM): most load clients send no X-Request-ID, so every request makes one."""
    return os.urandom(16).hex()


def clean_request_id(value: str | None) -> str:
    """The client's id when it is printable and short, else a fresh one (ids end up in logs and headers)."""
    if value and len(value) <= 128 and value.isprintable() and value.isascii():
        return value
    return new_request_id()


class JsonLineFormatter(logging.Formatter):
    """`{"ts","level","logger","msg","request_id",...extra}` on one line; tracebacks stay on that line too."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None) or request_id_var.get()
        if request_id:
            out["request_id"] = request_id
        for key, value in vars(record).items():
            if key not in _RESERVED and key not in out and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


class BatchedLineHandler(logging.StreamHandler):
    """A StreamHandler that writes its lines in batches: at most every `interval_s`, at once for
    warnings and errors, and when `max_bytes` are pending. At info level every request writes an
    access line, and a write + flush syscall per line was a cost of its own on the request path."""

    def __init__(self, stream=None, interval_s: float = 0.1, max_bytes: int = 64 * 1024):
        super().__init__(stream)
        self.interval_s, self.max_bytes = interval_s, max_bytes
        self._pending: list[str] = []
        self._pending_bytes = 0
        self._stop = threading.Event()
        self._flusher = threading.Thread(target=self._flush_periodically, name="log-flush", daemon=True)
        self._flusher.start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:  # noqa: BLE001 - logging must never raise into the caller
            self.handleError(record)
            return
        with self.lock:
            self._pending.append(line)
            self._pending_bytes += len(line) + 1
            urgent = record.levelno >= logging.WARNING or self._pending_bytes >= self.max_bytes
        if urgent:
            self.flush()

    def flush(self) -> None:
        with self.lock:
            if not self._pending:
                return
            text = "\n".join(self._pending) + "\n"
            self._pending.clear()
            self._pending_bytes = 0
            try:
                self.stream.write(text)
                self.stream.flush()
            except (OSError, ValueError):  # stderr closed at exit
                pass
            except Exception:  # noqa: BLE001 - e.g. an encoding error: say so, keep logging
                sys.stderr.write(f"detserve: {len(text)} bytes of log lines could not be written\n")

    def _flush_periodically(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.flush()

    def close(self) -> None:
        self._stop.set()
        self.flush()
        super().close()


def configure_logging(level: str = "info", stream=None) -> None:
    """Route the root logger (and uvicorn's) to one JSON-lines handler on stderr."""
    handler = BatchedLineHandler(stream or sys.stderr)
    handler.setFormatter(JsonLineFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        if isinstance(old, BatchedLineHandler):
            old.close()  # its pending lines, then its flusher thread
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    # Our access log replaces uvicorn's, which does not know the request id.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    # httpx logs every fetched URL at INFO; Label Studio image URLs can carry signed credentials.
    logging.getLogger("httpx").setLevel(logging.WARNING)


def log_access(method: str, path: str, status: int, seconds: float, request_id: str, client: str | None,
               *, quiet: bool = False) -> None:
    """`quiet`: a successful probe or scrape, logged at debug so probes do not drown the log."""
    level = logging.DEBUG if quiet and status < 400 else logging.INFO
    logger = logging.getLogger(ACCESS_LOGGER)
    if not logger.isEnabledFor(level):  # before building the record's extra fields
        return
    # makeRecord + handle is what logger.log does, less findCaller's walk up the stack for a file
    # and line the JSON lines never show: a third of this function's cost, once per request.
    logger.handle(logger.makeRecord(
        ACCESS_LOGGER, level, "", 0, "%s %s %d", (method, path, status), None,
        extra={"status": status, "ms": round(seconds * 1000, 2), "request_id": request_id, "client": client},
    ))
