"""One HTTP(S) GET, checked at every hop: the crawler's only way onto the network.

- SSRF guard: the host is resolved first and every address it resolves to must be public
  (`ipaddress.is_global`, and not a cloud metadata address); private, loopback, link-local,
  reserved, multicast and unspecified addresses are refused unless the host name is in
  `allow_hosts`. The check runs again on every redirect hop.
- No DNS rebinding: the connection goes to an address that was checked (the pinned connection
  classes below), while the Host header and TLS SNI/certificate check use the host name.
- Caps: redirects are followed by hand (each hop checked, at most `max_redirects`); the body is
  streamed and reading stops past `max_bytes`; gzip/deflate bodies are decompressed here with the
  same cap on the decompressed size, so a gzip bomb is dropped after reading ~max_bytes of output;
  `timeout_s` bounds a whole attempt (connect, headers and body), so a server that hangs or
  trickles times out.
- Retries: 5xx, 429, timeouts and dropped connections are retried with exponential backoff
  (backoff_s * 2**attempt); anything else fails at once.

Every failure is a `FetchError` with a short reason (`blocked_private`, `http_404`, `timeout`,
`too_large`, `gzip_bomb`, ...) that the crawl stage counts.
"""
from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import time
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable
from urllib.parse import quote, urljoin, urlsplit, urlunsplit

# cloud metadata endpoints: AWS/GCP/Azure/OpenStack, AWS over IPv6, Alibaba, AWS ECS task metadata
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200", "169.254.170.2")
)
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
URL_SAFE = "!$%&'()*+,/:;=?@~"  # reserved characters kept as they are; the rest is percent-encoded
CHUNK = 64 * 1024


class FetchError(Exception):
    """A page that could not be fetched; `reason` is the short name the crawl stage counts."""

    def __init__(self, reason: str, detail: str = "", retryable: bool = False):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.retryable = retryable


@dataclass(frozen=True)
class Response:
    url: str  # what was asked for
    final_url: str  # after redirects
    status: int
    content_type: str  # the header as sent, e.g. "text/html; charset=utf-8"
    body: bytes  # decoded from gzip/deflate
    fetched_at: datetime


@dataclass(frozen=True)
class FetchPolicy:
    user_agent: str
    timeout_s: float = 20.0
    retries: int = 2
    backoff_s: float = 0.5
    max_redirects: int = 5
    max_bytes: int = 5_000_000
    allow_hosts: frozenset[str] = frozenset()  # host names (or IP literals) exempt from the SSRF guard


# -- URLs ------------------------------------------------------------------------------------------


def normalize_url(url: str) -> str | None:
    """Canonical form used as the crawl's key, or None when the URL is not crawlable.

    Lower-cases scheme and host (IDNA-encoded), drops the default port and the fragment, turns an
    empty path into "/" and percent-encodes what HTTP cannot carry (spaces, non-ASCII). URLs with
    user info (`http://a@b/`) are refused: they are a classic way to hide the host.
    """
    try:
        parts = urlsplit(url.strip())
        port = parts.port
        host = parts.hostname.encode("idna").decode("ascii") if parts.hostname else ""
    except (ValueError, UnicodeError):
        return None
    if parts.scheme.lower() not in ("http", "https") or not host or parts.username is not None:
        return None
    scheme = parts.scheme.lower()
    host = host.lower()
    if ":" in host:
        host = f"[{host}]"
    if port is not None and port != (80 if scheme == "http" else 443):
        host = f"{host}:{port}"
    path = quote(parts.path or "/", safe=URL_SAFE)
    return urlunsplit((scheme, host, path, quote(parts.query, safe=URL_SAFE), ""))


def origin(url: str) -> str:
    """scheme://host[:port] of a normalized URL: the unit robots.txt and politeness apply to."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


# -- SSRF guard ------------------------------------------------------------------------------------


def blocked_reason(address: str) -> str | None:
    """Why connecting to `address` is refused (None when it is a public address)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id
    if ip.version == 6 and ip.ipv4_mapped is not None:  # ::ffff:10.0.0.1 is 10.0.0.1
        ip = ip.ipv4_mapped
    if ip in METADATA_ADDRESSES:
        return "metadata"
    for name in ("loopback", "link_local", "multicast", "unspecified", "private", "reserved"):
        if getattr(ip, f"is_{name}"):
            return name
    if not ip.is_global:  # shared address space (100.64/10), documentation ranges, ...
        return "non_global"
    return None


def resolve(host: str, port: int, allow_hosts: frozenset[str]) -> list[str]:
    """The addresses to connect to, after checking every address `host` resolves to."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise FetchError("dns_error", f"{host}: {e}") from None
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    if not addresses:
        raise FetchError("dns_error", f"{host}: no address")
    if host.lower() not in allow_hosts:
        # refuse when ANY address is internal: a round-robin name must not smuggle one in
        for address in addresses:
            reason = blocked_reason(address)
            if reason is not None:
                raise FetchError(f"blocked_{reason}", f"{host} resolves to {address}")
    return addresses


def _connect(addresses: list[str], port: int, timeout: float) -> socket.socket:
    """A connection to the first checked address that answers (a name may have IPv6 and IPv4)."""
    error: OSError = OSError(f"no address to connect to on port {port}")
    for address in addresses:
        try:
            return socket.create_connection((address, port), timeout)
        except OSError as e:
            error = e
    raise error


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Connects to the checked addresses; Host comes from the host name given to the constructor.

    `body_sock` stays set after http.client drops `sock` on a closing response, so the body
    reader can still shorten its timeout.
    """

    def __init__(self, host: str, port: int, addresses: list[str], timeout: float):
        super().__init__(host, port, timeout=timeout)
        self._addresses = addresses

    def connect(self) -> None:
        self.sock = self.body_sock = _connect(self._addresses, self.port, self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """As above, with SNI and certificate verification against the host name, not the address."""

    def __init__(self, host: str, port: int, addresses: list[str], timeout: float, context: ssl.SSLContext):
        super().__init__(host, port, timeout=timeout, context=context)
        self._addresses = addresses

    def connect(self) -> None:
        sock = _connect(self._addresses, self.port, self.timeout)
        self.sock = self.body_sock = self._context.wrap_socket(sock, server_hostname=self.host)


# -- fetching --------------------------------------------------------------------------------------


class Fetcher:
    """GETs URLs under a `FetchPolicy`. Thread-safe: it keeps no per-request state.

    `check_hop(url)` is asked about every redirect target and returns a reason to refuse it
    (out of scope, disallowed by robots.txt) or None.
    """

    def __init__(self, policy: FetchPolicy, check_hop: Callable[[str], str | None] | None = None):
        self.policy = policy
        self.check_hop = check_hop
        self._tls = ssl.create_default_context()

    def get(self, url: str, content_types: tuple[str, ...] | None = None, follow_checks: bool = True) -> Response:
        """Fetch `url`, following redirects; raises FetchError.

        content_types: media types accepted for the final 2xx response (None = any).
        follow_checks: ask `check_hop` about redirect targets (off for robots.txt and sitemaps).
        """
        first = current = normalize_url(url)
        if first is None:
            raise FetchError("bad_url", url)
        for hop in range(self.policy.max_redirects + 1):
            if hop and follow_checks and self.check_hop is not None:
                reason = self.check_hop(current)
                if reason is not None:
                    raise FetchError(f"redirect_{reason}", current)
            status, location, content_type, body = self._with_retries(current, content_types)
            if status in REDIRECT_STATUSES and location:
                target = normalize_url(urljoin(current, location))
                if target is None:
                    raise FetchError("redirect_bad_url", location)
                current = target
                continue
            if not 200 <= status < 300:
                raise FetchError(f"http_{status}", current)
            return Response(first, current, status, content_type, body, datetime.now(timezone.utc))
        raise FetchError("too_many_redirects", f"more than {self.policy.max_redirects} from {url}")

    def _with_retries(self, url: str, content_types: tuple[str, ...] | None) -> tuple[int, str, str, bytes]:
        p = self.policy
        for attempt in range(p.retries + 1):
            last = attempt == p.retries
            try:
                result = self._attempt(url, content_types)
            except FetchError as e:
                if not e.retryable or last:
                    raise
            else:
                if result[0] not in RETRY_STATUSES or last:
                    return result
            time.sleep(p.backoff_s * 2**attempt)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _attempt(self, url: str, content_types: tuple[str, ...] | None) -> tuple[int, str, str, bytes]:
        """One request: (status, Location, Content-Type, body); the body only for 2xx responses."""
        p = self.policy
        deadline = time.monotonic() + p.timeout_s
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        addresses = resolve(parts.hostname, port, p.allow_hosts)
        if parts.scheme == "https":
            conn: _PinnedHTTPConnection | _PinnedHTTPSConnection = _PinnedHTTPSConnection(parts.hostname, port, addresses, p.timeout_s, self._tls)
        else:
            conn = _PinnedHTTPConnection(parts.hostname, port, addresses, p.timeout_s)
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        try:
            conn.request("GET", path, headers={
                "User-Agent": p.user_agent,
                "Accept": "text/html,application/xhtml+xml,text/plain;q=0.9,*/*;q=0.5",
                "Accept-Encoding": "gzip, deflate",
            })
            resp = conn.getresponse()
            content_type = resp.getheader("Content-Type", "") or ""
            location = resp.getheader("Location", "") or ""
            if not 200 <= resp.status < 300:
                return resp.status, location, content_type, b""
            if content_types is not None and media_type(content_type) not in content_types:
                raise FetchError("content_type", f"{media_type(content_type) or 'none'} at {url}")
            length = resp.getheader("Content-Length")
            if length and length.isdigit() and int(length) > p.max_bytes:
                raise FetchError("too_large", f"Content-Length {length} > {p.max_bytes} at {url}")
            body = _read_body(resp, conn, deadline, p.max_bytes, (resp.getheader("Content-Encoding") or "").strip().lower())
            return resp.status, location, content_type, body
        except (TimeoutError, socket.timeout):
            raise FetchError("timeout", f"no complete response within {p.timeout_s}s from {url}", retryable=True) from None
        except ssl.SSLError as e:
            raise FetchError("tls_error", f"{url}: {e}") from None
        except (ConnectionError, http.client.HTTPException, OSError) as e:
            raise FetchError("connection_error", f"{url}: {type(e).__name__} {e}", retryable=True) from None
        finally:
            conn.close()


def _read_body(resp: http.client.HTTPResponse, conn: "_PinnedHTTPConnection | _PinnedHTTPSConnection", deadline: float, max_bytes: int, encoding: str) -> bytes:
    """Stream the body, stopping past max_bytes of wire bytes or of decompressed bytes."""
    if encoding in ("", "identity"):
        decoder = None
    elif encoding in ("gzip", "x-gzip", "deflate"):
        decoder = zlib.decompressobj(32 + zlib.MAX_WBITS)  # 32: accept a gzip or a zlib header
    else:
        raise FetchError("unsupported_encoding", encoding)
    out = bytearray()
    wire = 0
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise socket.timeout()
            conn.body_sock.settimeout(remaining)  # the reader under resp honours it per recv
            chunk = resp.read1(CHUNK)
            if not chunk:
                break
            wire += len(chunk)
            if wire > max_bytes:
                raise FetchError("too_large", f"more than {max_bytes} bytes")
            if decoder is None:
                out += chunk
                continue
            # max_length caps what one call may produce; input it did not consume stays in
            # unconsumed_tail, which is only left over when the output is already past the cap
            out += decoder.decompress(chunk, max_bytes + 1 - len(out))
            if len(out) > max_bytes or decoder.unconsumed_tail:
                raise FetchError("gzip_bomb", f"{wire} {encoding} bytes decompress to more than {max_bytes}")
        if decoder is not None:
            out += decoder.flush()
            if len(out) > max_bytes:
                raise FetchError("gzip_bomb", f"{wire} {encoding} bytes decompress to more than {max_bytes}")
    except zlib.error as e:
        raise FetchError("decode_error", f"{encoding}: {e}") from None
    return bytes(out)
