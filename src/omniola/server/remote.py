"""Remote media fetching (`--allow-remote-media`) that cannot be turned against the server's own network.

A URL is fetched only if every address its host resolves to is a public unicast address; the connection then goes
to the address that was checked (the URL's host is sent as `Host` and as the TLS server name), so a second DNS
answer cannot swap it (DNS rebinding). Redirects are followed by hand, each hop checked the same way. The whole
fetch, redirects and body included, has one deadline. Error texts name neither the address, the port, the remote
status nor the URL's credentials.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urljoin

import httpx

MAX_REDIRECTS = 3
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # the IPv4 address is the last 32 bits

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
# Name lookups block a thread for as long as the resolver takes (seconds when DNS is unreachable): they get threads of
# their own, so slow lookups cannot occupy the event loop's default pool, where text requests are tokenized.
_DNS_POOL = ThreadPoolExecutor(4, thread_name_prefix="omniola-dns")


class FetchRefused(Exception):
    """A remote media URL was not fetched; the message is safe to return to the client."""


def is_public_address(ip: Address) -> bool:
    """Whether `ip` is a public unicast address: not loopback, private, link-local, multicast, unspecified or
    reserved, including IPv4 addresses carried inside IPv6 ones (mapped, 6to4, NAT64)."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (
            ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF) if ip in _NAT64 else None)
        if embedded is not None:
            return is_public_address(embedded)
        if ip.teredo:
            return False
    return ip.is_global and not ip.is_multicast


async def resolve(host: str, port: int) -> list[Address]:
    """Every address `host` resolves to (an IP literal, in any spelling the C library accepts, to itself)."""
    loop = asyncio.get_running_loop()
    infos = await loop.run_in_executor(_DNS_POOL, lambda: socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
    return [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]


class RemoteMediaFetcher:
    """Fetches http(s) media URLs under the rules above.

    Args:
        timeout_s: deadline of one fetch, from the first DNS lookup to the last body byte.
        max_bytes: largest body accepted.
        domains: if not empty, only these domains (and their subdomains) are fetched.
        resolver: `(host, port) -> addresses` (tests inject one).
        address_allowed: the address rule (tests widen it to their loopback server).
    """

    def __init__(self, timeout_s: float, max_bytes: int, domains: tuple[str, ...] = (), *,
                 resolver: Callable[[str, int], Awaitable[list[Address]]] = resolve,
                 address_allowed: Callable[[Address], bool] = is_public_address):
        self.timeout_s, self.max_bytes = timeout_s, max_bytes
        self.domains = tuple(d.lower().strip(".") for d in domains if d.strip("."))
        self.resolver, self.address_allowed = resolver, address_allowed

    async def fetch(self, url: str) -> bytes:
        """The body of `url`. Raises `FetchRefused` with a message safe to show."""
        try:
            async with asyncio.timeout(self.timeout_s):
                return await self._fetch(url)
        except TimeoutError:
            raise FetchRefused(f"the media URL could not be fetched within {self.timeout_s:g} s") from None

    async def _fetch(self, url: str) -> bytes:
        async with httpx.AsyncClient(follow_redirects=False, trust_env=False, timeout=None) as client:
            for _ in range(MAX_REDIRECTS + 1):
                target, headers, extensions = await self._pinned(url)
                try:
                    async with client.stream("GET", target, headers=headers, extensions=extensions) as response:
                        if response.is_redirect and "location" in response.headers:
                            url = urljoin(url, response.headers["location"])
                            continue
                        if response.status_code != 200:
                            raise FetchRefused("the media URL could not be fetched (the remote server did not "
                                               "answer with the file)")
                        declared = response.headers.get("content-length", "")
                        if declared.isdigit() and int(declared) > self.max_bytes:
                            raise FetchRefused(f"the remote media is larger than {self.max_bytes} bytes")
                        body = bytearray()
                        async for block in response.aiter_bytes():
                            body += block
                            if len(body) > self.max_bytes:
                                raise FetchRefused(f"the remote media is larger than {self.max_bytes} bytes")
                        return bytes(body)
                except httpx.HTTPError:
                    raise FetchRefused("the media URL could not be fetched (no connection, or the transfer "
                                       "failed)") from None
        raise FetchRefused(f"the media URL redirects more than {MAX_REDIRECTS} times")

    async def _pinned(self, url: str) -> tuple[httpx.URL, dict[str, str], dict]:
        """Checks one hop's URL and address; returns the URL to connect to (its host replaced by the checked
        address), the headers and the TLS extensions that keep the original name."""
        try:
            parsed = httpx.URL(url)
        except (httpx.InvalidURL, TypeError, ValueError):
            raise FetchRefused("the media URL is not a valid URL") from None
        if parsed.scheme not in ("http", "https"):
            raise FetchRefused("the media URL (or a redirect) is not http(s)")
        if parsed.userinfo:
            raise FetchRefused("media URLs with credentials are not accepted")
        host = parsed.host.lower().rstrip(".")
        if not host:
            raise FetchRefused("the media URL has no host")
        if self.domains and not any(host == d or host.endswith("." + d) for d in self.domains):
            raise FetchRefused("the media URL's host is not on this server's list of allowed domains")
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            addresses = await self.resolver(host, port)
        except (OSError, UnicodeError, ValueError):
            raise FetchRefused("the media URL's host could not be resolved") from None
        if not addresses or not all(self.address_allowed(ip) for ip in addresses):
            raise FetchRefused("the media URL's host is not a public address (loopback, private, link-local, "
                               "multicast and unspecified addresses are refused)")
        headers = {"Host": parsed.netloc.decode("ascii")}
        extensions = {"sni_hostname": host} if parsed.scheme == "https" else {}
        return parsed.copy_with(host=str(addresses[0])), headers, extensions
