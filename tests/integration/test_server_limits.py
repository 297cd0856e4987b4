"""Server-wide bounds on a real `detserve serve`: header size and count, header and body read
timeouts (slowloris), an endless chunked body, an answer the client never reads, and the drain edges (a slow upload gets a JSON 503;
SIGTERM to the whole process group restarts no worker and accepted requests complete)."""
from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time

import httpx
import pytest

from fakes import write_model
from serve_process import ServeProcess

pytestmark = pytest.mark.integration

CONFIG = """
max_request_size = 65536
drain_timeout_s = 2.0
[limits]
max_header_bytes = 8192
max_headers = 40
header_timeout_s = 1.0
body_timeout_s = 2.0
send_timeout_s = 1.0
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    write_model(store, "m", workers=1)
    proc = ServeProcess(store, tmp_path_factory.mktemp("run"), config=CONFIG)
    proc.wait_ready()
    yield proc
    proc.stop()


def _connect(proc: ServeProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", proc.ports["inference"]), timeout=10)


def _read_all(sock: socket.socket, timeout_s: float) -> bytes:
    sock.settimeout(timeout_s)
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except (TimeoutError, ConnectionResetError):
        pass
    return b"".join(chunks)


def _wait_until_held(proc: ServeProcess, model: str, count: int, timeout_s: float = 30) -> None:
    """Until `count` requests of `model` are queued or running: a fixed sleep before a signal races
    the clients' threads on a loaded machine."""
    wanted = (f'detserve_queue_depth{{model="{model}"}}', f'detserve_in_flight{{model="{model}"}}')
    deadline = time.monotonic() + timeout_s
    held = 0.0
    while time.monotonic() < deadline:
        lines = httpx.get(f"{proc.metrics}/metrics", timeout=5).text.splitlines()
        held = sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(wanted))
        if held >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"only {held:g} of {count} requests reached model {model!r} in {timeout_s} s")


def _status_and_json(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body) if body.strip() else {}


def test_200_slowloris_connections_are_closed_after_the_header_timeout(server):
    socks = []
    for _ in range(200):
        s = _connect(server)
        s.sendall(b"PUT /predictions/m HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        socks.append(s)
    started = time.monotonic()
    try:
        answers = [_read_all(s, 6.0) for s in socks]
        elapsed = time.monotonic() - started
        assert all(a.startswith(b"HTTP/1.1 408") for a in answers), {a[:40] for a in answers}
        assert _status_and_json(answers[0])[1]["code"] == "request_timeout"
        assert elapsed < 6.0  # 1 s timeout + sweeper ticks, not the 40 s seen on main
        assert httpx.get(f"{server.url}/ping", timeout=5).status_code == 200
    finally:
        for s in socks:
            s.close()


def test_headers_over_the_size_or_count_limit_get_431(server):
    big = _connect(server)
    big.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000)  # never finished: no \r\n\r\n
    status, body = _status_and_json(_read_all(big, 5))
    assert status == 431 and body["code"] == "headers_too_large" and "8192" in body["message"]
    many = _connect(server)
    many.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(60)) + b"\r\n")
    status, body = _status_and_json(_read_all(many, 5))
    assert status == 431 and "at most 40" in body["message"]
    # Complete headers over the size limit in one read, and behind a keep-alive request, are refused too.
    whole = _connect(server)
    whole.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n")
    status, body = _status_and_json(_read_all(whole, 5))
    assert status == 431 and body["code"] == "headers_too_large"
    second = _connect(server)
    second.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
    second.settimeout(5)
    assert second.recv(65536).startswith(b"HTTP/1.1 200")
    second.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n")
    status, body = _status_and_json(_read_all(second, 5))
    assert status == 431 and body["code"] == "headers_too_large"
    # Pipelined behind requests still running, the refusal waits for their answers, which come first.
    slow = b"PUT /predictions/m HTTP/1.1\r\nHost: x\r\nContent-Length: 9\r\n\r\nSLEEP:0.5"
    for too_big in (b"X-Big: " + b"a" * 20_000 + b"\r\n\r\n",  # in one read
                    b"".join(b"X-%d: v\r\n" % i for i in range(60)) + b"\r\n"):  # too many
        behind = _connect(server)
        behind.sendall(slow + slow + b"GET /ping HTTP/1.1\r\nHost: x\r\n" + too_big)
        raw = _read_all(behind, 10)
        answers = raw.split(b"HTTP/1.1 ")[1:]
        assert [a.split(b" ", 1)[0] for a in answers] == [b"200", b"200", b"431"], raw[:300]
        assert b"headers_too_large" in answers[2]
    # Under /v2/ the refusal carries the Open Inference Protocol's "error" field too, as the app's do.
    assert "error" not in body
    v2 = _connect(server)
    v2.sendall(b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000)
    status, body = _status_and_json(_read_all(v2, 5))
    assert status == 431 and body["error"] == body["message"]
    long_url = _connect(server)  # refused while the request line itself is parsed
    long_url.sendall(b"POST /v2/models/m/infer?x=" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    status, body = _status_and_json(_read_all(long_url, 5))
    assert status == 431 and body["error"] == body["message"]
    # A request llhttp cannot parse gets the JSON error shape too, not uvicorn's text/plain.
    for bad in (b"PUT /predictions/m HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\nok",
                b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok"):
        sock = _connect(server)
        sock.sendall(bad)
        raw = _read_all(sock, 5)
        status, body = _status_and_json(raw)
        assert status == 400 and body["code"] == "invalid_request" and b"application/json" in raw, raw[:300]
        assert body["message"].startswith("invalid HTTP request") and ("error" in body) == (b"/v2/" in bad)
    # Headers within the limits still work.
    assert httpx.get(f"{server.url}/ping", headers={f"x-{i}": "v" for i in range(20)}, timeout=5).status_code == 200


def test_a_client_that_hangs_up_mid_body_is_a_499_not_a_500(server):
    def count(code: str) -> float:
        text = httpx.get(f"{server.metrics}/metrics", timeout=5).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("detserve_requests_total{") and f'code="{code}"' in line)

    before_499, before_500 = count("499"), count("500")
    for _ in range(3):
        sock = _connect(server)
        sock.sendall(b"PUT /predictions/m HTTP/1.1\r\nHost: x\r\nContent-Length: 50000\r\n\r\n" + b"x" * 100)
        sock.close()
    deadline = time.monotonic() + 10
    while count("499") < before_499 + 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert count("499") == before_499 + 3 and count("500") == before_500
    assert "unhandled error" not in server.log_path.read_text()


def test_an_endless_chunked_body_is_cut_by_size_and_by_time(server):
    fast = _connect(server)
    fast.sendall(b"PUT /predictions/m HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunk = b"%x\r\n%s\r\n" % (8192, b"x" * 8192)
    try:
        for _ in range(20):  # 160 KB against a 64 KB max_request_size
            fast.sendall(chunk)
    except (BrokenPipeError, ConnectionResetError):
        pass
    status, body = _status_and_json(_read_all(fast, 5))
    assert status == 413 and body["code"] == "payload_too_large"

    slow = _connect(server)
    slow.sendall(b"PUT /predictions/m HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    started = time.monotonic()
    answer = b""
    while time.monotonic() - started < 8 and not answer:
        try:
            slow.sendall(b"1\r\nx\r\n")
        except (BrokenPipeError, ConnectionResetError):
            break
        slow.settimeout(0.3)
        try:
            answer = slow.recv(65536)
        except TimeoutError:
            pass
    answer += _read_all(slow, 2)
    status, body = _status_and_json(answer)
    assert status == 408 and body["code"] == "request_timeout" and "body_timeout_s" in body["message"]
    assert 1.5 < time.monotonic() - started < 6


def test_drain_answers_a_slow_upload_with_json_503_and_sigterm_to_the_group_restarts_nothing(tmp_path):
    store = tmp_path / "store"
    write_model(store, "d", workers=2, batch={"max_batch_size": 1})
    # A drain long enough for the three accepted requests (about 2 s of work) on a loaded machine; the
    # slow upload holds it open to the end, and is answered then.
    config = CONFIG.replace("body_timeout_s = 2.0", "body_timeout_s = 60.0").replace("drain_timeout_s = 2.0", "drain_timeout_s = 5.0")
    proc = ServeProcess(store, tmp_path, config=config)
    proc.wait_ready()
    try:
        upload = _connect(proc)
        upload.sendall(b"PUT /predictions/d HTTP/1.1\r\nHost: x\r\nContent-Length: 60000\r\n\r\nok")
        results: list[int] = []

        def accepted():
            results.append(httpx.put(f"{proc.url}/predictions/d", content=b"SLEEP:1.0", timeout=20).status_code)

        threads = [threading.Thread(target=accepted) for _ in range(3)]
        for t in threads:
            t.start()
        _wait_until_held(proc, "d", 3)
        os.killpg(proc.proc.pid, signal.SIGTERM)  # systemd's default: the whole group, workers included
        keep_sending = time.monotonic() + 12
        answer = b""
        upload.settimeout(0.25)
        while time.monotonic() < keep_sending and not answer:
            try:
                upload.sendall(b"x")
                answer = upload.recv(65536)
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
        answer += _read_all(upload, 2)
        for t in threads:
            t.join(20)
        code = proc.proc.wait(30)
    finally:
        if proc.proc.poll() is None:
            proc.stop()
    status, body = _status_and_json(answer)
    assert status == 503 and body["code"] == "model_not_ready", answer[:300]
    assert results == [200, 200, 200]  # accepted before the signal: completed
    assert code == 0
    log = proc.log()
    assert "restarting in" not in log and "gone (" not in log, log


def test_a_request_still_running_when_the_drain_ends_gets_json_503_not_plain_500(tmp_path):
    store = tmp_path / "store"
    write_model(store, "late", workers=1)
    proc = ServeProcess(store, tmp_path, config="drain_timeout_s = 1.5\n")
    proc.wait_ready()
    try:
        answers: list[httpx.Response] = []
        t = threading.Thread(target=lambda: answers.append(
            httpx.put(f"{proc.url}/predictions/late", content=b"SLEEP:3", timeout=30)))
        t.start()
        _wait_until_held(proc, "late", 1)
        proc.proc.send_signal(signal.SIGTERM)
        t.join(30)
        assert proc.proc.wait(30) == 0
    finally:
        if proc.proc.poll() is None:
            proc.stop()
    (r,) = answers
    assert r.status_code == 503 and r.headers["content-type"] == "application/json", r.text
    assert r.json()["code"] == "model_not_ready"


def test_a_connection_that_sends_nothing_is_closed_quietly(server):
    idle = _connect(server)
    started = time.monotonic()
    assert _read_all(idle, 5) == b""  # closed, with no unsolicited answer
    assert 0.9 < time.monotonic() - started < 4


def test_large_uploads_arrive_intact_whole_or_chunked(tmp_path):
    """Bodies are gathered before the app is woken (limits.BODY_BUFFER_BYTES); below, at and far above
    that size, plain and chunked, the worker must see exactly the bytes that were sent."""
    import hashlib
    import os

    import httpx

    from service.protocols.rest.limits import BODY_BUFFER_BYTES

    store = tmp_path / "store"
    write_model(store, "m", workers=1)
    proc = ServeProcess(store, tmp_path, config="max_request_size = 8388608\n")
    proc.wait_ready()
    try:
        for size in (100_000, BODY_BUFFER_BYTES, BODY_BUFFER_BYTES + 1, 5 * BODY_BUFFER_BYTES + 12345):
            body = b"DIGEST" + os.urandom(size)
            for chunked in (False, True):
                content = (body[i:i + 70_000] for i in range(0, len(body), 70_000)) if chunked else body
                r = httpx.post(f"{proc.url}/v2/models/m/infer", content=content, timeout=60,
                               headers={"Inference-Header-Content-Length": "0",
                                        "Content-Type": "application/octet-stream"})
                assert r.status_code == 200, r.text
                assert r.json()["model_version"] == hashlib.sha256(body).hexdigest(), (size, chunked)
    finally:
        proc.stop()


def test_a_label_studio_predict_abandoned_by_its_client_stops_running(tmp_path):
    """Label Studio gives up on a slow /predict and retries it later: the abandoned call's images must
    not go on through the worker (here 40 tasks of 0.4 s each, one at a time: 16 s of work)."""
    import base64

    store = tmp_path / "store"
    write_model(store, "slow", workers=1, batch={"max_batch_size": 1, "max_queue_size": 4})
    proc = ServeProcess(store, tmp_path, config="")
    proc.wait_ready()
    try:
        image = "data:image/png;base64," + base64.b64encode(b"SLEEP:0.4").decode()
        config = ('<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
                  '<Label value="a"/></RectangleLabels></View>')
        body = {"tasks": [{"id": i, "data": {"image": image}} for i in range(1, 41)], "label_config": config}

        def batches() -> float:
            text = httpx.get(f"{proc.metrics}/metrics", timeout=5).text
            return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                       if line.startswith('detserve_batch_size_count{model="slow"}'))

        def assert_stops(before: float) -> float:
            time.sleep(1.5)  # the batch on the worker when the client left finishes
            settled = batches()
            time.sleep(2.0)  # five more tasks' worth, had the call gone on
            assert batches() == settled, "the abandoned call kept running images"
            assert settled - before < 10
            return settled

        with pytest.raises(httpx.TimeoutException):
            httpx.post(f"{proc.url}/labelstudio/slow/predict", json=body, timeout=1.5)
        done = assert_stops(0)
        # The same with a request pipelined behind it on the connection, which takes uvicorn's
        # notion of the connection's current request.
        payload = json.dumps(body).encode()
        pipelined = _connect(proc)
        pipelined.sendall(b"POST /labelstudio/slow/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n" % len(payload) + payload + b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(1.5)
        pipelined.close()
        assert_stops(done)
    finally:
        proc.stop()


def _read_answers(sock: socket.socket, count: int, timeout_s: float = 20) -> list[tuple[int, bytes]]:
    """`count` HTTP/1.1 answers with a content-length, in order, from a kept-alive connection."""
    sock.settimeout(timeout_s)
    buffer, answers = b"", []
    while len(answers) < count:
        head, sep, rest = buffer.partition(b"\r\n\r\n")
        if sep:
            status = int(head.split(b" ", 2)[1])
            if status == 100:
                buffer = rest
                continue
            length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            if len(rest) >= length:
                answers.append((status, rest[:length]))
                buffer = rest[length:]
                continue
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after {len(answers)} of {count} answers"
        buffer += chunk
    return answers


UPGRADE_H2C = b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"


def test_an_upgrade_the_server_does_not_take_is_ignored_and_the_body_arrives(server):
    """`curl --http2 -T img URL` sends `Upgrade: h2c` with its body. llhttp ends such a request at
    its headers, so uvicorn answered "empty request body" and then never read the connection
    again; RFC 9110 7.8 says to ignore the header and go on in HTTP/1.1, keep-alive included."""
    import hashlib

    body = b"DIGEST" + os.urandom(20_000)
    digest = hashlib.sha256(body).hexdigest()
    v2 = (b"POST /v2/models/m/infer HTTP/1.1\r\nHost: t\r\nInference-Header-Content-Length: 0\r\n"
          b"Content-Type: application/octet-stream\r\n")
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 7000]), body[i:i + 7000])
                       for i in range(0, len(body), 7000)) + b"0\r\n\r\n"
    cases = {
        "content-length": v2 + UPGRADE_H2C + b"Content-Length: %d\r\n\r\n" % len(body) + body,
        "chunked": v2 + UPGRADE_H2C + b"Transfer-Encoding: chunked\r\n\r\n" + chunked,
        # the TorchServe door too, with the second request pipelined behind the first
        "torchserve, pipelined": (b"PUT /predictions/m HTTP/1.1\r\nHost: t\r\n" + UPGRADE_H2C
                                  + b"Content-Length: %d\r\n\r\n" % len(body) + body),
    }
    for name, request in cases.items():
        plain_after = b"GET /ping HTTP/1.1\r\nHost: t\r\n\r\n"
        with _connect(server) as sock:
            if name.endswith("pipelined"):
                sock.sendall(request + plain_after)
                answers = _read_answers(sock, 2)
            else:
                sock.sendall(request)
                answers = _read_answers(sock, 1)
                sock.sendall(plain_after)  # the same connection, kept alive
                answers += _read_answers(sock, 1)
        (status, first), (ping_status, ping) = answers
        assert status == 200, (name, first)
        if name.startswith("torchserve"):
            assert isinstance(json.loads(first), list), (name, first)
        else:
            assert json.loads(first)["model_version"] == digest, name
        assert ping_status == 200 and json.loads(ping)["status"] == "Healthy", (name, ping)

    # curl's own order: headers with Expect: 100-continue, the body only after the interim answer.
    with _connect(server) as sock:
        sock.sendall(v2 + UPGRADE_H2C + b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body))
        sock.settimeout(10)
        assert sock.recv(65536).startswith(b"HTTP/1.1 100 ")
        sock.sendall(body)
        [(status, answer)] = _read_answers(sock, 1)
    assert status == 200 and json.loads(answer)["model_version"] == digest

    # Without a body (GET /ping upgraded) the connection goes on too, pipelined or kept alive.
    with _connect(server) as sock:
        sock.sendall(b"GET /ping HTTP/1.1\r\nHost: t\r\n" + UPGRADE_H2C + b"\r\n" + b"GET /ping HTTP/1.1\r\nHost: t\r\n\r\n")
        assert [s for s, _ in _read_answers(sock, 2)] == [200, 200]


def _ask_for_a_drawing(server, size: int) -> socket.socket:
    """A socket with a small receive window that asked the fake predictor for a `size`-byte drawing."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.ports["inference"]))
    body = b"DRAWN:%d" % size
    sock.sendall(b"PUT /predictions/m?format=image HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n" % len(body)
                 + body)
    return sock


def test_an_answer_the_client_never_reads_is_dropped_after_the_send_timeout(server):
    # 20 MB (a drawing of a large image) waits in the front's transport buffer for the client; close()
    # would wait for it to flush, so a client that never reads used to hold it for as long as it liked.
    size = 20_000_000
    sock = _ask_for_a_drawing(server, size)
    time.sleep(4)  # the answer is ready within a second; then send_timeout_s (1 s) with nothing read
    got = len(_read_all(sock, 10))
    sock.close()
    assert 0 < got < size  # the head and what the kernel buffers held, then the reset
    assert "read none of" in server.log_path.read_text()
    with httpx.Client(base_url=server.url, timeout=30) as client:  # a client that reads gets it all
        r = client.put("/predictions/m?format=image", content=b"DRAWN:%d" % size)
        assert r.status_code == 200 and len(r.content) == size


def test_a_client_reading_its_answer_slowly_is_not_cut_by_the_send_timeout(server):
    # ~20 KB/s for four send timeouts: the kernel's queue drains, the transport's buffer does not
    # move (it shrinks only after megabytes), and that alone is not a stalled client.
    size = 20_000_000
    sock = _ask_for_a_drawing(server, size)
    got, deadline = 0, time.monotonic() + 4
    sock.settimeout(10)
    while time.monotonic() < deadline:
        chunk = sock.recv(2048)
        assert chunk, f"connection closed after {got} bytes while the client was reading"
        got += len(chunk)
        time.sleep(0.1)
    rest = _read_all(sock, 10)
    sock.close()
    assert got + len(rest) > size  # everything arrived: the head and 20 MB
