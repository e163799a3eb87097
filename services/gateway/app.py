"""The gateway's ASGI app: auth, limits, aliases and canaries in front of an OpenAI-compatible upstream.

Request path for POST /v1/chat/completions, /v1/completions, /v1/embeddings:
  401 (key) -> 413 (body size) -> 400 (JSON; the OpenAI schema of the endpoint, services/gateway/schema.py)
  -> 404 (model) -> 429 (rate limit) -> the body goes upstream with `model` rewritten to the served id -> the
  response streams back byte for byte (SSE events pass through as they arrive; a stream the upstream breaks off
  ends with an OpenAI-format error event); an upstream error body is rewritten to OpenAI's shape, same status; an upstream that refuses connections (no healthy replica) gives 503 + Retry-After.
Every response carries X-Request-ID; proxied ones also X-Tulpar-Model (public name) and X-Tulpar-Served-Model.

Two ASGI apps: `app` (the public port: the API, GET /health -> {"status": "ok"} or 503, GET /livez) and `admin_app`
(the admin port, not for clients: GET /metrics, GET /health with the upstream and alias details).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from jobs.platform import registry
from services.gateway.config import GatewayConfig
from services.gateway.errors import error_body, error_response, normalize_error_body
from services.gateway.keys import ApiKey, KeyStore
from services.gateway.metrics import GatewayMetrics
from services.gateway.ratelimit import BucketStore, Limits, RateLimiter
from services.gateway.routing import Router
from services.gateway.schema import RequestError, RequestLimits, validate_request
from services.gateway.upstream import AiohttpTransport

log = logging.getLogger("tulpar.gateway")

PROXIED = ("chat/completions", "completions", "embeddings")
_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "date",
    "server",
}
_MIN_MODELS_REFETCH_S = (
    5.0  # an unknown model triggers at most one upstream /v1/models read per this interval
)


class _TooLarge(Exception):
    pass


def _split_events(data: bytes) -> tuple[bytes, bytes]:
    """(complete SSE events, the incomplete rest): events end with a blank line."""
    end = max(
        data.rfind(b"\n\n") + 2 if b"\n\n" in data else 0,
        data.rfind(b"\r\n\r\n") + 4 if b"\r\n\r\n" in data else 0,
    )
    return data[:end], data[end:]


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


class _Relay(StreamingResponse):
    """A StreamingResponse that always closes its iterator (and so the upstream response), also when the client
    disconnects mid-stream: closing the upstream connection lets vLLM abort the generation."""

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]


@dataclass
class Caller:
    name: str
    limits: Limits


class Gateway:
    """Everything one gateway process holds; `app` is its ASGI application."""

    def __init__(
        self,
        cfg: GatewayConfig,
        *,
        router: Router | None = None,
        keystore: KeyStore | None = None,
        upstream_transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.cfg = cfg
        self.metrics = GatewayMetrics()
        self.limiter = RateLimiter(store=BucketStore(cfg.state_dir) if cfg.state_dir else None)
        self.request_limits = RequestLimits(**cfg.request_limits.model_dump())
        self._upstream_transport = upstream_transport  # tests: an in-process fake upstream
        self.keystore = keystore
        if self.keystore is None and cfg.auth.enabled:
            self.keystore = KeyStore(cfg.auth.keys_file, cfg.auth.keys_env, reload_s=cfg.auth.reload_s)
            if not len(self.keystore):
                raise ValueError(
                    "auth is enabled but no API keys are configured: set auth.keys_file (a mounted Secret) or "
                    f"${cfg.auth.keys_env} (make keys with `python -m services.gateway.keys new --name NAME`), "
                    "or set auth.enabled=false for a local, trusted setup"
                )
        if router is None:
            tracking = cfg.mlflow_tracking_uri
            if tracking is None and any(
                registry.is_registered(t.model) for a in cfg.aliases.values() for t in a.targets
            ):
                from jobs.platform.runtime import Settings

                tracking = Settings.from_env().mlflow_tracking_uri
            router = Router(
                cfg.aliases,
                tracking_uri=tracking,
                served_name_template=cfg.served_name_template,
                allow_served_ids=cfg.allow_served_ids,
            )
        self.router = router
        self.upstream_key = os.environ.get(cfg.upstream.api_key_env or "", "") or None
        self.upstream_ok: bool | None = None
        self.upstream_error: str | None = None
        self._models_fetched_at = -math.inf
        self._models_lock = asyncio.Lock()
        self._client: httpx.AsyncClient | None = None
        self._pbkdf2 = anyio.CapacityLimiter(1)  # bounds the CPU that wrong keys can burn
        self._tasks: list[asyncio.Task] = []
        self.resolve_aliases(strict=cfg.require_resolved_aliases)
        self.app = self._build_app()
        self.admin_app = self._build_admin_app()

    # ------------------------------------------------------------------ startup and background refresh

    def resolve_aliases(self, *, strict: bool) -> list[str]:
        errors = self.router.refresh()
        self.metrics.alias_refresh.labels("error" if errors else "ok").inc()
        self.metrics.set_alias_table(self.router.table())
        if errors and strict:
            raise ValueError(
                "model aliases could not be resolved: "
                + "; ".join(errors)
                + " (or set require_resolved_aliases=false to start anyway and answer 503 until they resolve)"
            )
        for e in errors:
            log.error("%s", e)
        return errors

    async def fetch_upstream_models(self) -> None:
        assert self._client is not None
        try:
            resp = await self._client.get(
                f"{self.cfg.upstream.base_url}/models", headers=self._upstream_headers()
            )
            resp.raise_for_status()
            ids = [m["id"] for m in resp.json().get("data", []) if isinstance(m, dict) and "id" in m]
            self.router.set_upstream_models(ids)
            self.upstream_ok, self.upstream_error = True, None
        except (httpx.HTTPError, ValueError, AttributeError) as exc:
            self.upstream_ok, self.upstream_error = False, f"{type(exc).__name__}: {exc}"
            log.warning("upstream %s/models: %s", self.cfg.upstream.base_url, self.upstream_error)
        self._models_fetched_at = time.monotonic()

    async def _every(self, seconds: float, fn) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                await fn()
            except Exception:  # keep refreshing whatever one round did
                log.exception("background refresh failed")

    async def _refresh_aliases(self) -> None:
        await anyio.to_thread.run_sync(lambda: self.resolve_aliases(strict=False))

    async def _reload_keys(self) -> None:
        if self.keystore is not None:
            await anyio.to_thread.run_sync(self.keystore.maybe_reload)

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        up = self.cfg.upstream
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(up.read_timeout_s, connect=up.connect_timeout_s),
            trust_env=False,  # never send loopback/in-cluster traffic through an HTTP(S)_PROXY
            # aiohttp underneath unless a test passes an in-process transport (services/gateway/upstream.py)
            transport=self._upstream_transport or AiohttpTransport(max_connections=up.max_connections),
        )
        await self.fetch_upstream_models()
        self._tasks = [asyncio.create_task(self._every(up.models_refresh_s, self.fetch_upstream_models))]
        if self.router.needs_registry:
            self._tasks.append(
                asyncio.create_task(self._every(self.cfg.alias_refresh_s, self._refresh_aliases))
            )
        if self.keystore is not None and self.cfg.auth.keys_file is not None:
            self._tasks.append(asyncio.create_task(self._every(self.cfg.auth.reload_s, self._reload_keys)))
        try:
            yield
        finally:
            for t in self._tasks:
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._client.aclose()
            if self.limiter.store is not None:
                self.limiter.store.close()

    # ------------------------------------------------------------------ helpers

    def _upstream_headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.upstream_key}"} if self.upstream_key else {}

    def _default_limits(self) -> Limits:
        rl = self.cfg.rate_limits
        return Limits(rl.requests_per_minute, rl.request_burst, rl.tokens_per_minute)

    def _limits_for(self, key: ApiKey) -> Limits:
        d = self._default_limits()
        return Limits(
            key.requests_per_minute or d.requests_per_minute,
            key.request_burst or d.request_burst,
            key.tokens_per_minute or d.tokens_per_minute,
        )

    async def authenticate(self, request: Request) -> Caller | Response:
        if self.keystore is None:
            return Caller("anonymous", self._default_limits())
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            self.metrics.auth_failures.labels("missing").inc()
            return error_response(
                401,
                "You didn't provide an API key. You need to provide your API key in an Authorization header "
                "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                code="missing_api_key",
                headers={"www-authenticate": "Bearer"},
            )
        if self.keystore.is_cheap(token):
            key = self.keystore.verify(token)
        else:
            key = await anyio.to_thread.run_sync(self.keystore.verify, token, limiter=self._pbkdf2)
        if key is None:
            self.metrics.auth_failures.labels("invalid").inc()
            shown = f"{token[:4]}...{token[-4:]}" if len(token) > 12 else "***"
            return error_response(
                401,
                f"Incorrect API key provided: {shown}.",
                code="invalid_api_key",
                headers={"www-authenticate": "Bearer"},
            )
        return Caller(key.name, self._limits_for(key))

    async def read_body(self, request: Request) -> bytes:
        limit = self.cfg.max_body_bytes
        declared = request.headers.get("content-length", "")
        too_large = declared.isdigit() and int(declared) > limit
        chunks, size = [], 0
        drain_cap = max(8 * limit, 16 * 1024 * 1024)  # read (and drop) the rest so the client sees our 413
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                too_large = True
                if size > drain_cap:
                    break
                continue
            chunks.append(chunk)
        if too_large:
            raise _TooLarge(declared if declared.isdigit() else f"more than {size}")
        return b"".join(chunks)

    def _finish(self, route: str, model: str, key: str, status: int, started: float) -> None:
        self.metrics.requests.labels(route, model, key, str(status)).inc()
        self.metrics.duration.labels(route, model).observe(time.monotonic() - started)

    # ------------------------------------------------------------------ endpoints

    async def health(self, request: Request) -> Response:
        """Public: {"status": "ok"}, or 503 {"status": "unavailable"} + Retry-After while the upstream's last
        answer was a failure (re-checked at most once a second while it is). Nothing else: no URLs, no names."""
        if self.upstream_ok is False and time.monotonic() - self._models_fetched_at > 1.0:
            async with self._models_lock:
                if time.monotonic() - self._models_fetched_at > 1.0:
                    await self.fetch_upstream_models()
        if self.upstream_ok is False:
            return JSONResponse(
                {"status": "unavailable"},
                status_code=503,
                headers={"retry-after": str(self.cfg.upstream.unavailable_retry_after_s)},
            )
        return JSONResponse({"status": "ok"})

    async def live(self, request: Request) -> Response:
        """Public: 200 while the process serves (the Kubernetes probes), whatever the upstream's state."""
        return JSONResponse({"status": "ok"})

    async def admin_health(self, request: Request) -> Response:
        return JSONResponse(
            {
                "status": "ok" if self.upstream_ok is not False else "unavailable",
                "upstream": {
                    "base_url": self.cfg.upstream.base_url,
                    "reachable": self.upstream_ok,
                    "error": self.upstream_error,
                    "models": self.router.upstream_models,
                },
                "aliases": self.router.table(),
            }
        )

    async def prometheus(self, request: Request) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def _model_obj(self, model_id: str) -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": 0, "owned_by": "tulpar"}

    async def list_models(self, request: Request) -> Response:
        started = time.monotonic()
        caller = await self.authenticate(request)
        if isinstance(caller, Response):
            self._finish("models", "-", "-", caller.status_code, started)
            return caller
        await self._refetch_models_if_stale()
        data = [self._model_obj(m) for m in self.router.public_models()]
        self._finish("models", "-", caller.name, 200, started)
        return JSONResponse({"object": "list", "data": data})

    async def get_model(self, request: Request) -> Response:
        started = time.monotonic()
        caller = await self.authenticate(request)
        if isinstance(caller, Response):
            self._finish("models", "-", "-", caller.status_code, started)
            return caller
        model = request.path_params["model"]
        if not await self._known(model):
            self._finish("models", "-", caller.name, 404, started)
            return self._model_not_found(model)
        self._finish("models", model, caller.name, 200, started)
        return JSONResponse(self._model_obj(model))

    def _model_not_found(self, model: str) -> Response:
        return error_response(
            404,
            f"The model `{model}` does not exist or you do not have access to it. "
            f"Available models: {', '.join(self.router.public_models()) or 'none'}.",
            param="model",
            code="model_not_found",
        )

    async def _refetch_models_if_stale(self) -> None:
        """Re-read the upstream model list (a model deployed since the last refresh) at most every
        _MIN_MODELS_REFETCH_S seconds, once across concurrent requests."""
        if self.cfg.allow_served_ids and time.monotonic() - self._models_fetched_at > _MIN_MODELS_REFETCH_S:
            async with self._models_lock:
                if time.monotonic() - self._models_fetched_at > _MIN_MODELS_REFETCH_S:
                    await self.fetch_upstream_models()

    async def _known(self, model: str) -> bool:
        if self.router.is_known(model):
            return True
        await self._refetch_models_if_stale()
        return self.router.is_known(model)

    async def proxy(self, request: Request) -> Response:
        started = time.monotonic()
        path = request.path_params["path"]
        route = path
        rid = (request.headers.get("x-request-id") or uuid.uuid4().hex)[:128]
        rid_header = {"x-request-id": rid}

        def fail(status: int, model: str, key: str, resp: Response) -> Response:
            resp.headers.update(rid_header)
            self._finish(route, model, key, status, started)
            return resp

        if path not in PROXIED:
            route = "other"
            return fail(
                404,
                "-",
                "-",
                error_response(
                    404, f"Unknown endpoint POST /v1/{path}: this gateway serves {', '.join(PROXIED)}"
                ),
            )
        caller = await self.authenticate(request)
        if isinstance(caller, Response):
            return fail(caller.status_code, "-", "-", caller)
        try:
            raw = await self.read_body(request)
        except _TooLarge as exc:
            return fail(
                413,
                "-",
                caller.name,
                error_response(
                    413,
                    f"Request body is too large ({exc} bytes); the limit is {self.cfg.max_body_bytes} bytes.",
                ),
            )
        try:
            body = json.loads(raw, parse_constant=_no_constant)
        except RecursionError:
            return fail(
                400,
                "-",
                caller.name,
                error_response(
                    400,
                    f"The request body is nested too deeply; the limit is "
                    f"{self.request_limits.max_json_depth} levels.",
                    code="invalid_json",
                ),
            )
        except ValueError as exc:
            return fail(
                400,
                "-",
                caller.name,
                error_response(
                    400,
                    "We could not parse the JSON body of your request. (HINT: This likely means you aren't using "
                    "your HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was not "
                    f"valid JSON: {exc})",
                    code="invalid_json",
                ),
            )
        try:
            validate_request(route, body, self.request_limits)
        except RequestError as exc:
            return fail(
                400, "-", caller.name, error_response(400, exc.message, param=exc.param, code=exc.code)
            )
        model = body["model"]
        tokens = self._charged_tokens(body)
        if not await self._known(model):
            return fail(404, "-", caller.name, self._model_not_found(model))
        served, why = self.router.route(model, rid)
        if served is None:
            retry = {"retry-after": str(max(1, math.ceil(self.cfg.alias_refresh_s)))}
            return fail(
                503,
                model,
                caller.name,
                error_response(503, f"model {model!r} is unavailable: {why}", headers=retry),
            )
        decision = self.limiter.acquire(caller.name, caller.limits, tokens)
        if not decision.allowed:
            self.metrics.rate_limited.labels(caller.name, decision.limit or "").inc()
            headers = {}
            if not math.isinf(decision.retry_after_s):
                headers["retry-after"] = str(max(1, math.ceil(decision.retry_after_s)))
            return fail(
                429,
                model,
                caller.name,
                error_response(429, decision.message, type=decision.limit, headers=headers),
            )
        body["model"] = served
        return await self._forward(request, route, body, model, served, caller, rid, started)

    def _charged_tokens(self, body: dict[str, Any]) -> int:
        """Tokens a request reserves from the tokens/minute bucket: max_tokens (or the default) times n
        (both already validated as positive integers)."""
        value = body.get("max_completion_tokens") or body.get("max_tokens")
        return (value or self.cfg.rate_limits.default_max_tokens) * (body.get("n") or 1)

    async def _forward(
        self,
        request: Request,
        route: str,
        body: dict[str, Any],
        model: str,
        served: str,
        caller: Caller,
        rid: str,
        started: float,
    ) -> Response:
        assert self._client is not None
        headers = {
            "content-type": "application/json",
            "accept": request.headers.get("accept", "application/json"),
            "x-request-id": rid,
            "accept-encoding": "identity",  # bytes pass through as they come; a gzip layer would buffer SSE
            **self._upstream_headers(),
        }
        ours = {"x-request-id": rid, "x-tulpar-model": model, "x-tulpar-served-model": served}
        upstream_req = self._client.build_request(
            "POST",
            f"{self.cfg.upstream.base_url}/{route}",
            content=json.dumps(body, ensure_ascii=False).encode(),
            headers=headers,
        )
        self.metrics.in_flight.inc()
        retry_after = str(self.cfg.upstream.unavailable_retry_after_s)
        try:
            resp = await self._client.send(upstream_req, stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:  # nothing listens: no healthy replica
            self.metrics.in_flight.dec()
            self.metrics.upstream_errors.labels("connect").inc()
            self.upstream_ok, self.upstream_error = False, f"{type(exc).__name__}: {exc}"
            self._finish(route, model, caller.name, 503, started)
            return error_response(
                503,
                f"No healthy replica is serving `{model}` right now; retry in {retry_after} s.",
                code="no_healthy_upstream",
                headers={**ours, "retry-after": retry_after},
            )
        except (httpx.RemoteProtocolError, httpx.ReadError) as exc:  # the replica died with the request
            self.metrics.in_flight.dec()
            self.metrics.upstream_errors.labels("connect").inc()
            self._finish(route, model, caller.name, 502, started)
            return error_response(
                502,
                f"The upstream closed the connection before answering ({type(exc).__name__}); retry the request.",
                headers=ours,
            )
        except httpx.TimeoutException as exc:
            self.metrics.in_flight.dec()
            self.metrics.upstream_errors.labels("timeout").inc()
            self._finish(route, model, caller.name, 504, started)
            return error_response(504, f"upstream timed out ({type(exc).__name__})", headers=ours)
        self.metrics.upstream.labels(model, served, str(resp.status_code)).inc()
        self.upstream_ok, self.upstream_error = True, None
        if resp.status_code >= 400:
            try:
                raw = await resp.aread()
            except httpx.HTTPError:
                raw = b""
            finally:
                await resp.aclose()
                self.metrics.in_flight.dec()
            err = normalize_error_body(resp.status_code, raw, resp.headers.get("content-type"))
            if resp.status_code == 404 and err["error"]["code"] in ("not_found", None):
                err["error"]["code"], err["error"]["param"] = "model_not_found", "model"
                err["error"]["message"] = (
                    f"{err['error']['message']} (model `{model}` -> served id `{served}`)"
                )
            if resp.status_code == 503:  # Ray Serve: no replica can take it now
                ours["retry-after"] = resp.headers.get("retry-after", retry_after)
            self._finish(route, model, caller.name, resp.status_code, started)
            return JSONResponse(err, status_code=resp.status_code, headers=ours)

        out_headers = {k: v for k, v in resp.headers.items() if k.lower() not in _HOP_BY_HOP}
        out_headers.update(ours)
        if resp.headers.get("content-type", "").startswith("text/event-stream"):
            out_headers["x-accel-buffering"] = "no"  # ask ingress proxies not to buffer the stream
            out_headers["cache-control"] = "no-cache"

        sse = resp.headers.get("content-type", "").startswith("text/event-stream")

        async def relay() -> AsyncIterator[bytes]:
            first = True
            status = 499  # stays so if the client goes away before the end (nginx's "client closed request")
            partial = b""  # SSE: the bytes after the last complete event, held back until the event completes
            try:
                async for chunk in resp.aiter_raw():
                    if first:
                        self.metrics.ttfb.labels(route, model).observe(time.monotonic() - started)
                        first = False
                    if sse:
                        chunk, partial = _split_events(partial + chunk)
                    if chunk:
                        yield chunk
                if partial:
                    yield partial
                status = resp.status_code
            except httpx.HTTPError as exc:  # upstream died mid-stream (a replica killed, the engine crashed)
                status = 502
                self.metrics.upstream_errors.labels("protocol").inc()
                log.warning("upstream stream for %s broke: %s", rid, exc)
                if (
                    sse
                ):  # end with an OpenAI-format error event (the openai client raises it) instead of a cut
                    err = error_body(
                        502,
                        f"The upstream stopped in the middle of the response ({type(exc).__name__}); "
                        "retry the request.",
                        code="upstream_stream_broken",
                    )
                    yield f"data: {json.dumps(err)}\n\n".encode()
            finally:
                await resp.aclose()
                self.metrics.in_flight.dec()
                self._finish(route, model, caller.name, status, started)

        return _Relay(
            relay(),
            status_code=resp.status_code,
            headers=out_headers,
            media_type=None,
        )

    # ------------------------------------------------------------------ app

    def _build_app(self) -> Starlette:
        async def http_error(request: Request, exc: Exception) -> Response:
            status = exc.status_code if isinstance(exc, HTTPException) else 500
            if status == 404:
                msg = f"Unknown endpoint {request.method} {request.url.path}"
            elif status == 405:
                msg = f"Method {request.method} is not allowed on {request.url.path}"
            else:
                msg = exc.detail if isinstance(exc, HTTPException) else "internal gateway error"
            return error_response(status, str(msg))

        async def internal_error(request: Request, exc: Exception) -> Response:
            log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
            return error_response(500, "internal gateway error; see the gateway log", type="server_error")

        routes = [
            Route("/health", self.health, methods=["GET"]),
            Route("/livez", self.live, methods=["GET"]),
            Route("/v1/models", self.list_models, methods=["GET"]),
            Route("/v1/models/{model:path}", self.get_model, methods=["GET"]),
            Route("/v1/{path:path}", self.proxy, methods=["POST"]),
        ]
        app = Starlette(
            routes=routes,
            lifespan=self.lifespan,
            exception_handlers={HTTPException: http_error, Exception: internal_error},
        )
        app.state.gateway = self
        return app

    def _build_admin_app(self) -> Starlette:
        """The admin listener's app (config `admin`): metrics and detailed health, no API routes. It shares the
        public app's state; the public app's lifespan runs the upstream client and refreshes."""

        async def not_found(request: Request, exc: Exception) -> Response:
            status = exc.status_code if isinstance(exc, HTTPException) else 500
            return error_response(status, f"Unknown endpoint {request.method} {request.url.path}")

        return Starlette(
            routes=[
                Route("/metrics", self.prometheus, methods=["GET"]),
                Route("/health", self.admin_health, methods=["GET"]),
            ],
            exception_handlers={HTTPException: not_found},
        )


def create_app(cfg: GatewayConfig, **kwargs: Any) -> Starlette:
    """Build the gateway app (loads keys, resolves aliases; ValueError naming the problem if it cannot)."""
    return Gateway(cfg, **kwargs).app
