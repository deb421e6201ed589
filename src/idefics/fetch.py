"""An http(s) URL -> its bytes, bounded: one deadline for the whole fetch, a byte cap, every redirect checked and
counted. Credentials in a URL are sent (HTTP basic auth, to the first host only) and never shown."""
from __future__ import annotations

import base64
import http.client
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from urllib.parse import quote, unquote, urljoin, urlsplit, urlunsplit

from idefics.errors import IdeficsError, TooLarge, printable, reason

# Characters a URL may carry as they are: every printable ASCII character but the space. Others (non-ASCII text,
# spaces) are percent-encoded, as browsers do.
_URL_SAFE = "!#$%&'()*+,/:;=?@[]~"


def fetch(url: str, max_bytes: int, timeout: float, max_redirects: int, name: str | None = None) -> bytes:
    """GET an http(s) URL -> the body. `timeout` bounds everything (connecting, each redirect, headers, body):
    when it runs out the connection is shut and the fetch fails. Name resolution is the system's and is not
    bounded by it. `name` (default: the redacted URL) starts each error message."""
    name = name or shown(url)
    target, auth = checked_url(url, name)
    request = urllib.request.Request(target, headers={"User-Agent": "idefics"})
    if auth:
        request.add_unredirected_header("Authorization", auth)  # not sent on to a redirect's target
    deadline = _Deadline(timeout)
    opener = urllib.request.build_opener(_Redirects(name, max_redirects), _HTTPHandler(deadline),
                                         _HTTPSHandler(deadline))
    try:
        with deadline, opener.open(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > max_bytes:
                raise TooLarge(f"{name}: response is {length} bytes, over the limit of {max_bytes}")
            data = response.read(max_bytes + 1)
    except IdeficsError:
        raise
    except Exception as e:
        raise _error(e, name, deadline.expired, timeout) from None
    if deadline.expired:  # a shut connection can also read as a short answer
        raise IdeficsError(f"{name}: timed out after {timeout:g} s")
    if len(data) > max_bytes:
        raise TooLarge(f"{name}: response is over the limit of {max_bytes} bytes")
    if length is not None and length.isdigit() and len(data) < int(length):
        raise IdeficsError(f"{name}: the answer ended after {len(data)} of its {length} bytes")
    return data


def shown(url: str) -> str:
    """A URL as error messages show it: credentials redacted, escaped to one line, cut to 120 characters."""
    text = printable(redact(url))
    return text if len(text) <= 120 else text[:117] + "..."


def redact(url: str) -> str:
    """The URL with any user:password replaced by ***; works on malformed URLs too."""
    return re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/?#]*@", r"\1***@", url)


def checked_url(url: str, name: str) -> tuple[str, str | None]:
    """-> (the URL as sent: host IDNA-encoded, non-ASCII path percent-encoded, without credentials or fragment;
    the Authorization header its credentials make, or None). IdeficsError for anything http.client or the
    resolver would choke on."""
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        raise IdeficsError(f"{name}: invalid URL (control characters)")
    try:
        parts = urlsplit(url)
        port = parts.port  # parsed lazily: a non-numeric or out-of-range port raises here
    except ValueError as e:
        raise IdeficsError(f"{name}: invalid URL ({e})") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise IdeficsError(f"{name}: only http(s) URLs can be fetched")
    host = parts.hostname
    if not host:
        raise IdeficsError(f"{name}: invalid URL (no host)")
    if ":" not in host:  # IPv6 literals were checked by urlsplit
        try:
            host = host.encode("idna").decode("ascii")  # each label 1-63 characters, as DNS requires
        except UnicodeError:
            raise IdeficsError(f"{name}: invalid host name (a label is empty or longer than 63 characters)") \
                from None
        if len(host) > 253:
            raise IdeficsError(f"{name}: invalid host name (longer than 253 characters)")
    netloc = f"[{host}]" if ":" in host else host
    if port is not None:
        netloc += f":{port}"
    path = quote(parts.path, safe=_URL_SAFE) or "/"
    target = urlunsplit((parts.scheme.lower(), netloc, path, quote(parts.query, safe=_URL_SAFE), ""))
    auth = None
    if parts.username is not None or parts.password is not None:
        user_pass = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}"
        auth = "Basic " + base64.b64encode(user_pass.encode("utf-8")).decode("ascii")
    return target, auth


def _error(e: Exception, name: str, expired: bool, timeout: float) -> IdeficsError:
    """An exception out of urllib or http.client -> one line."""
    if isinstance(e, urllib.error.HTTPError):
        return IdeficsError(f"{name}: HTTP {e.code} {printable(' '.join(str(e.reason).split()))}")
    cause = e.reason if isinstance(e, urllib.error.URLError) and isinstance(e.reason, BaseException) else e
    if expired or isinstance(cause, TimeoutError):
        return IdeficsError(f"{name}: timed out after {timeout:g} s")
    return IdeficsError(f"{name}: cannot fetch ({reason(cause)})")


class _Deadline:
    """Bounds a whole fetch. Each connection waits at most the time left for each operation; when the time runs
    out a timer shuts every socket opened so far, which ends a read in progress however slowly bytes come."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds
        self.expired = False
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self):
        self._timer.start()
        return self

    def __exit__(self, *exc):
        self._timer.cancel()
        with self._lock:
            for s in self._sockets:
                s.close()
            self._sockets.clear()

    def connect(self, address, timeout=None, source_address=None, *args, **kwargs) -> socket.socket:
        """socket.create_connection, within the deadline."""
        left = self.end - time.monotonic()
        if left <= 0:
            raise TimeoutError("timed out")
        if isinstance(timeout, (int, float)):
            left = min(left, timeout)
        sock = socket.create_connection(address, left, source_address, *args, **kwargs)
        with self._lock:
            self._sockets.append(sock.dup())  # TLS takes over the original's descriptor; shutting a dup ends both
            if self.expired:
                self._shut(self._sockets[-1])
        return sock

    def _expire(self):
        with self._lock:
            self.expired = True
            for s in self._sockets:
                self._shut(s)

    @staticmethod
    def _shut(sock: socket.socket):
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already closed


def _within(connection_class, deadline: _Deadline):
    """A connection class for urllib's do_open whose sockets the deadline opens and watches."""

    def connection(host, **kwargs):
        c = connection_class(host, **kwargs)
        c._create_connection = deadline.connect  # http.client's own hook for opening its socket
        return c

    return connection


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, deadline: _Deadline):
        super().__init__()
        self.deadline = deadline

    def http_open(self, req):
        return self.do_open(_within(http.client.HTTPConnection, self.deadline), req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, deadline: _Deadline):
        super().__init__()
        self.deadline = deadline

    def https_open(self, req):
        return self.do_open(_within(http.client.HTTPSConnection, self.deadline), req, context=self._context)


class _Redirects(urllib.request.HTTPRedirectHandler):
    """Follows at most `limit` redirects, each to a URL checked as the first was (so never to ftp: or file:);
    a redirect's own body is not read."""

    def __init__(self, name: str, limit: int):
        super().__init__()
        self.name, self.limit, self.count = name, limit, 0
        self.max_repeats = self.max_redirections = limit + 1  # urllib's own loop check never comes first

    def http_error_302(self, req, fp, code, msg, headers):
        location = headers.get("location", headers.get("uri"))
        if location is not None:
            self.count += 1
            if self.count > self.limit:
                raise IdeficsError(f"{self.name}: more than {self.limit} redirects")
            target = urljoin(req.full_url, location)
            checked_url(target, f"{self.name}: redirect to {shown(target)}")
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, checked_url(newurl, self.name)[0])
        fp.close()  # urllib then reads nothing from it
        return new
