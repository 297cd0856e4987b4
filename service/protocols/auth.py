"""Optional bearer-token auth with separate token sets for the inference and management APIs.

Every door (REST, KServe V2, gRPC metadata) calls `TokenAuth.check`; an empty set leaves that API
open. Tokens come from the settings lists (and so from DETSERVE_AUTH__* env vars) and from token
files holding one token per line.

Why hash before comparing: `hmac.compare_digest` is constant-time only for equal lengths, so both
sides are reduced to sha256 digests first; and every configured token is compared on every call
(no early exit), so neither the position of a match nor a shared prefix shows up in the timing.
"""
from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Literal

from ..errors import ConfigError, PermissionDenied, Unauthenticated
from ..settings import AuthSettings

Api = Literal["inference", "management"]
APIS: tuple[Api, ...] = ("inference", "management")

Comparator = Callable[[bytes, bytes], bool]


def read_token_file(path: str | Path) -> list[str]:
    """One token per line; blank lines and lines starting with '#' are skipped."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read token file: {exc}") from None
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def parse_bearer(authorization: str | None) -> str:
    """The token of an `Authorization: Bearer <token>` value; Unauthenticated when absent or malformed."""
    if authorization is None or not authorization.strip():
        raise Unauthenticated("missing bearer token: send 'Authorization: Bearer <token>'")
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        raise Unauthenticated("malformed Authorization header: expected 'Bearer <token>'")
    return token


def authorization_from_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The `authorization` value from gRPC invocation metadata (keys arrive lower-cased)."""
    for key, value in metadata or ():
        if key.lower() == "authorization":
            return value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    return None


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


class TokenAuth:
    """Checks `Authorization` values against the configured token sets.

    `compare` is injectable so tests can observe that every configured token is compared.
    """

    def __init__(
        self,
        inference_tokens: Iterable[str] = (),
        management_tokens: Iterable[str] = (),
        *,
        compare: Comparator = hmac.compare_digest,
    ):
        self._digests: dict[Api, tuple[bytes, ...]] = {
            "inference": _unique_digests(inference_tokens),
            "management": _unique_digests(management_tokens),
        }
        self._compare = compare

    @classmethod
    def from_settings(cls, settings: AuthSettings, *, compare: Comparator = hmac.compare_digest) -> TokenAuth:
        inference = list(settings.inference_tokens)
        management = list(settings.management_tokens)
        if settings.inference_tokens_file is not None:
            inference += read_token_file(settings.inference_tokens_file)
        if settings.management_tokens_file is not None:
            management += read_token_file(settings.management_tokens_file)
        return cls(inference, management, compare=compare)

    def enabled(self, api: Api) -> bool:
        """True when `api` has tokens configured, i.e. requests to it must authenticate."""
        return bool(self._digests[_known(api)])

    @property
    def token_count(self) -> int:
        return sum(len(d) for d in self._digests.values())

    def check(self, api: Api, authorization: str | None) -> None:
        """Return when the request may use `api`; raise Unauthenticated or PermissionDenied otherwise."""
        if not self.enabled(api):
            return
        presented = _digest(parse_bearer(authorization))
        matches = {name: self._matches(presented, digests) for name, digests in self._digests.items()}
        if matches[api]:
            return
        other = "management" if api == "inference" else "inference"
        if matches[other]:
            raise PermissionDenied(f"this token is valid for the {other} API, not the {api} API")
        raise Unauthenticated("invalid bearer token")

    def _matches(self, presented: bytes, digests: tuple[bytes, ...]) -> bool:
        found = False
        for expected in digests:
            # `|` rather than `or`: keep comparing after a match so the loop length never depends on it.
            found = self._compare(presented, expected) | found
        return found

    def describe(self) -> str:
        """A start-up log fragment; never includes tokens."""
        parts = [f"{api}: {'token auth on' if self.enabled(api) else 'open'}" for api in APIS]
        return ", ".join(parts)


def _unique_digests(tokens: Iterable[str]) -> tuple[bytes, ...]:
    cleaned = []
    for token in tokens:
        token = token.strip()
        if not token:
            continue
        if any(ch.isspace() for ch in token):
            raise ConfigError("auth tokens must not contain whitespace")
        cleaned.append(token)
    return tuple(dict.fromkeys(_digest(t) for t in cleaned))


def _known(api: str) -> Api:
    if api not in APIS:
        raise ValueError(f"unknown api {api!r}; expected one of {APIS}")
    return api  # type: ignore[return-value]
