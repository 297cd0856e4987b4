"""Outbound HTTP for task images: which addresses may be reached, pinned connections, byte budgets.

Task data is written by whoever can create Label Studio tasks or call /predict, so an image URL is
untrusted: without a policy it reaches the server's own management port, cloud metadata
(169.254.169.254) and the private network. `AddressPolicy` resolves a host once, refuses
non-public addresses unless allow-listed, and the request is sent to that very address (Host header
and TLS SNI keep the name), so a DNS answer that changes between check and connect changes nothing.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import socket
import urllib.parse
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

import httpx

from ...errors import InvalidRequest

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ImageFetchError(InvalidRequest):
    code = "image_fetch_failed"


class FetchRefused(ImageFetchError):
    code = "image_fetch_refused"


class FetchUnavailable(ImageFetchError):
    """The image host timed out, could not be reached or answered 5xx/429: the same fetch may work
    later. /predict treats it like any fetch error; background jobs retry the task."""

    code = "image_fetch_unavailable"


def non_public(ip: IPAddress) -> str | None:
    """Why `ip` is not a public unicast address, or None when it is."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is loopback too, whatever Python < 3.13 says
    for name in ("loopback", "unspecified", "link_local", "multicast", "reserved", "private"):  # private covers most
        if getattr(ip, f"is_{name}"):
            return name.replace("_", "-")
    if isinstance(ip, ipaddress.IPv6Address) and (ip.is_site_local or ip.sixtofour is not None):
        return "site-local or 6to4"  # deprecated, and 6to4 embeds an IPv4 address that may be private
    if ip in _DEPRECATED_RELAY:
        return "6to4 relay anycast"
    return None if ip.is_global else "not globally routable"


# RFC 7526 deprecated it; Python still counts it global.
_DEPRECATED_RELAY = ipaddress.ip_network("192.88.99.0/24")


@dataclass(frozen=True, slots=True)
class Pinned:
    """One request's target: the URL with the checked IP in place of the host name."""

    url: httpx.URL
    host_header: str
    extensions: dict


class AddressPolicy:
    """Allow public addresses, allow-listed networks and host names (on any port: the operator
    listed them), and trusted origins: Label Studio's (host, port) whatever the host resolves to.

    An origin, not a host: trusting "127.0.0.1" because Label Studio runs on 127.0.0.1:8089 would let
    any caller's task URL reach every other loopback port, detserve's own management API included."""

    def __init__(self, allow: Iterable[str] = (), trusted_origins: Iterable[tuple[str, int]] = (),
                 resolve_timeout_s: float = 5.0):
        self.networks: list[IPNetwork] = []
        self.hosts: set[str] = set()
        for entry in allow:
            try:
                self.networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                self.hosts.add(entry.lower().rstrip("."))
        self.origins = {(h.lower().rstrip("."), port) for h, port in trusted_origins if h}
        self.resolve_timeout_s = resolve_timeout_s

    def allows(self, host: str, ip: IPAddress, port: int) -> str | None:
        """None when `host`:`port` at `ip` may be reached; else the reason it may not."""
        name = host.lower().rstrip(".")
        if name in self.hosts or (name, port) in self.origins or any(ip in net for net in self.networks):
            return None
        return non_public(ip)

    async def pin(self, url: str) -> Pinned:
        try:
            parsed = httpx.URL(url)
            host = parsed.raw_host.decode("ascii")  # IDNA names as their xn-- form, as DNS and SNI see them
        except (httpx.InvalidURL, ValueError, UnicodeError) as exc:
            raise ImageFetchError(f"task image URL {_short(url)} is malformed: {exc}") from None
        if parsed.scheme not in ("http", "https") or not host:
            raise ImageFetchError(f"task image URL {_short(url)} needs an http(s) scheme and a host")
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        ip = await self._resolve(host, port)
        extensions = {"sni_hostname": host} if parsed.scheme == "https" else {}
        return Pinned(url=parsed.copy_with(host=str(ip)), host_header=parsed.netloc.decode("ascii"), extensions=extensions)

    async def _resolve(self, host: str, port: int) -> IPAddress:
        try:
            addresses = [ipaddress.ip_address(host)]
        except ValueError:
            loop = asyncio.get_running_loop()
            try:
                infos = await asyncio.wait_for(
                    loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), self.resolve_timeout_s
                )
            except (OSError, UnicodeError, asyncio.TimeoutError) as exc:
                raise ImageFetchError(f"cannot resolve {host!r}: {exc or 'timed out'}") from None
            # Scope ids ("fe80::1%eth0") are dropped: link-local is refused unless allow-listed anyway.
            addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
        reasons = []
        for ip in addresses:
            reason = self.allows(host, ip, port)
            if reason is None:
                return ip
            reasons.append(f"{ip} is {reason}")
        raise FetchRefused(
            f"refusing to fetch from {host!r}: {', '.join(reasons) or 'no address'}; allow it with "
            "labelstudio.fetch_allow (a CIDR or the host name) if it is meant to be reachable"
        )


async def open_hop(
    client: httpx.AsyncClient, policy: AddressPolicy, method: str, url: str, *, headers: dict[str, str] | None = None,
    json: dict | None = None,
) -> httpx.Response:
    """Send one request (no redirects followed) to the pinned address; the caller closes the response."""
    target = await policy.pin(url)
    request = client.build_request(
        method, target.url, headers={**(headers or {}), "Host": target.host_header}, json=json,
        extensions=target.extensions,
    )
    return await client.send(request, stream=True, follow_redirects=False)


def pinned_client(*, verify: bool, timeout_s: float) -> httpx.AsyncClient:
    """A client for `open_hop`. No keep-alive: pooled connections are keyed by IP, so a TLS connection
    made for one name must never carry a request for another name on the same address. No proxies
    from the environment: a proxy would resolve the name itself, after our check."""
    return httpx.AsyncClient(
        verify=verify, timeout=timeout_s, follow_redirects=False, trust_env=False,
        limits=httpx.Limits(max_keepalive_connections=0),
    )


def _short(url: str, limit: int = 120) -> str:
    return repr(url if len(url) <= limit else url[:limit] + "...")


def without_userinfo(url: str) -> str:
    """`url` less any user:password@ (unchanged when it has none, or does not parse)."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return url
    if "@" not in parts.netloc:
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def origin(url: str) -> tuple[str, str, int | None] | None:
    """(scheme, host, port) with the default port filled in; None for a malformed URL."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
        return parts.scheme, (parts.hostname or "").lower(), port
    except ValueError:
        return None


# ---- byte budgets ------------------------------------------------------------------------------

class ByteBudget:
    """A semaphore counted in bytes, first come first served, so a large image is not starved by small ones."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.used = 0
        self.peak = 0
        self._waiters: collections.deque[tuple[int, asyncio.Future]] = collections.deque()

    async def acquire(self, n: int) -> int:
        n = min(n, self.capacity)
        if not self._waiters and self.used + n <= self.capacity:
            self._take(n)
            return n
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append((n, waiter))
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release(n)  # granted just as we were cancelled
            else:
                self._waiters.remove((n, waiter))
                self._wake()
            raise
        return n

    def release(self, n: int) -> None:
        self.used -= n
        self._wake()

    def _take(self, n: int) -> None:
        self.used += n
        self.peak = max(self.peak, self.used)

    def _wake(self) -> None:
        while self._waiters and self.used + self._waiters[0][0] <= self.capacity:
            n, waiter = self._waiters.popleft()
            if not waiter.done():
                self._take(n)
                waiter.set_result(None)


class Reservation:
    """Bytes one image holds in every budget (its call's and the server's) until released.

    Budgets are always taken in the same order, so two reservations never wait on each other."""

    def __init__(self, budgets: tuple[ByteBudget, ...]):
        self.budgets = budgets
        self.held = [0] * len(budgets)  # per budget: acquire() caps a request at the capacity

    async def reserve(self, n: int) -> None:
        """Hold at least `n` bytes in every budget (waits while they are spent by others)."""
        for i, budget in enumerate(self.budgets):
            need = min(n, budget.capacity) - self.held[i]
            if need > 0:
                self.held[i] += await budget.acquire(need)

    def shrink_to(self, n: int) -> None:
        for i, budget in enumerate(self.budgets):
            extra = self.held[i] - n
            if extra > 0:
                budget.release(extra)
                self.held[i] = n

    def release(self) -> None:
        self.shrink_to(0)


@contextlib.asynccontextmanager
async def reservation(budgets: tuple[ByteBudget, ...]) -> AsyncIterator[Reservation]:
    held = Reservation(budgets)
    try:
        yield held
    finally:
        held.release()
