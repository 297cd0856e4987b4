"""Task image fetching against a small real HTTP server standing in for Label Studio."""
from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from service.protocols.labelstudio.fetch import FetchConfig, ImageFetcher, ImageFetchError, TokenCache, is_jwt

LEGACY = "0123456789abcdef0123456789abcdef01234567"
IMAGE = b"\x89PNG\r\n\x1a\n" + b"pretend-pixels" * 10


def b64url(obj) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")


def jwt(payload: dict) -> str:
    return f"{b64url({'alg': 'HS256', 'typ': 'JWT'})}.{b64url(payload)}.c2ln"


PAT = jwt({"token_type": "refresh", "exp": time.time() + 86400})
ACCESS = jwt({"token_type": "access", "exp": time.time() + 3600})


class FakeLabelStudio(BaseHTTPRequestHandler):
    exchanges = 0

    def log_message(self, *args):
        pass

    def _send(self, status: int, body: bytes = b"", content_type: str = "image/png"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _authorized(self) -> bool:
        return self.headers.get("Authorization") in (f"Token {LEGACY}", f"Bearer {ACCESS}")

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        if self.path == "/api/token/refresh/" and body.get("refresh") == PAT:
            type(self).exchanges += 1
            return self._send(200, json.dumps({"access": ACCESS}).encode(), "application/json")
        self._send(401, b'{"detail":"bad token"}', "application/json")

    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        if url.path.startswith(("/data/upload/", "/prefix/data/upload/", "/data/local-files")):
            return self._send(200, IMAGE) if self._authorized() else self._send(401)
        if url.path == "/tasks/5/presign/":
            uri = base64.urlsafe_b64decode(urllib.parse.parse_qs(url.query)["fileuri"][0]).decode()
            if uri == "s3://bucket/a.png" and self._authorized():
                self.send_response(303)
                # A signed URL elsewhere: the LS token must not follow the redirect there.
                self.send_header("Location", f"http://localhost:{self.server.server_address[1]}/public.png")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            return self._send(403)
        if url.path == "/public.png":
            return self._send(200, IMAGE) if "Authorization" not in self.headers else self._send(400)
        if url.path == "/big.png":
            return self._send(200, b"x" * 5000)
        if url.path == "/slow.png":
            time.sleep(1.5)
            return self._send(200, IMAGE)
        self._send(404)


@pytest.fixture(scope="module")
def ls_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeLabelStudio)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def fetch(url: str, config: FetchConfig, tokens: TokenCache | None = None, task_id=None) -> bytes:
    async def go():
        async with httpx.AsyncClient(follow_redirects=True) as client:
            return await ImageFetcher(config, client, tokens or TokenCache()).fetch(url, task_id=task_id)

    return asyncio.run(go())


def test_jwt_detection():
    assert is_jwt(PAT) and not is_jwt(LEGACY) and not is_jwt("a.b.c")


def test_upload_with_legacy_token(ls_url):
    assert fetch("/data/upload/1/a.png", FetchConfig(url=ls_url, api_key=LEGACY)) == IMAGE


def test_upload_with_personal_access_token_exchanged_once(ls_url):
    tokens = TokenCache()
    before = FakeLabelStudio.exchanges

    async def many():
        async with httpx.AsyncClient() as client:
            fetcher = ImageFetcher(FetchConfig(url=ls_url, api_key=PAT), client, tokens)
            return await asyncio.gather(*(fetcher.fetch(f"/data/upload/1/{i}.png") for i in range(6)))

    assert asyncio.run(many()) == [IMAGE] * 6
    assert FakeLabelStudio.exchanges - before == 1


def test_ls_under_a_url_prefix(ls_url):
    assert fetch("/data/upload/1/a.png", FetchConfig(url=ls_url + "/prefix", api_key=LEGACY)) == IMAGE


def test_missing_or_refused_token_names_the_setting(ls_url):
    with pytest.raises(ImageFetchError, match="401.*LABEL_STUDIO_API_KEY"):
        fetch("/data/upload/1/a.png", FetchConfig(url=ls_url))
    with pytest.raises(ImageFetchError, match="token"):
        fetch("/data/upload/1/a.png", FetchConfig(url=ls_url, api_key=jwt({"alg": "x"})))


def test_relative_url_without_ls_url():
    with pytest.raises(ImageFetchError, match="LABEL_STUDIO_URL is not set"):
        fetch("/data/upload/1/a.png", FetchConfig())


def test_absolute_url_gets_token_only_on_the_ls_host(ls_url):
    assert fetch(f"{ls_url}/data/upload/1/a.png", FetchConfig(url=ls_url, api_key=LEGACY)) == IMAGE
    other = ls_url.replace("127.0.0.1", "localhost")
    assert fetch(f"{other}/public.png", FetchConfig(url=ls_url, api_key=LEGACY)) == IMAGE


def test_cloud_uri_presigned_through_ls(ls_url):
    assert fetch("s3://bucket/a.png", FetchConfig(url=ls_url, api_key=LEGACY), task_id=5) == IMAGE
    with pytest.raises(ImageFetchError, match="task id"):
        fetch("s3://bucket/a.png", FetchConfig(url=ls_url, api_key=LEGACY))


def test_size_limit_timeout_404_and_unreachable(ls_url):
    with pytest.raises(ImageFetchError, match="over the 1000-byte limit"):
        fetch(f"{ls_url}/big.png", FetchConfig(max_bytes=1000))
    with pytest.raises(ImageFetchError, match="timed out"):
        fetch(f"{ls_url}/slow.png", FetchConfig(timeout_s=0.3))
    with pytest.raises(ImageFetchError, match="answered 404"):
        fetch(f"{ls_url}/nothing.png", FetchConfig())
    with pytest.raises(ImageFetchError, match="failed: ConnectError"):
        fetch("http://127.0.0.1:9/x.png", FetchConfig())


def test_local_files_from_document_root(tmp_path, ls_url):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a b.png").write_bytes(IMAGE)
    (tmp_path.parent / "secret.png").write_bytes(b"secret")
    config = FetchConfig(document_root=tmp_path)
    assert fetch("/data/local-files/?d=sub/a%20b.png", config) == IMAGE
    for evil in ("../secret.png", "sub/../../secret.png", "/../secret.png"):
        with pytest.raises(ImageFetchError, match="outside LOCAL_FILES_DOCUMENT_ROOT"):
            fetch(f"/data/local-files/?d={urllib.parse.quote(evil)}", config)
    with pytest.raises(ImageFetchError, match="not found"):
        fetch("/data/local-files/?d=sub/none.png", config)
    # Not under the root here, but Label Studio may still serve it.
    assert fetch("/data/local-files/?d=sub/none.png", FetchConfig(url=ls_url, api_key=LEGACY, document_root=tmp_path)) == IMAGE


def test_data_uris():
    assert fetch("data:image/png;base64," + base64.b64encode(IMAGE).decode(), FetchConfig()) == IMAGE
    assert fetch("data:,abc%20d", FetchConfig()) == b"abc d"
    with pytest.raises(ImageFetchError, match="limit"):
        fetch("data:image/png;base64," + "A" * 4000, FetchConfig(max_bytes=100))
    with pytest.raises(ImageFetchError, match="comma"):
        fetch("data:image/png;base64", FetchConfig())


def test_unsupported_references():
    with pytest.raises(ImageFetchError, match="scheme 'ftp'"):
        fetch("ftp://host/a.png", FetchConfig())
    with pytest.raises(ImageFetchError, match="not a URL"):
        fetch("", FetchConfig())
