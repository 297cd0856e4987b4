"""The batched JSON-lines handler behind every log line of `detserve serve`."""
from __future__ import annotations

import io
import json
import logging
import time

from service.observability.logging import BatchedLineHandler, JsonLineFormatter


def make_logger(stream, **kwargs) -> tuple[logging.Logger, BatchedLineHandler]:
    handler = BatchedLineHandler(stream, **kwargs)
    handler.setFormatter(JsonLineFormatter())
    logger = logging.getLogger(f"test.batched.{id(stream)}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    return logger, handler


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_info_lines_are_written_in_order_within_the_interval():
    stream = io.StringIO()
    logger, handler = make_logger(stream, interval_s=0.05)
    try:
        for i in range(50):
            logger.info("request %d", i)
        deadline = time.monotonic() + 5
        while len(lines(stream)) < 50 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [line["msg"] for line in lines(stream)] == [f"request {i}" for i in range(50)]
    finally:
        handler.close()


def test_warnings_flush_at_once_and_close_flushes_the_rest():
    stream = io.StringIO()
    logger, handler = make_logger(stream, interval_s=3600)  # the timer never fires in this test
    logger.info("pending")
    assert stream.getvalue() == ""
    logger.warning("urgent")
    assert [line["msg"] for line in lines(stream)] == ["pending", "urgent"]
    logger.info("tail")
    handler.close()
    assert lines(stream)[-1]["msg"] == "tail"


def test_a_full_buffer_is_written_without_waiting_for_the_timer():
    stream = io.StringIO()
    logger, handler = make_logger(stream, interval_s=3600, max_bytes=1000)
    try:
        for i in range(30):
            logger.info("x" * 50)
        assert len(lines(stream)) >= 10
    finally:
        handler.close()
