"""The gateway's upstream transport: httpx's request/response API over aiohttp's client.

httpx's own transport (httpcore) costs the gateway most of its CPU under concurrency: it parses HTTP/1.1 in pure
Python (h11), and every request walks the whole connection pool asking each connection whether it has expired
(a socket query per connection), so a pool of 64 busy connections costs O(64) per request. Measured with a cheap
SSE upstream, 32 chunks a request at concurrency 64: 9.9 ms of gateway CPU per request with httpcore, most of
it in `AsyncConnectionPool._assign_requests_to_connections`. aiohttp parses in C (llhttp) and keeps idle
connections in a per-host queue. The gateway keeps httpx's API (its error types, `Response.aiter_raw`, and the
in-process ASGI transport the tests use); this class maps aiohttp's errors onto httpx's so the gateway's answers
stay the same: nothing listening -> `httpx.ConnectError` (503), the connection dropped before an answer ->
`httpx.RemoteProtocolError` (502), mid-stream -> `httpx.ReadError` (the stream's closing error event), a stalled
connect or read -> `httpx.ConnectTimeout` / `httpx.ReadTimeout` (504).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import httpx

# headers aiohttp writes itself from the body and URL; httpx's copies would be sent twice
_SET_BY_AIOHTTP = frozenset({b"host", b"content-length", b"transfer-encoding"})


def _mapped(exc: BaseException, *, reading_body: bool) -> httpx.HTTPError:
    """The httpx error the gateway handles for an aiohttp (or socket) error."""
    msg = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return httpx.ConnectTimeout(msg)
    if isinstance(exc, TimeoutError):  # SocketTimeoutError (sock_read) and any other read timeout
        return httpx.ReadTimeout(msg)
    if isinstance(exc, aiohttp.ClientConnectorError):  # refused, unreachable, DNS: nothing took the request
        return httpx.ConnectError(msg)
    if reading_body:
        return httpx.ReadError(msg)
    # disconnected or reset before the status line, or a malformed answer
    return httpx.RemoteProtocolError(msg)


class _Body(httpx.AsyncByteStream):
    """An aiohttp response's body as it arrives. Closing it before the end closes the connection (the upstream
    sees the client leave: vLLM aborts the generation); after the end the connection goes back to the pool."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self._done = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise _mapped(exc, reading_body=True) from exc
        self._done = True

    async def aclose(self) -> None:
        if self._done:
            self._response.release()
        else:
            self._response.close()


class AiohttpTransport(httpx.AsyncBaseTransport):
    """An `httpx.AsyncBaseTransport` over one aiohttp `ClientSession` (created on first use, in the running loop).

    `max_connections` bounds the open upstream connections; `keepalive_s` is how long an idle one is kept (below
    the upstream's own keep-alive timeout, uvicorn's 5 s, so the gateway does not reuse one the upstream is
    closing). Timeouts come from the httpx client (`connect`, `read`; `pool` counts toward connect). Never reads
    proxy settings from the environment."""

    def __init__(self, max_connections: int = 512, keepalive_s: float = 4.0) -> None:
        self.max_connections = max_connections
        self.keepalive_s = keepalive_s
        self._session: aiohttp.ClientSession | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=self.max_connections, limit_per_host=0, keepalive_timeout=self.keepalive_s
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                auto_decompress=False,  # bytes pass through as the upstream sent them
                trust_env=False,
                timeout=aiohttp.ClientTimeout(total=None),
                skip_auto_headers=("user-agent", "accept-encoding", "accept", "content-type"),
            )
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        t = request.extensions.get("timeout", {})
        connect, pool = t.get("connect"), t.get("pool")
        timeout = aiohttp.ClientTimeout(
            total=None,
            connect=None if connect is None or pool is None else connect + pool,
            sock_connect=connect,
            sock_read=t.get("read"),
        )
        headers = [
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, v in request.headers.raw
            if k.lower() not in _SET_BY_AIOHTTP
        ]
        body = await request.aread()
        try:
            response = await self._get_session().request(
                request.method,
                str(request.url),
                headers=headers,
                data=body or None,
                allow_redirects=False,
                timeout=timeout,
                compress=None,
            )
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise _mapped(exc, reading_body=False) from exc
        return httpx.Response(
            status_code=response.status,
            headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in response.raw_headers],
            stream=_Body(response),
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": (response.reason or "").encode()},
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
