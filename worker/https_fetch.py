"""Fetching one ``https://`` reference, which a submitter wrote, from inside the farm's network.

- Each host is resolved once and refused unless every address is public or allowed by
  ``KLEINFARM_REFERENCE_ALLOW_HOSTS``; the connection goes to that checked address (a second lookup
  could answer differently: DNS rebinding) and TLS verifies the certificate against the host name.
- At most 5 redirects, https only, each hop checked the same way.
- One deadline for the whole fetch (lookup, connect, TLS, redirects, every read) and a byte limit:
  a slow or endless server must not hold a GPU worker.
- One message for every way a connection fails (no lookup, refused, silent, reset, bad TLS): a job's
  error must not tell a submitter which internal ports answer. The cause goes to the worker's log.
"""

from __future__ import annotations

import functools
import http.client
import io
import ipaddress
import logging
import socket
import ssl
import string
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast
from urllib.parse import quote, urljoin, urlsplit

from kleinfarm.shared.errors import (
    ConfigError,
    ReferenceImageError,
    ReferenceNotFoundError,
    ReferenceRefusedError,
    ReferenceTooLargeError,
)
from kleinfarm.shared.locators import redact
from kleinfarm.shared.settings import FarmSettings

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
SocketAddress = tuple[str, int] | tuple[str, int, int, int]

MAX_REDIRECTS = 5
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
GONE_STATUSES = frozenset({404, 410})
CHUNK_BYTES = 64 * 1024
HTTPS_PORT = 443
_SPECIAL = ("is_private", "is_loopback", "is_link_local", "is_multicast", "is_reserved", "is_unspecified")
# Not public, whatever this Python's flags say (3.11's is_global passes 192.0.0.0/24, for one).
_NON_PUBLIC_TEXT = "0.0.0.0/8 100.64.0.0/10 192.0.0.0/24 198.18.0.0/15 224.0.0.0/4 240.0.0.0/4 100::/64 2001::/23 "
_NON_PUBLIC_TEXT += "2001:db8::/32 64:ff9b:1::/48 fc00::/7 fe80::/10 fec0::/10 ff00::/8"
_NON_PUBLIC = tuple(ipaddress.ip_network(network) for network in _NON_PUBLIC_TEXT.split())
_NAT64 = ipaddress.ip_network("64:ff9b::/96")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HttpsPolicy:
    """What an https fetch may reach, for how long and how many bytes."""

    allow_hosts: tuple[str, ...] = ()
    deadline_s: float = 30.0
    max_bytes: int = 50 * 1024 * 1024
    ca_bundle: Path | None = None

    @classmethod
    def from_settings(cls, settings: FarmSettings) -> HttpsPolicy:
        policy = cls(
            settings.allowed_reference_hosts,
            settings.reference_fetch_deadline_s,
            settings.reference_max_bytes,
            settings.reference_ca_bundle,
        )
        try:  # a bad CA file is the operator's mistake: say so at start-up, not in every job's error
            _tls_context(policy.ca_bundle)
        except OSError as error:
            raise ConfigError(f"KLEINFARM_REFERENCE_CA_BUNDLE={policy.ca_bundle} cannot be used: {error}") from error
        return policy

    def allows(self, host: str, address: IPAddress) -> bool:
        """Whether the allow-list names ``host`` or holds ``address`` (or the IPv4 address inside it)."""
        names, networks = _allow_list(self.allow_hosts)
        candidates = {address, _embedded_ipv4(address) or address}
        return _normal(host) in names or any(ip in network for network in networks for ip in candidates)


def fetch_https(url: str, policy: HttpsPolicy) -> bytes:
    """The body of ``url`` under ``policy``; a kleinfarm reference error naming the rule otherwise."""
    return _Fetch(url, _shown(url), policy, time.monotonic() + policy.deadline_s).run()


def is_public(address: IPAddress) -> bool:
    """Whether ``address`` is public unicast; an IPv4 address carried inside IPv6 is judged as itself."""
    embedded = _embedded_ipv4(address)
    if embedded is not None:
        return is_public(embedded)
    special = any(getattr(address, flag) for flag in _SPECIAL) or any(address in net for net in _NON_PUBLIC)
    return address.is_global and not special


def _embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one stands for (mapped, 6to4, NAT64): the one it reaches."""
    if isinstance(address, ipaddress.IPv4Address):
        return None
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address.ipv4_mapped or address.sixtofour


def _normal(host: str) -> str:
    return host.strip().lower().rstrip(".")


@functools.lru_cache(maxsize=16)
def _allow_list(entries: tuple[str, ...]) -> tuple[frozenset[str], tuple[IPNetwork, ...]]:
    """The allow-list as host names and networks (an address is a network of one)."""
    names, networks = set(), []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError:
            names.add(_normal(entry))
    return frozenset(names), tuple(networks)


@functools.lru_cache(maxsize=4)
def _tls_context(ca_bundle: Path | None) -> ssl.SSLContext:
    """Certificate and host name verified: against ``ca_bundle`` alone when set, else the system's CAs."""
    return ssl.create_default_context(cafile=str(ca_bundle) if ca_bundle else None)


def _shown(url: str) -> str:
    """``url`` as messages may show it: no userinfo or query (they may hold credentials)."""
    try:
        return redact(url)
    except ValueError:  # urlsplit refuses it (an unbalanced [): show nothing of it
        return "(an https:// URL that cannot be parsed)"


@dataclass(frozen=True)
class _Hop:
    """One request of a fetch: its URL, where it goes and the bytes it sends."""

    url: str
    host: str
    port: int
    request: bytes


@dataclass(frozen=True)
class _Address:
    family: socket.AddressFamily
    sockaddr: SocketAddress
    ip: IPAddress


@dataclass(frozen=True)
class _Fetch:
    url: str
    shown: str
    policy: HttpsPolicy
    deadline: float  # time.monotonic() at which the whole fetch gives up

    def run(self) -> bytes:
        current = self.url
        for _ in range(MAX_REDIRECTS + 1):
            hop = self.hop(current)
            with self.response(hop) as response:
                if response.status not in REDIRECT_STATUSES:
                    return self.content(response, hop)
                current = self.redirect_target(response, hop)
        raise ReferenceRefusedError(f"reference {self.shown} refused: it redirects more than {MAX_REDIRECTS} times")

    def left(self) -> float:
        """Seconds left; every socket operation is given only these, so no slow peer outlasts them."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the fetch's deadline passed")
        return left

    def hop(self, url: str) -> _Hop:
        try:
            parts = urlsplit(url)
            host, port = parts.hostname or "", parts.port or HTTPS_PORT
            header = _host_header(host, port)
        except ValueError:  # a bad port, an unbalanced [ or a name IDNA cannot encode
            raise ReferenceImageError(f"reference {self.shown} is not a valid https:// URL") from None
        if not host or parts.scheme != "https":
            raise ReferenceImageError(f"reference {self.shown} is not a valid https:// URL")
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        # Spaces, controls and non-ASCII are percent-encoded: they must not split the request line.
        request = (
            f"GET {quote(target, safe=string.punctuation)} HTTP/1.1\r\nHost: {header}\r\n"
            "User-Agent: kleinfarm\r\nAccept: image/*\r\nConnection: close\r\n\r\n"
        )
        return _Hop(url, host, port, request.encode("ascii"))

    @contextmanager
    def response(self, hop: _Hop) -> Iterator[http.client.HTTPResponse]:
        """Check the hop's addresses, connect to one, send the request and read the response's head."""
        try:
            addresses = self.resolve(hop)
        except OSError as error:
            raise self.unreachable(hop, error) from None
        if not all(is_public(address.ip) or self.policy.allows(hop.host, address.ip) for address in addresses):
            raise ReferenceRefusedError(
                f"reference {self.shown} refused: {hop.host} resolves to a non-public address; "
                "allow it with KLEINFARM_REFERENCE_ALLOW_HOSTS"
            )
        tls: ssl.SSLSocket | None = None
        try:
            tls = self.connect(hop, addresses)
            tls.settimeout(self.left())
            tls.sendall(hop.request)
            # http.client parses the response, reading through the deadline rather than the socket.
            response = http.client.HTTPResponse(cast(socket.socket, _DeadlineReader(tls, self)), method="GET")
            response.begin()
        except (OSError, http.client.HTTPException) as error:
            if tls is not None:
                tls.close()
            raise self.unreachable(hop, error) from None
        try:
            yield response
        finally:
            response.close()
            tls.close()

    def resolve(self, hop: _Hop) -> list[_Address]:
        """One lookup, in a daemon thread: the resolver's own timeouts may outlast the deadline."""
        answer: Future[list[_Address]] = Future()

        def lookup() -> None:
            try:
                infos = socket.getaddrinfo(hop.host, hop.port, type=socket.SOCK_STREAM)
            except (OSError, UnicodeError) as error:
                answer.set_exception(OSError(f"lookup failed: {error}"))
                return
            found = [
                _Address(family, cast(SocketAddress, sockaddr), ipaddress.ip_address(sockaddr[0]))
                for family, _, _, _, sockaddr in infos
                if family in (socket.AF_INET, socket.AF_INET6)
            ]
            answer.set_result(list(dict.fromkeys(found)))

        threading.Thread(target=lookup, name="kleinfarm-resolve", daemon=True).start()
        addresses = answer.result(timeout=self.left())  # its TimeoutError is an OSError, as is a failed lookup
        if not addresses:
            raise OSError(f"{hop.host} has no IPv4 or IPv6 address")
        return addresses

    def connect(self, hop: _Hop, addresses: list[_Address]) -> ssl.SSLSocket:
        """TLS to the first checked address that answers; its certificate must name ``hop.host``."""
        failure = OSError("no address")
        for address in addresses:
            raw = socket.socket(address.family, socket.SOCK_STREAM)
            try:
                raw.settimeout(self.left())
                raw.connect(address.sockaddr)
                raw.settimeout(self.left())  # CPython bounds the whole handshake by this timeout
                return _tls_context(self.policy.ca_bundle).wrap_socket(raw, server_hostname=hop.host)
            except OSError as error:
                raw.close()
                log.info("https reference host %s at %s: %r", hop.host, address.ip, error)
                failure = error
        raise failure

    def content(self, response: http.client.HTTPResponse, hop: _Hop) -> bytes:
        if response.status in GONE_STATUSES:
            raise ReferenceNotFoundError(f"reference {self.shown} does not exist (HTTP {response.status})")
        if response.status != 200:
            raise ReferenceNotFoundError(f"reference {self.shown} could not be fetched: HTTP {response.status}")
        limit = self.policy.max_bytes
        too_large = ReferenceTooLargeError(
            f"reference {self.shown} is over {limit} bytes: the limit is {limit} (KLEINFARM_REFERENCE_MAX_BYTES)"
        )
        if response.length is not None and response.length > limit:
            raise too_large
        chunks, size = [], 0
        try:
            while chunk := response.read(CHUNK_BYTES):
                size += len(chunk)
                if size > limit:
                    raise too_large
                chunks.append(chunk)
        except TimeoutError:  # the server answered: saying it is slow tells no more than its status did
            raise ReferenceNotFoundError(
                f"reference {self.shown} took longer than the {self.policy.deadline_s:g} s deadline "
                "(KLEINFARM_REFERENCE_FETCH_DEADLINE_S)"
            ) from None
        except (OSError, http.client.HTTPException) as error:
            raise self.unreachable(hop, error) from None
        return b"".join(chunks)

    def redirect_target(self, response: http.client.HTTPResponse, hop: _Hop) -> str:
        location = (response.getheader("Location") or "").strip()
        if not location:
            raise ReferenceNotFoundError(f"reference {self.shown} could not be fetched: HTTP {response.status}")
        try:
            target = urljoin(hop.url, location)
            scheme = urlsplit(target).scheme
        except ValueError:
            raise ReferenceImageError(f"reference {self.shown} redirects to an invalid URL") from None
        if scheme != "https":
            raise ReferenceRefusedError(
                f"reference {self.shown} refused: {hop.host} redirects to a non-https URL ({_shown(target)})"
            )
        return target

    def unreachable(self, hop: _Hop, cause: BaseException) -> ReferenceNotFoundError:
        """The one message for every connection failure; the cause is logged, never shown."""
        log.info("https reference %s from %s failed: %r", self.shown, hop.host, cause)
        return ReferenceNotFoundError(
            f"reference {self.shown} could not be fetched: no HTTPS answer from {hop.host} "
            f"(unreachable, refused, failed TLS or past the {self.policy.deadline_s:g} s deadline)"
        )


def _host_header(host: str, port: int) -> str:
    try:
        name = f"[{host}]" if ipaddress.ip_address(host).version == 6 else host
    except ValueError:
        name = host.encode("idna").decode("ascii")
    return name if port == HTTPS_PORT else f"{name}:{port}"


class _DeadlineReader(io.RawIOBase):
    """Stands for the socket http.client reads from: each read is given only the time left."""

    def __init__(self, tls: ssl.SSLSocket, fetch: _Fetch) -> None:
        super().__init__()
        self._tls, self._fetch = tls, fetch

    def makefile(self, mode: str) -> io.BufferedReader:
        return io.BufferedReader(self)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        # A server dripping a byte at a time returns from every read; the deadline still runs out.
        self._tls.settimeout(self._fetch.left())
        return self._tls.recv_into(buffer)
