"""Task image fetching against a small real HTTP server standing in for Label Studio.

The server listens on 127.0.0.1, which the outbound policy refuses unless it is the configured
Label Studio URL's host or allow-listed: tests that fetch from it as "some other host" allow-list it."""
from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from service.protocols.labelstudio.fetch import (
    FetchConfig,
    FetchRefused,
    ImageFetcher,
    ImageFetchError,
    TokenCache,
    is_jwt,
)
from service.protocols.labelstudio.outbound import AddressPolicy, ByteBudget, non_public, pinned_client

LEGACY = "0123456789abcdef0123456789abcdef01234567"
IMAGE = b"\x89PNG\r\n\x1a\n" + b"pretend-pixels" * 10


def b64url(obj) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")


def jwt(payload: dict) -> str:
    return f"{b64url({'alg': 'HS256', 'typ': 'JWT'})}.{b64url(payload)}.c2ln"


PAT = jwt({"token_type": "refresh", "exp": time.time() + 86400})
PAT_NON_JSON = jwt({"token_type": "refresh", "exp": time.time() + 86400, "kind": "answers html"})
LOOPBACK = ("127.0.0.1/32",)
OTHER_PATS = [jwt({"token_type": "refresh", "exp": time.time() + 86400, "n": n}) for n in range(3)]
ACCESS = jwt({"token_type": "access", "exp": time.time() + 3600})
# A JWT-shaped access token whose payload nests 5000 deep: json.loads raises RecursionError on it.
DEEP_ACCESS = f"{b64url({'alg': 'HS256'})}.{base64.urlsafe_b64encode(b'[' * 5000).decode().rstrip('=')}.c2ln"
PAT_DEEP = jwt({"token_type": "refresh", "exp": time.time() + 86400, "kind": "deep access"})


class FakeLabelStudio(BaseHTTPRequestHandler):
    exchanges = 0
    hits = 0
    hosts: list[str] = []

    def log_message(self, *args):
        pass

    def _send(self, status: int, body: bytes = b"", content_type: str = "image/png"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _authorized(self) -> bool:
        return self.headers.get("Authorization") in (f"Token {LEGACY}", f"Bearer {ACCESS}", f"Bearer {DEEP_ACCESS}")

    def do_POST(self):
        type(self).hits += 1
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        if self.path == "/api/token/refresh/" and body.get("refresh") == PAT_NON_JSON:
            return self._send(200, b"<html>login page</html>", "text/html")
        if self.path == "/api/token/refresh/" and body.get("refresh") == PAT_DEEP:
            return self._send(200, json.dumps({"access": DEEP_ACCESS}).encode(), "application/json")
        if self.path == "/api/token/refresh/" and body.get("refresh") in [PAT, *OTHER_PATS]:
            type(self).exchanges += 1
            return self._send(200, json.dumps({"access": ACCESS}).encode(), "application/json")
        self._send(401, b'{"detail":"bad token"}', "application/json")

    def do_GET(self):
        type(self).hits += 1
        type(self).hosts.append(self.headers.get("Host", ""))
        url = urllib.parse.urlsplit(self.path)
        if url.path == "/redirect":  # ?to=<url>: a 302 there
            self.send_response(302)
            self.send_header("Location", urllib.parse.parse_qs(url.query)["to"][0])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if url.path == "/loop":
            self.send_response(307)
            self.send_header("Location", "/loop")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
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
        if url.path == "/gzip.png":  # compressed although asked for identity; Content-Length is the compressed size
            import gzip

            type(self).accept_encoding = self.headers.get("Accept-Encoding")
            body = gzip.compress(b"x" * 3000)
            self.send_response(200)
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
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
        async with pinned_client(verify=True, timeout_s=config.timeout_s) as client:
            return await ImageFetcher(config, client, tokens if tokens is not None else TokenCache()).fetch(url, task_id=task_id)

    return asyncio.run(go())


def test_jwt_detection():
    assert is_jwt(PAT) and not is_jwt(LEGACY) and not is_jwt("a.b.c")


def test_upload_with_legacy_token(ls_url):
    assert fetch("/data/upload/1/a.png", FetchConfig(url=ls_url, api_key=LEGACY)) == IMAGE


def test_upload_with_personal_access_token_exchanged_once(ls_url):
    tokens = TokenCache()
    before = FakeLabelStudio.exchanges

    async def many():
        async with pinned_client(verify=True, timeout_s=10) as client:
            fetcher = ImageFetcher(FetchConfig(url=ls_url, api_key=PAT), client, tokens)
            return await asyncio.gather(*(fetcher.fetch(f"/data/upload/1/{i}.png") for i in range(6)))

    assert asyncio.run(many()) == [IMAGE] * 6
    assert FakeLabelStudio.exchanges - before == 1


def test_token_cache_is_bounded(ls_url, monkeypatch):
    monkeypatch.setattr(TokenCache, "MAX_ENTRIES", 2)
    tokens = TokenCache()
    for pat in OTHER_PATS:  # three personal access tokens, one exchange each
        assert fetch("/data/upload/1/a.png", FetchConfig(url=ls_url, api_key=pat), tokens) == IMAGE
    assert len(tokens) == 2


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


@pytest.mark.parametrize("path", ["/data/upload/../../api/users/whoami", "/data/upload/%2e%2e/%2E%2E/api/users",
                                  "data/upload/./1/a.png", "/data/upload/..%5C..%5Capi"])
def test_a_relative_path_with_dot_segments_is_refused_before_the_key_is_sent(ls_url, path):
    # Resolved by Label Studio (or a proxy), a media path would steer the key to any of its APIs.
    before = FakeLabelStudio.hits
    with pytest.raises(ImageFetchError, match="'.' or '..' segments"):
        fetch(path, FetchConfig(url=ls_url, api_key=LEGACY))
    assert FakeLabelStudio.hits == before


def test_absolute_url_gets_token_only_on_the_ls_host(ls_url):
    assert fetch(f"{ls_url}/data/upload/1/a.png", FetchConfig(url=ls_url, api_key=LEGACY)) == IMAGE
    other = ls_url.replace("127.0.0.1", "localhost")  # /public.png answers 400 to any Authorization
    assert fetch(f"{other}/public.png", FetchConfig(url=ls_url, api_key=LEGACY, allow=("localhost",))) == IMAGE
    # A redirect from Label Studio to elsewhere drops the key too.
    to_other = urllib.parse.quote(f"{other}/public.png")
    assert fetch(f"{ls_url}/redirect?to={to_other}", FetchConfig(url=ls_url, api_key=LEGACY, allow=("localhost",))) == IMAGE


def test_cloud_uri_presigned_through_ls(ls_url):
    config = FetchConfig(url=ls_url, api_key=LEGACY, allow=("localhost",))  # it redirects to localhost
    assert fetch("s3://bucket/a.png", config, task_id=5) == IMAGE
    for task_id in (None, "../../api/users", True):  # the id goes into an authenticated LS path
        with pytest.raises(ImageFetchError, match="integer task id"):
            fetch("s3://bucket/a.png", config, task_id=task_id)
    # Without the allow-list entry the presigned redirect to a loopback name is refused.
    with pytest.raises(FetchRefused, match="'localhost'.*loopback"):
        fetch("s3://bucket/a.png", FetchConfig(url=ls_url, api_key=LEGACY), task_id=5)


def test_size_limit_timeout_404_and_unreachable(ls_url):
    with pytest.raises(ImageFetchError, match="over the 1000-byte limit"):
        fetch(f"{ls_url}/big.png", FetchConfig(max_bytes=1000, allow=LOOPBACK))
    with pytest.raises(ImageFetchError, match="timed out"):
        fetch(f"{ls_url}/slow.png", FetchConfig(timeout_s=0.3, allow=LOOPBACK))
    with pytest.raises(ImageFetchError, match="answered 404"):
        fetch(f"{ls_url}/nothing.png", FetchConfig(allow=LOOPBACK))
    with pytest.raises(ImageFetchError, match="failed: ConnectError"):
        fetch("http://127.0.0.1:9/x.png", FetchConfig(allow=LOOPBACK))


def test_an_encoded_body_is_capped_by_its_decoded_size_not_its_content_length(ls_url):
    assert fetch(f"{ls_url}/gzip.png", FetchConfig(max_bytes=4000, allow=LOOPBACK)) == b"x" * 3000
    assert FakeLabelStudio.accept_encoding == "identity"
    with pytest.raises(ImageFetchError, match="over the 2000-byte limit"):
        fetch(f"{ls_url}/gzip.png", FetchConfig(max_bytes=2000, allow=LOOPBACK))


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
    with pytest.raises(ImageFetchError, match="cannot be read: File name too long"):  # is_file() raises on it
        fetch("/data/local-files/?d=" + "a" * 300, config)
    # Not under the root here, but Label Studio may still serve it.
    assert fetch("/data/local-files/?d=sub/none.png", FetchConfig(url=ls_url, api_key=LEGACY, document_root=tmp_path)) == IMAGE


def test_uploads_from_the_upload_root(tmp_path, ls_url):
    root = tmp_path / "upload"
    (root / "1").mkdir(parents=True)
    (root / "1" / "x y.png").write_bytes(b"from disk")
    (tmp_path / "secret.png").write_bytes(b"secret")
    config = FetchConfig(upload_root=root)
    assert fetch("/data/upload/1/x%20y.png", config) == b"from disk"
    for evil in ("/data/upload/../secret.png", "/data/upload/1/%2e%2e/%2e%2e/secret.png", "/data/upload//etc/passwd"):
        with pytest.raises(ImageFetchError, match="outside labelstudio.upload_root|not found"):
            fetch(evil, config)
    # Not in the folder (another machine's upload?): Label Studio serves it, as without the setting.
    assert fetch("/data/upload/1/a.png", FetchConfig(url=ls_url, api_key=LEGACY, upload_root=root)) == IMAGE


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


# ---- outbound policy -----------------------------------------------------------------------------

@pytest.mark.parametrize("address, reason", [
    ("127.0.0.1", "loopback"), ("::1", "loopback"), ("::ffff:127.0.0.1", "loopback"),
    ("169.254.169.254", "link-local"), ("fe80::1", "link-local"), ("10.1.2.3", "private"),
    ("192.168.0.1", "private"), ("172.16.0.1", "private"), ("fd00::1", "private"), ("224.0.0.1", "multicast"),
    ("0.0.0.0", "unspecified"), ("240.0.0.1", "reserved"), ("100.64.0.1", "not globally routable"),
    ("fec0::1", "site-local or 6to4"), ("2002:7f00:1::", "site-local or 6to4"), ("192.88.99.1", "6to4 relay anycast"),
])
def test_non_public_addresses_named(address, reason):
    import ipaddress

    assert non_public(ipaddress.ip_address(address)) == reason
    assert non_public(ipaddress.ip_address("93.184.216.34")) is None


def test_loopback_and_loopback_names_refused_without_connecting(ls_url):
    before = FakeLabelStudio.hits
    port = ls_url.rsplit(":", 1)[1]
    for url in (f"{ls_url}/public.png", f"http://localhost:{port}/public.png", f"http://[::ffff:127.0.0.1]:{port}/p.png",
                f"http://0.0.0.0:{port}/public.png", "http://169.254.169.254/latest/meta-data/"):
        with pytest.raises(FetchRefused, match="refusing to fetch.*fetch_allow"):
            fetch(url, FetchConfig())
    assert FakeLabelStudio.hits == before  # refused before any connection


def test_configured_url_host_allowed_but_a_setup_hostname_is_not(ls_url):
    assert fetch("/data/upload/1/a.png", FetchConfig(url=ls_url, api_key=LEGACY)) == IMAGE
    with pytest.raises(FetchRefused):
        fetch("/data/upload/1/a.png", FetchConfig(url=ls_url, api_key=LEGACY, url_trusted=False))


def test_the_label_studio_origin_is_trusted_not_every_port_of_its_host(ls_url):
    """Label Studio on 127.0.0.1:PORT must not open 127.0.0.1's other ports (detserve's own
    management API among them) to task URLs or redirects from Label Studio."""
    port = int(ls_url.rsplit(":", 1)[1])
    other = port + 1 if port < 65535 else port - 1
    before = FakeLabelStudio.hits
    with pytest.raises(FetchRefused, match="127.0.0.1 is loopback"):
        fetch(f"http://127.0.0.1:{other}/models", FetchConfig(url=ls_url, api_key=LEGACY))
    to_other = urllib.parse.quote(f"http://127.0.0.1:{other}/models")
    with pytest.raises(FetchRefused, match="127.0.0.1 is loopback"):
        fetch(f"{ls_url}/redirect?to={to_other}", FetchConfig(url=ls_url, api_key=LEGACY))
    assert FakeLabelStudio.hits - before == 1  # only Label Studio's own redirecting hop
    assert fetch("/data/upload/1/a.png", FetchConfig(url=ls_url, api_key=LEGACY)) == IMAGE


def test_credentials_in_a_url_never_reach_logs_or_messages(ls_url, caplog):
    from service.protocols.labelstudio.fetch import _redact

    assert _redact("http://user:SECRET@ls.example:8080/data/x.png?sig=SECRET") == "http://ls.example:8080/data/x.png"
    with pytest.raises(ImageFetchError) as err:
        fetch(ls_url.replace("http://", "http://user:SECRET@") + "/missing.png", FetchConfig(allow=LOOPBACK))
    assert "SECRET" not in str(err.value) and "SECRET" not in caplog.text


def test_every_redirect_is_checked_and_capped(ls_url):
    before = FakeLabelStudio.hits
    to_metadata = urllib.parse.quote("http://169.254.169.254/latest/meta-data/")
    with pytest.raises(FetchRefused, match="169.254.169.254 is link-local"):
        fetch(f"{ls_url}/redirect?to={to_metadata}", FetchConfig(allow=LOOPBACK))
    # The LS host is trusted by name; a redirect from it to a loopback name is not.
    port = ls_url.rsplit(":", 1)[1]
    to_localhost = urllib.parse.quote(f"http://localhost:{port}/public.png")
    with pytest.raises(FetchRefused, match="'localhost'"):
        fetch(f"{ls_url}/redirect?to={to_localhost}", FetchConfig(url=ls_url))
    assert FakeLabelStudio.hits - before == 2  # only the two redirecting hops were sent
    with pytest.raises(ImageFetchError, match="more than 3 redirects"):
        fetch(f"{ls_url}/loop", FetchConfig(allow=LOOPBACK, max_redirects=3))


def test_name_resolved_once_and_connection_pinned_to_that_address(ls_url, monkeypatch):
    """DNS rebinding: the name is looked up once, checked, and the connection goes to that address
    with the name in the Host header; a second, different answer would never be used."""
    import socket

    real = socket.getaddrinfo
    lookups = []

    def rebinding(host, *args, **kwargs):
        if host == "images.example":
            lookups.append(host)
            # first answer: loopback (allow-listed); any later one: the metadata address
            target = "127.0.0.1" if len(lookups) == 1 else "169.254.169.254"
            return real(target, *args, **kwargs)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    port = ls_url.rsplit(":", 1)[1]
    FakeLabelStudio.hosts.clear()
    assert fetch(f"http://images.example:{port}/public.png", FetchConfig(allow=LOOPBACK)) == IMAGE
    assert lookups == ["images.example"]
    assert FakeLabelStudio.hosts == [f"images.example:{port}"]


def test_pin_keeps_the_name_for_host_and_sni():
    async def go():
        policy = AddressPolicy(["127.0.0.0/8"])
        return await policy.pin("https://localhost:8443/a.png?x=1")

    pinned = asyncio.run(go())
    assert pinned.url.host == "127.0.0.1" and pinned.url.port == 8443 and pinned.url.query == b"x=1"
    assert pinned.host_header == "localhost:8443" and pinned.extensions == {"sni_hostname": "localhost"}


@pytest.mark.parametrize("url", ["http://[", "http://[::1", "http://host:99999/a.png", "http://a b/c.png",
                                 "http://\u2603.invalid./x.png", "http://\u2603.com/a.png", "http:///nohost.png", "http://" + "a" * 300 + "/x"])
def test_malformed_urls_are_fetch_errors(url):
    with pytest.raises(ImageFetchError):
        fetch(url, FetchConfig(timeout_s=2))


def test_tokens_nested_without_end_are_not_jwts_and_not_errors(ls_url):
    assert is_jwt(base64.urlsafe_b64encode(b"[" * 3000).decode().rstrip("=") + ".a.b") is False
    # An access token whose payload cannot be read has no known expiry, and still works.
    assert fetch("/data/upload/1/a.png", FetchConfig(url=ls_url, api_key=PAT_DEEP)) == IMAGE


def test_a_label_studio_that_never_answers_holds_up_no_other_project(ls_url):
    """Each project's token exchange waits alone: a cached token is served at once, and another
    Label Studio is exchanged with, while one exchange hangs."""
    import socket

    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(8)  # accepts, never answers
    hung_url = f"http://127.0.0.1:{hung.getsockname()[1]}"

    async def go():
        tokens = TokenCache()
        policy = FetchConfig(url=ls_url, allow=LOOPBACK).policy()
        async with pinned_client(verify=True, timeout_s=30) as client:
            first = await tokens.access_token(client, policy, ls_url, PAT)  # cached from here on
            stuck = asyncio.create_task(tokens.access_token(client, policy, hung_url, OTHER_PATS[0]))
            await asyncio.sleep(0.3)
            started = time.monotonic()
            again = await asyncio.wait_for(tokens.access_token(client, policy, ls_url, PAT), 2)
            other = await asyncio.wait_for(tokens.access_token(client, policy, ls_url, OTHER_PATS[1]), 5)
            waited = time.monotonic() - started
            assert not stuck.done()
            stuck.cancel()
            return first, again, other, waited

    try:
        first, again, other, waited = asyncio.run(go())
    finally:
        hung.close()
    assert first == again == other == ACCESS and waited < 5


def test_token_refresh_answering_non_json_is_a_clean_error(ls_url):
    with pytest.raises(ImageFetchError, match="without a JSON object holding an 'access' token"):
        fetch("/data/upload/1/a.png", FetchConfig(url=ls_url, api_key=PAT_NON_JSON))


# ---- byte budgets ---------------------------------------------------------------------------------

def test_images_hold_their_bytes_in_every_budget_until_released(ls_url):
    async def go():
        call, server = ByteBudget(2000), ByteBudget(10_000)
        async with pinned_client(verify=True, timeout_s=5) as client:
            fetcher = ImageFetcher(FetchConfig(url=ls_url, max_bytes=1000, allow=LOOPBACK), client, TokenCache(),
                                   budgets=(call, server))
            async with fetcher.holding(f"{ls_url}/public.png") as data:
                assert (call.used, server.used) == (len(data), len(data))  # shrunk to the real size
            assert (call.used, server.used) == (0, 0)
            with pytest.raises(ImageFetchError, match="limit"):
                await fetcher.fetch(f"{ls_url}/big.png")
            assert (call.used, server.used) == (0, 0)  # given back on failure too
            return call.peak

    assert asyncio.run(go()) == 1000  # an unknown size holds max_bytes until the headers arrive


def test_byte_budget_is_first_come_first_served():
    async def go():
        budget = ByteBudget(10)
        order = []
        await budget.acquire(8)

        async def want(n, name):
            await budget.acquire(n)
            order.append(name)

        big = asyncio.create_task(want(9, "big"))
        await asyncio.sleep(0)
        small = asyncio.create_task(want(2, "small"))  # would fit now, but waits behind big
        await asyncio.sleep(0.01)
        assert order == []
        budget.release(8)
        await asyncio.sleep(0.01)
        assert order == ["big"] and not small.done()
        budget.release(9)
        await small
        assert order == ["big", "small"] and budget.used == 2 and budget.peak == 9

    asyncio.run(go())


def test_a_label_studio_url_with_credentials_is_refused_at_start_up():
    from pydantic import ValidationError

    from service.settings import LabelStudioSettings

    with pytest.raises(ValidationError, match="(?s)url.*must not carry user:password@.*api_key"):
        LabelStudioSettings(url="http://admin:pw@ls.example:8080")
    assert LabelStudioSettings(url="http://ls.example:8080").url == "http://ls.example:8080"
