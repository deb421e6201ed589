"""A request's images (http(s) URLs and data URIs) -> PIL images, without blocking the event loop.

A URL is fetched with httpx, one hop at a time: each hop's host is resolved here and every address it resolves to
must be public (unless allow_private_image_urls), and the connection goes to the address that was checked (the
Host header and TLS name stay the URL's), so a name that resolves differently the second time cannot reach a
private address. Redirects are followed up to max_redirects, each checked like the first URL; the whole fetch has
one timeout, the body a byte cap, and the content must be an image. Decoding goes through the library's
load_image (its allow-listed formats and pixel limit), in a worker thread."""
from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import urljoin, urlsplit

import httpx
from PIL import Image

from idefics.errors import IdeficsError, TooLarge
from idefics.images import ImageLimits, describe, load_image
from idefics.server.protocol import APIError
from idefics.server.settings import Settings

REDIRECTS = (301, 302, 303, 307, 308)
CONTENT_TYPES = ("image/", "application/octet-stream")  # what a server may call an image; the decoder decides


class Fetcher:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.limits = ImageLimits(max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels,
                                  timeout=settings.image_timeout)
        self.client: httpx.AsyncClient | None = None  # made on first use, inside the server's event loop

    async def aclose(self):
        if self.client is not None:
            await self.client.aclose()

    async def images(self, urls: list[tuple[str, str]]) -> list[Image.Image]:
        """(url, where) pairs -> their images, fetched and decoded side by side."""
        return list(await asyncio.gather(*(self.image(url, where) for url, where in urls)))

    async def image(self, url: str, where: str) -> Image.Image:
        scheme = urlsplit(url).scheme.lower() if "://" in url else ""
        if url.startswith("data:"):
            source = url
        elif scheme in ("http", "https"):
            if not self.settings.image_urls:
                raise APIError(400, f"{where}: this server does not fetch image URLs; send the image as a data URI",
                               param=where)
            source = await self._fetch(url, where)
        else:
            raise APIError(400, f"{where}: an image must be an http(s) URL or a data URI, got {describe(url)}",
                           param=where)
        try:
            return await asyncio.to_thread(load_image, source, self.limits)
        except IdeficsError as e:
            raise APIError(413 if isinstance(e, TooLarge) else 400, f"{where}: {e}", param=where) from None

    async def _fetch(self, url: str, where: str) -> bytes:
        name = describe(url)
        try:
            async with asyncio.timeout(self.settings.image_timeout):
                return await self._follow(url, where)
        except TimeoutError:
            raise APIError(400, f"{where}: {name}: no answer within {self.settings.image_timeout:g} s",
                           param=where) from None
        except httpx.HTTPError as e:
            raise APIError(400, f"{where}: {name}: cannot fetch ({type(e).__name__}: {e})", param=where) from None

    async def _follow(self, url: str, where: str) -> bytes:
        if self.client is None:
            self.client = httpx.AsyncClient(follow_redirects=False, trust_env=False,
                                            timeout=httpx.Timeout(self.settings.image_timeout),
                                            headers={"User-Agent": "idefics"})
        cap = self.settings.max_image_bytes
        for _ in range(self.settings.max_redirects + 1):
            name = describe(url)
            target, headers, extensions = await self._pin(url, where)
            request = self.client.build_request("GET", target, headers=headers, extensions=extensions)
            response = await self.client.send(request, stream=True)
            try:
                if response.status_code in REDIRECTS and "location" in response.headers:
                    url = urljoin(url, response.headers["location"])
                    continue
                if response.status_code != 200:
                    raise APIError(400, f"{where}: {name}: HTTP {response.status_code}", param=where)
                kind = response.headers.get("content-type", "").split(";")[0].strip().lower()
                if kind and not kind.startswith(CONTENT_TYPES):
                    raise APIError(400, f"{where}: {name}: not an image (content type {kind})", param=where)
                length = response.headers.get("content-length", "")
                if length.isdigit() and int(length) > cap:
                    raise APIError(413, f"{where}: {name}: {length} bytes, over the limit of {cap}", param=where)
                data = bytearray()
                async for chunk in response.aiter_bytes():
                    data += chunk
                    if len(data) > cap:
                        raise APIError(413, f"{where}: {name}: over the limit of {cap} bytes", param=where)
                return bytes(data)
            finally:
                await response.aclose()
        raise APIError(400, f"{where}: {describe(url)}: more than {self.settings.max_redirects} redirects",
                       param=where)

    async def _pin(self, url: str, where: str) -> tuple[str, dict, dict]:
        """A URL -> the same URL with its host replaced by a checked address, the Host header and the TLS name."""
        name = describe(url)
        parts = urlsplit(url)
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            raise APIError(400, f"{where}: {name}: only http(s) URLs with a host can be fetched", param=where)
        https = parts.scheme.lower() == "https"
        try:
            port = parts.port or (443 if https else 80)
        except ValueError:
            raise APIError(400, f"{where}: {name}: invalid port", param=where) from None
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as e:
            raise APIError(400, f"{where}: {name}: cannot resolve {parts.hostname} ({e})", param=where) from None
        addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
        if not addresses:
            raise APIError(400, f"{where}: {name}: cannot resolve {parts.hostname}", param=where)
        if not self.settings.allow_private_image_urls:
            for a in addresses:
                mapped = getattr(a, "ipv4_mapped", None) or a
                if not mapped.is_global or mapped.is_multicast:
                    raise APIError(400, f"{where}: {name}: refused, {parts.hostname} is a private, loopback or "
                                   "link-local address", param=where)
        a = addresses[0]
        host = f"[{a}]" if a.version == 6 else str(a)
        target = parts._replace(netloc=f"{host}:{port}").geturl()
        headers = {"Host": parts.netloc.rpartition("@")[2]}
        return target, headers, {"sni_hostname": parts.hostname} if https else {}
