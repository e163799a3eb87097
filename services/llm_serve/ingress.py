"""The app's HTTP ingress: Ray Serve LLM's `OpenAiIngress` with answers for a lost or missing model replica.

Without it a replica that dies (killed, OOM, its vLLM engine crashed) during a streamed answer tears the stream:
the ingress's generator raises after the 200 and the SSE events went out, so the client sees a cut connection. A
request that arrives while the model has no running replica waits in Ray Serve's router until one is back (up to
the ingress's 10-minute timeout). Here:

- a streamed answer whose replica is lost ends with an OpenAI-format error event,
  `data: {"error": {"message", "type": "ServiceUnavailable", "code": 503}}`, then `data: [DONE]`;
- a request whose replica is lost before its first output gets 503 `{"error": {...}}` + `Retry-After`; so does one
  still waiting in Ray Serve's router for a replica when the router is left with none (checked every 0.5 s);
- while the model's deployment has no running replica (the router's replica set is empty), a new request gets the
  same 503 + `Retry-After` at once instead of waiting; once Ray Serve has started a new replica, requests go
  through again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from ray.exceptions import RayActorError
from ray.llm._internal.serve.core.configs.openai_api_models import ErrorInfo, ErrorResponse
from ray.llm._internal.serve.core.ingress.ingress import OpenAiIngress
from starlette.responses import JSONResponse, Response

log = logging.getLogger("tulpar.serve")

RETRY_AFTER_S = 5  # a replica restart of a small model on CPU takes seconds to a minute
WATCH_S = 0.5  # how often a request waiting for its first output checks that a replica is left


class ReplicaLost(Exception):
    """The model replica serving a request died before the request's first output."""


def running_replicas(handle: Any) -> int | None:
    """How many replicas the handle's router can send requests to now; None when it cannot tell (the handle has not
    routed a request yet, or Ray Serve's router has another shape than Ray 2.60's)."""
    try:
        if not handle.running_replicas_populated():
            return None
        router = handle._router._asyncio_router.request_router
        return None if router is None else len(router.curr_replicas)
    except AttributeError:
        return None


def unavailable(model: str, why: str) -> Response:
    """503 in OpenAI's error format with Retry-After."""
    body = ErrorResponse(
        error=ErrorInfo(
            message=f"No replica of model `{model}` is serving right now ({why}); retry in {RETRY_AFTER_S} s.",
            type="ServiceUnavailable",
            code=503,
        )
    )
    return JSONResponse(body.model_dump(), status_code=503, headers={"retry-after": str(RETRY_AFTER_S)})


class TulparIngress(OpenAiIngress):
    async def _process_llm_request(self, body, call_method: str, raw_request=None) -> Response:
        model_id = await self._get_model_id(body.model)  # 404 for an unknown model, as before
        if running_replicas(self._get_configured_serve_handle(model_id)) == 0:
            return unavailable(body.model, "its replica is restarting")
        try:
            return await super()._process_llm_request(body, call_method, raw_request)
        except ReplicaLost as exc:
            return unavailable(body.model, str(exc))

    async def _get_response(self, **kwargs):
        handle = self._get_configured_serve_handle(await self._get_model_id(kwargs["body"].model))
        stream = super()._get_response(**kwargs)
        try:
            first = await _first_unless_no_replica(stream, handle)
        except StopAsyncIteration:
            return
        except RayActorError as exc:
            log.warning("model replica lost before a request's first output: %s", type(exc).__name__)
            raise ReplicaLost(f"its replica was lost: {type(exc).__name__}") from None
        yield first
        try:
            async for response in stream:
                yield response
        except RayActorError as exc:
            log.warning("model replica lost during a streamed answer: %s", type(exc).__name__)
            # headers and events already went out: end the stream with an OpenAI-format error event
            yield ErrorResponse(
                error=ErrorInfo(
                    message=f"The model replica stopped in the middle of the response ({type(exc).__name__}); "
                    "retry the request.",
                    type="ServiceUnavailable",
                    code=503,
                )
            )


async def _first_unless_no_replica(stream, handle):
    """The stream's first output; ReplicaLost if, while waiting for it, the router is left with no replica (a request
    still queued in Ray Serve's router when its replica died would wait there for the next one)."""
    first = asyncio.ensure_future(stream.__anext__())
    try:
        while True:
            done, _ = await asyncio.wait({first}, timeout=WATCH_S)
            if done:
                return first.result()
            if running_replicas(handle) == 0:
                log.warning("no model replica left for a waiting request")
                raise ReplicaLost("its replica was lost while it waited")
    finally:
        if not first.done():
            first.cancel()
            with contextlib.suppress(BaseException):
                await first
