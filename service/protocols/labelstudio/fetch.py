"""Fetching task images the way Label Studio's own tools do (`get_local_path`), but async.

URL forms: `/data/upload/...` and other LS-relative paths (fetched from LABEL_STUDIO_URL with the
API key), `/data/local-files/?d=...` (read from LOCAL_FILES_DOCUMENT_ROOT when the file is there),
`s3://`/`gs://`/`azure-blob://` (presigned through LS), plain http(s), and data: URIs.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import httpx

from ...errors import InvalidRequest

CLOUD_SCHEMES = ("s3", "gs", "azure-blob")
_TOKEN_SLACK_S = 30.0  # refresh an access token this long before it expires


class ImageFetchError(InvalidRequest):
    code = "image_fetch_failed"


@dataclass(frozen=True, slots=True)
class FetchConfig:
    """Where Label Studio is and how to reach it; resolved from settings, env and /setup."""

    url: str | None = None  # LS base URL, no trailing slash; may carry a path prefix
    api_key: str | None = None
    document_root: Path | None = None
    timeout_s: float = 10.0
    max_bytes: int = 32 * 1024 * 1024
    verify_ssl: bool = True


def is_jwt(token: str) -> bool:
    """Personal access tokens are JWT refresh tokens; legacy tokens are 40 hex characters."""
    parts = token.split(".")
    if len(parts) != 3:
        return False
    header = _b64json(parts[0])
    return isinstance(header, dict) and "alg" in header


def _b64json(segment: str):
    try:
        return json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (binascii.Error, ValueError):
        return None


class TokenCache:
    """Access tokens obtained by exchanging a personal access token at /api/token/refresh/."""

    def __init__(self) -> None:
        self._access: dict[tuple[str, str], tuple[str, float]] = {}
        self._lock = asyncio.Lock()

    def forget(self, base_url: str, refresh: str) -> None:
        self._access.pop((base_url, refresh), None)

    async def access_token(self, client: httpx.AsyncClient, base_url: str, refresh: str) -> str:
        async with self._lock:  # one exchange for a whole batch of concurrent fetches
            cached = self._access.get((base_url, refresh))
            if cached and cached[1] > time.time():
                return cached[0]
            try:
                resp = await client.post(f"{base_url}/api/token/refresh/", json={"refresh": refresh})
            except httpx.HTTPError as exc:
                raise ImageFetchError(f"cannot exchange the personal access token at {base_url}: {exc}") from None
            if resp.status_code != 200:
                raise ImageFetchError(
                    f"{base_url}/api/token/refresh/ answered {resp.status_code}: the personal access token "
                    "(LABEL_STUDIO_API_KEY) was refused"
                )
            access = resp.json().get("access", "")
            payload = _b64json(access.split(".")[1]) if access.count(".") == 2 else None
            expires = float(payload.get("exp", 0)) if isinstance(payload, dict) else 0.0
            self._access[(base_url, refresh)] = (access, (expires or time.time() + 300) - _TOKEN_SLACK_S)
            return access


class ImageFetcher:
    """Fetches task images for one /predict call; share `tokens` across calls."""

    def __init__(self, config: FetchConfig, client: httpx.AsyncClient, tokens: TokenCache):
        self.config = config
        self.client = client
        self.tokens = tokens

    async def fetch(self, url: str, *, task_id: int | None = None) -> bytes:
        if not isinstance(url, str) or not url.strip():
            raise ImageFetchError(f"task image reference is not a URL: {url!r}")
        url = url.strip()
        if url.startswith("data:"):
            return self._data_uri(url)
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme in CLOUD_SCHEMES:
            return await self._presigned(url, task_id)
        if parsed.scheme in ("http", "https"):
            return await self._get(url, auth=self._same_host(url))
        if parsed.scheme:
            raise ImageFetchError(f"unsupported URL scheme '{parsed.scheme}' in task image {url!r}")
        local = self._local_file(parsed)
        if local is not None:
            return local
        return await self._get(self._ls_url(url), auth=True)

    def _ls_url(self, path: str) -> str:
        if not self.config.url:
            raise ImageFetchError(
                f"task image {path!r} is relative to Label Studio, but LABEL_STUDIO_URL is not set"
            )
        if not self.config.url.startswith(("http://", "https://")):
            raise ImageFetchError(f"LABEL_STUDIO_URL must start with http:// or https://, got {self.config.url!r}")
        return f"{self.config.url}/{path.lstrip('/')}"

    def _same_host(self, url: str) -> bool:
        if not self.config.url:
            return False
        a, b = urllib.parse.urlsplit(url), urllib.parse.urlsplit(self.config.url)
        return (a.scheme, a.netloc) == (b.scheme, b.netloc)

    def _local_file(self, parsed: urllib.parse.SplitResult) -> bytes | None:
        """Read /data/local-files/?d=... from the document root; None: let Label Studio serve it."""
        if not parsed.path.rstrip("/").endswith("/data/local-files") or self.config.document_root is None:
            return None
        rel = urllib.parse.parse_qs(parsed.query).get("d", [""])[0]
        if not rel:
            raise ImageFetchError("local-files URL has no ?d= path")
        root = self.config.document_root.resolve()
        path = (root / rel.lstrip("/")).resolve()
        if not path.is_relative_to(root):
            raise ImageFetchError(f"local file {rel!r} is outside LOCAL_FILES_DOCUMENT_ROOT")
        if not path.is_file():
            if self.config.url:
                return None
            raise ImageFetchError(f"local file {rel!r} not found under LOCAL_FILES_DOCUMENT_ROOT")
        size = path.stat().st_size
        if size > self.config.max_bytes:
            raise ImageFetchError(f"local file {rel!r} is {size} bytes, over the {self.config.max_bytes}-byte limit")
        return path.read_bytes()

    def _data_uri(self, url: str) -> bytes:
        header, sep, payload = url[5:].partition(",")
        if not sep:
            raise ImageFetchError("malformed data: URI (no comma)")
        if len(payload) > self.config.max_bytes * 4 // 3 + 4:
            raise ImageFetchError(f"data: URI is over the {self.config.max_bytes}-byte limit")
        try:
            if header.endswith(";base64"):
                return base64.b64decode(payload, validate=False)
            return urllib.parse.unquote_to_bytes(payload)
        except (binascii.Error, ValueError) as exc:
            raise ImageFetchError(f"data: URI payload is not valid base64: {exc}") from None

    async def _presigned(self, uri: str, task_id: int | None) -> bytes:
        if task_id is None:
            raise ImageFetchError(f"cloud storage URI {uri!r} needs a task id to be presigned by Label Studio")
        fileuri = base64.urlsafe_b64encode(uri.encode()).decode()
        return await self._get(self._ls_url(f"/tasks/{task_id}/presign/?fileuri={fileuri}"), auth=True)

    async def _auth_header(self) -> dict[str, str]:
        key = self.config.api_key
        if not key:
            return {}
        if is_jwt(key):
            return {"Authorization": f"Bearer {await self.tokens.access_token(self.client, self.config.url, key)}"}
        return {"Authorization": f"Token {key}"}

    async def _get(self, url: str, *, auth: bool) -> bytes:
        headers = await self._auth_header() if auth else {}
        status, body = await self._stream(url, headers)
        if status == 401 and auth and self.config.api_key and is_jwt(self.config.api_key):
            self.tokens.forget(self.config.url, self.config.api_key)  # expired early: exchange once more
            status, body = await self._stream(url, await self._auth_header())
        if status in (401, 403):
            hint = " (set LABEL_STUDIO_API_KEY" + ("; it was refused)" if headers else ")")
            raise ImageFetchError(f"GET {_redact(url)} answered {status}{hint if auth else ''}")
        if status != 200:
            raise ImageFetchError(f"GET {_redact(url)} answered {status}")
        if not body:
            raise ImageFetchError(f"GET {_redact(url)} returned an empty body")
        return body

    async def _stream(self, url: str, headers: dict[str, str]) -> tuple[int, bytes]:
        limit = self.config.max_bytes
        try:
            async with self.client.stream("GET", url, headers=headers, timeout=self.config.timeout_s) as resp:
                if resp.status_code != 200:
                    return resp.status_code, b""
                declared = resp.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > limit:
                    raise ImageFetchError(f"GET {_redact(url)}: {declared} bytes, over the {limit}-byte limit")
                chunks, size = [], 0
                async for chunk in resp.aiter_bytes():
                    size += len(chunk)
                    if size > limit:
                        raise ImageFetchError(f"GET {_redact(url)}: body over the {limit}-byte limit")
                    chunks.append(chunk)
                return 200, b"".join(chunks)
        except httpx.TimeoutException:
            raise ImageFetchError(f"GET {_redact(url)} timed out after {self.config.timeout_s} s") from None
        except httpx.HTTPError as exc:
            raise ImageFetchError(f"GET {_redact(url)} failed: {type(exc).__name__}: {exc}") from None


def _redact(url: str) -> str:
    """Logs get the URL without its query (presign URIs and signed URLs carry secrets there)."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
