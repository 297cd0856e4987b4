"""Fetching task images the way Label Studio's own tools do (`get_local_path`), but async.

URL forms: `/data/upload/...` and other LS-relative paths (fetched from LABEL_STUDIO_URL with the
API key), `/data/local-files/?d=...` (read from LOCAL_FILES_DOCUMENT_ROOT when the file is there),
`s3://`/`gs://`/`azure-blob://` (presigned through LS), plain http(s), and data: URIs.

Every network hop goes through `outbound.AddressPolicy` (checked and pinned, redirects followed here
one by one and checked again), the API key goes only to the Label Studio origin, and each image holds
its bytes in the call's and the server's byte budgets from the moment its size is known.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import time
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson

from .outbound import (
    AddressPolicy,
    ByteBudget,
    FetchRefused,
    FetchUnavailable,
    ImageFetchError,
    Reservation,
    open_hop,
    origin,
    reservation,
    without_userinfo,
)

__all__ = ["FetchConfig", "FetchRefused", "FetchUnavailable", "ImageFetchError", "ImageFetcher", "TokenCache", "is_jwt"]

CLOUD_SCHEMES = ("s3", "gs", "azure-blob")
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
_TOKEN_SLACK_S = 30.0  # refresh an access token this long before it expires
_MAX_TOKEN_RESPONSE_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class FetchConfig:
    """Where Label Studio is and how to reach it; resolved from settings, env and /setup."""

    url: str | None = None  # LS base URL, no trailing slash; may carry a path prefix
    api_key: str | None = None
    document_root: Path | None = None
    # Label Studio's upload folder (<LABEL_STUDIO_BASE_DATA_DIR>/media/upload) as detserve sees it,
    # e.g. a shared volume: /data/upload/<project>/<file> is read from there instead of through
    # Label Studio, which then serves no image bytes at all.
    upload_root: Path | None = None
    timeout_s: float = 10.0  # a whole fetch: every redirect and the body
    max_bytes: int = 32 * 1024 * 1024
    verify_ssl: bool = True
    # The url was configured by the operator (not sent to /setup): its host is reached whatever it
    # resolves to. A /setup hostname gets the same address checks as any task URL.
    url_trusted: bool = True
    allow: tuple[str, ...] = ()  # labelstudio.fetch_allow
    max_redirects: int = 5

    def policy(self) -> AddressPolicy:
        where = origin(self.url) if self.url and self.url_trusted else None
        trusted = [(where[1], where[2])] if where and where[2] is not None else []
        return AddressPolicy(self.allow, trusted_origins=trusted, resolve_timeout_s=self.timeout_s)


def is_jwt(token: str) -> bool:
    """Personal access tokens are JWT refresh tokens; legacy tokens are 40 hex characters."""
    parts = token.split(".")
    if len(parts) != 3:
        return False
    header = _b64json(parts[0])
    return isinstance(header, dict) and "alg" in header


def _b64json(segment: str):
    # orjson, not json: a token segment of "[[[[..." is a RecursionError (a 500) in json.loads.
    try:
        return orjson.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (binascii.Error, ValueError):
        return None


class TokenCache:
    """Access tokens obtained by exchanging a personal access token at /api/token/refresh/."""

    MAX_ENTRIES = 64  # one per (Label Studio, PAT) pair; /setup hostnames could otherwise add without end

    def __init__(self) -> None:
        self._access: dict[tuple[str, str], tuple[str, float]] = {}
        # One lock per pair, held only while it is exchanged: a Label Studio that never answers (a
        # /setup hostname may name one) must not hold up the other projects' fetches, cached or not.
        self._exchanges: dict[tuple[str, str], list] = {}  # pair -> [lock, callers using it]

    def __len__(self) -> int:
        return len(self._access)

    def forget(self, base_url: str, refresh: str) -> None:
        self._access.pop((base_url, refresh), None)

    def _cached(self, key: tuple[str, str]) -> str | None:
        cached = self._access.get(key)
        return cached[0] if cached and cached[1] > time.time() else None

    async def access_token(self, client: httpx.AsyncClient, policy: AddressPolicy, base_url: str, refresh: str) -> str:
        key = (base_url, refresh)
        access = self._cached(key)
        if access is not None:
            return access
        entry = self._exchanges.setdefault(key, [asyncio.Lock(), 0])
        entry[1] += 1
        try:
            async with entry[0]:  # one exchange for a whole batch of concurrent fetches
                return self._cached(key) or await self._exchange(client, policy, base_url, refresh)
        finally:
            entry[1] -= 1
            if not entry[1]:
                self._exchanges.pop(key, None)

    async def _exchange(self, client: httpx.AsyncClient, policy: AddressPolicy, base_url: str, refresh: str) -> str:
        where = f"{base_url}/api/token/refresh/"
        try:
            resp = await open_hop(client, policy, "POST", where, json={"refresh": refresh})
            try:
                raw = await _read_capped(resp, _MAX_TOKEN_RESPONSE_BYTES) if resp.status_code == 200 else b""
            finally:
                await resp.aclose()
        except httpx.HTTPError as exc:
            raise ImageFetchError(f"cannot exchange the personal access token at {base_url}: {exc}") from None
        if resp.status_code != 200:
            raise ImageFetchError(
                f"{where} answered {resp.status_code}: the personal access token (LABEL_STUDIO_API_KEY) was refused"
            )
        access = _access_from(raw)
        if access is None:
            raise ImageFetchError(f"{where} answered 200 without a JSON object holding an 'access' token")
        payload = _b64json(access.split(".")[1]) if access.count(".") == 2 else None
        exp = payload.get("exp") if isinstance(payload, dict) else None
        expires = float(exp) if isinstance(exp, (int, float)) and not isinstance(exp, bool) else 0.0
        key = (base_url, refresh)
        self._access.pop(key, None)
        while len(self._access) >= self.MAX_ENTRIES:
            self._access.pop(next(iter(self._access)))  # the oldest exchange
        self._access[key] = (access, (expires or time.time() + 300) - _TOKEN_SLACK_S)
        return access


def _access_from(raw: bytes | None) -> str | None:
    try:
        body = orjson.loads(raw) if raw else None
    except ValueError:
        return None
    access = body.get("access") if isinstance(body, dict) else None
    # Sent back in a header: refuse anything that could split or bloat it.
    if not isinstance(access, str) or not access or len(access) > 8192 or not access.isascii() or not access.isprintable():
        return None
    return access


async def _read_capped(resp: httpx.Response, limit: int) -> bytes | None:
    """The body, or None when it is over `limit` bytes."""
    chunks, size = [], 0
    async for chunk in resp.aiter_bytes():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


class ImageFetcher:
    """Fetches task images for one /predict call; share `tokens` (and the server budget) across calls.

    `budgets` are the byte budgets an image's bytes count against while it is held (`holding`)."""

    def __init__(self, config: FetchConfig, client: httpx.AsyncClient, tokens: TokenCache,
                 budgets: tuple[ByteBudget, ...] = ()):
        self.config = config
        self.client = client
        self.tokens = tokens
        self.budgets = budgets
        self.policy = config.policy()

    async def fetch(self, url: str, *, task_id: int | None = None) -> bytes:
        async with self.holding(url, task_id=task_id) as data:
            return data

    @contextlib.asynccontextmanager
    async def holding(self, url: str, *, task_id: int | None = None) -> AsyncIterator[bytes]:
        """The image's bytes, counted in the budgets until the block exits."""
        async with reservation(self.budgets) as held:
            yield await self._fetch(url, task_id, held)

    async def _fetch(self, url, task_id, held: Reservation) -> bytes:
        if not isinstance(url, str) or not url.strip():
            shown = repr(url[:100]) if isinstance(url, str) else f"a {type(url).__name__}"  # str() of a nested list recurses
            raise ImageFetchError(f"task image reference is not a URL: {shown}")
        url = url.strip()
        if url.startswith("data:"):
            return await self._data_uri(url, held)
        try:
            parsed = urllib.parse.urlsplit(url)
        except ValueError as exc:  # "http://[" and friends: this task fails, not the call
            raise ImageFetchError(f"task image URL {_redact(url)!r} is malformed: {exc}") from None
        if parsed.scheme in CLOUD_SCHEMES:
            return await self._presigned(url, task_id, held)
        if parsed.scheme in ("http", "https"):
            return await self._get(url, held, auth=self._same_origin(url))
        if parsed.scheme:
            raise ImageFetchError(f"unsupported URL scheme '{parsed.scheme[:20]}' in task image {_redact(url)!r}")
        local = await self._local_file(parsed, held)
        if local is not None:
            return local
        return await self._get(self._ls_url(url), held, auth=True)

    def _ls_url(self, path: str) -> str:
        if not self.config.url:
            raise ImageFetchError(
                f"task image {path[:100]!r} is relative to Label Studio, but LABEL_STUDIO_URL is not set"
            )
        if not self.config.url.startswith(("http://", "https://")):
            raise ImageFetchError(f"LABEL_STUDIO_URL must start with http:// or https://, got {self.config.url[:100]!r}")
        # The API key goes with this request: what reads as a media path ("/data/upload/../../api/x")
        # must be the path fetched, not another API that servers and proxies resolve it to.
        segments = urllib.parse.unquote(urllib.parse.urlsplit(path).path).replace("\\", "/").split("/")
        if any(segment in (".", "..") for segment in segments):
            raise ImageFetchError(f"task image path {path[:100]!r} has '.' or '..' segments")
        return f"{self.config.url}/{path.lstrip('/')}"

    def _same_origin(self, url: str) -> bool:
        """Only Label Studio's own origin ever sees its API key."""
        return bool(self.config.url) and origin(url) is not None and origin(url) == origin(self.config.url)

    async def _local_file(self, parsed: urllib.parse.SplitResult, held: Reservation) -> bytes | None:
        """/data/local-files/?d=... from the document root, /data/upload/... from the upload root;
        None: let Label Studio serve it."""
        path = parsed.path.rstrip("/")
        if path.endswith("/data/local-files") and self.config.document_root is not None:
            rel = urllib.parse.parse_qs(parsed.query).get("d", [""])[0]
            if not rel:
                raise ImageFetchError("local-files URL has no ?d= path")
            return await self._read_under(self.config.document_root, rel, "LOCAL_FILES_DOCUMENT_ROOT", held)
        if path.startswith("/data/upload/") and self.config.upload_root is not None and not parsed.query:
            rel = urllib.parse.unquote(path[len("/data/upload/"):])
            return await self._read_under(self.config.upload_root, rel, "labelstudio.upload_root", held)
        return None

    async def _read_under(self, root: Path, rel: str, setting: str, held: Reservation) -> bytes | None:
        root = root.resolve()
        try:
            path = (root / rel.lstrip("/")).resolve()
        except (OSError, ValueError) as exc:  # NUL bytes, loops
            raise ImageFetchError(f"local file {rel[:100]!r} is not a usable path: {exc}") from None
        if not path.is_relative_to(root):
            raise ImageFetchError(f"local file {rel[:100]!r} is outside {setting}")
        try:
            # is_file() raises, not answers False, for a name too long (ENAMETOOLONG) or unreadable
            if not path.is_file():
                if self.config.url:
                    return None
                raise ImageFetchError(f"local file {rel[:100]!r} not found under {setting}")
            size = path.stat().st_size
            if size > self.config.max_bytes:
                raise ImageFetchError(
                    f"local file {rel[:100]!r} is {size} bytes, over the {self.config.max_bytes}-byte limit")
            await held.reserve(size)
            return await asyncio.to_thread(path.read_bytes)
        except OSError as exc:
            raise ImageFetchError(f"local file {rel[:100]!r} under {setting} cannot be read: {exc.strerror}") from None

    async def _data_uri(self, url: str, held: Reservation) -> bytes:
        header, sep, payload = url[5:].partition(",")
        if not sep:
            raise ImageFetchError("malformed data: URI (no comma)")
        if len(payload) > self.config.max_bytes * 4 // 3 + 4:
            raise ImageFetchError(f"data: URI is over the {self.config.max_bytes}-byte limit")
        await held.reserve(len(payload))
        try:
            if header.endswith(";base64"):
                return base64.b64decode(payload, validate=False)
            return urllib.parse.unquote_to_bytes(payload)
        except (binascii.Error, ValueError) as exc:
            raise ImageFetchError(f"data: URI payload is not valid base64: {exc}") from None

    async def _presigned(self, uri: str, task_id, held: Reservation) -> bytes:
        # The id lands in a Label Studio path sent with our API key: an integer, never "../api/...".
        if not isinstance(task_id, int) or isinstance(task_id, bool):
            raise ImageFetchError(f"cloud storage URI {_redact(uri)!r} needs an integer task id to be presigned by Label Studio")
        fileuri = base64.urlsafe_b64encode(uri.encode()).decode()
        return await self._get(self._ls_url(f"/tasks/{task_id}/presign/?fileuri={fileuri}"), held, auth=True)

    async def auth_header(self) -> dict[str, str]:
        key = self.config.api_key
        if not key:
            return {}
        if is_jwt(key):
            access = await self.tokens.access_token(self.client, self.policy, self.config.url, key)
            return {"Authorization": f"Bearer {access}"}
        return {"Authorization": f"Token {key}"}

    async def _get(self, url: str, held: Reservation, *, auth: bool) -> bytes:
        # The size is unknown until the headers arrive: hold the most an image may be, and wait for it
        # here, before the clock starts and before any connection is open.
        await held.reserve(self.config.max_bytes)
        try:
            async with asyncio.timeout(self.config.timeout_s):
                return await self._get_within_deadline(url, held, auth=auth)
        except TimeoutError:
            raise FetchUnavailable(f"GET {_redact(url)} timed out after {self.config.timeout_s} s") from None

    async def _get_within_deadline(self, url: str, held: Reservation, *, auth: bool) -> bytes:
        headers = await self.auth_header() if auth else {}
        status, body = await self._follow(url, headers, held)
        if status == 401 and auth and self.config.api_key and is_jwt(self.config.api_key):
            self.tokens.forget(self.config.url, self.config.api_key)  # expired early: exchange once more
            status, body = await self._follow(url, await self.auth_header(), held)
        if status in (401, 403):
            hint = " (set LABEL_STUDIO_API_KEY" + ("; it was refused)" if headers else ")")
            raise ImageFetchError(f"GET {_redact(url)} answered {status}{hint if auth else ''}")
        if status in (429, 502, 503, 504):
            raise FetchUnavailable(f"GET {_redact(url)} answered {status}")
        if status != 200:
            raise ImageFetchError(f"GET {_redact(url)} answered {status}")
        if not body:
            raise ImageFetchError(f"GET {_redact(url)} returned an empty body")
        return body

    async def _follow(self, url: str, auth_headers: dict[str, str], held: Reservation) -> tuple[int, bytes]:
        """GET `url`, following redirects one hop at a time: each hop is checked and pinned anew, and
        the API key goes only to hops on Label Studio's origin."""
        for _hop in range(self.config.max_redirects + 1):
            # identity: images gain nothing from gzip, and a compressed body's Content-Length is not
            # its decoded size (the byte budget reserves what Content-Length says).
            headers = {**(auth_headers if auth_headers and self._same_origin(url) else {}),
                       "Accept-Encoding": "identity"}
            try:
                resp = await open_hop(self.client, self.policy, "GET", url, headers=headers)
            except httpx.TimeoutException:
                raise FetchUnavailable(f"GET {_redact(url)} timed out after {self.config.timeout_s} s") from None
            except httpx.TransportError as exc:  # refused, reset: the host may be back later
                raise FetchUnavailable(f"GET {_redact(url)} failed: {type(exc).__name__}: {exc}") from None
            except (httpx.HTTPError, httpx.InvalidURL, ValueError, UnicodeError) as exc:
                raise ImageFetchError(f"GET {_redact(url)} failed: {type(exc).__name__}: {exc}") from None
            try:
                location = resp.headers.get("location")
                if resp.status_code in REDIRECT_STATUSES and location:
                    try:
                        url = urllib.parse.urljoin(url, location.strip())
                    except ValueError:
                        raise ImageFetchError(f"GET {_redact(url)} redirected to a malformed URL") from None
                    continue
                if resp.status_code != 200:
                    return resp.status_code, b""
                return 200, await self._body(url, resp, held)
            finally:
                await resp.aclose()
        raise ImageFetchError(f"GET {_redact(url)}: more than {self.config.max_redirects} redirects")

    async def _body(self, url: str, resp: httpx.Response, held: Reservation) -> bytes:
        limit = self.config.max_bytes
        declared = resp.headers.get("content-length", "")
        size_hint = int(declared) if declared.isascii() and declared.isdigit() else None
        if resp.headers.get("content-encoding", "identity").strip().lower() not in ("", "identity"):
            size_hint = None  # sent encoded anyway: the decoded size is unknown until read (still capped)
        if size_hint is not None and size_hint > limit:
            raise ImageFetchError(f"GET {_redact(url)}: {size_hint} bytes, over the {limit}-byte limit")
        if size_hint is not None:
            held.shrink_to(size_hint)  # give back now what this image will not use
        chunks, size = [], 0
        try:
            async for chunk in resp.aiter_bytes():
                size += len(chunk)
                if size > limit or (size_hint is not None and size > size_hint):
                    raise ImageFetchError(f"GET {_redact(url)}: body over the {min(limit, size_hint or limit)}-byte limit")
                chunks.append(chunk)
        except httpx.TimeoutException:
            raise ImageFetchError(f"GET {_redact(url)} timed out after {self.config.timeout_s} s") from None
        except httpx.HTTPError as exc:
            raise ImageFetchError(f"GET {_redact(url)} failed: {type(exc).__name__}: {exc}") from None
        held.shrink_to(size)
        return b"".join(chunks)


def _redact(url: str) -> str:
    """Logs and job failures get the URL without its query (presign URIs and signed URLs carry
    secrets there) and without user:password@ (a task URL may carry them)."""
    try:
        parts = urllib.parse.urlsplit(without_userinfo(url[:2000]))
        return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))[:300]
    except ValueError:
        return url[:60] + "..."
