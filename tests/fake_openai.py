"""A fake OpenAI-compatible upstream (the shape of services.llm_serve) and a loopback server runner for tests.

The fake answers like Ray Serve's OpenAI app: /v1/models lists `models`; an unknown model gets FastAPI's
`{"detail": ...}` 404 (what Ray Serve returns today); model "crash" gets a plain-text 500 and model "no-replica"
a plain-text 503 (Ray Serve with no replica to take the request); with `break_stream_after` set, streams break
off mid-event like a killed replica's (`streams_abandoned` counts streams whose caller left before the end); chat and completions answer `Hello from
<model>! You said: <last user text>` and stream it word by word, `chunk_delay_s` apart; embeddings answer one
4-dimensional zero vector per input.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route


@dataclass
class FakeUpstream:
    models: list[str]
    chunk_delay_s: float = 0.0
    break_stream_after: int | None = (
        None  # streams: after this many events, half an event, then the server dies
    )
    requests: list[dict[str, Any]] = field(default_factory=list)
    streams_abandoned: int = 0  # streams that stopped because the caller went away (not finished, not broken)

    def reply(self, model: str, prompt: str) -> str:
        return f"Hello from {model}! You said: {prompt}"

    @property
    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/models", self.list_models, methods=["GET"]),
                Route("/v1/chat/completions", self.chat, methods=["POST"]),
                Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/v1/embeddings", self.embeddings, methods=["POST"]),
            ]
        )

    async def list_models(self, request: Request) -> Response:
        return JSONResponse(
            {
                "object": "list",
                "data": [{"id": m, "object": "model", "created": 0, "owned_by": "fake"} for m in self.models],
            }
        )

    async def _parse(self, request: Request) -> dict[str, Any] | Response:
        raw = await request.body()
        self.requests.append({"path": request.url.path, "headers": dict(request.headers), "raw": raw})
        try:
            body = json.loads(raw)
        except ValueError:
            return JSONResponse(
                {"error": {"message": "bad json", "type": "BadRequestError", "param": None, "code": 400}},
                status_code=400,
            )
        self.requests[-1]["body"] = body
        model = body.get("model")
        if model == "crash":
            return PlainTextResponse("Internal Server Error", status_code=500)
        if model == "no-replica":
            return PlainTextResponse("Service Unavailable", status_code=503)
        if str(model).split(":")[0] not in self.models:  # Ray Serve's OpenAI app (ids `<base>:<lora>` too)
            return JSONResponse({"detail": f"The model `{model}` does not exist."}, status_code=404)
        return body

    async def chat(self, request: Request) -> Response:
        body = await self._parse(request)
        if isinstance(body, Response):
            return body
        messages = body.get("messages") or [{"content": ""}]
        text = self.reply(body["model"], str(messages[-1].get("content", "")))
        return self._answer(body, text, chat=True)

    async def completions(self, request: Request) -> Response:
        body = await self._parse(request)
        if isinstance(body, Response):
            return body
        return self._answer(body, self.reply(body["model"], str(body.get("prompt", ""))), chat=False)

    async def embeddings(self, request: Request) -> Response:
        body = await self._parse(request)
        if isinstance(body, Response):
            return body
        inputs = body["input"]
        n = 1 if isinstance(inputs, str) or (inputs and isinstance(inputs[0], int)) else len(inputs)
        data = [{"object": "embedding", "index": i, "embedding": [0.0] * 4} for i in range(n)]
        usage = {"prompt_tokens": n, "total_tokens": n}
        return JSONResponse({"object": "list", "data": data, "model": body["model"], "usage": usage})

    def _answer(self, body: dict[str, Any], text: str, *, chat: bool) -> Response:
        model, created = body["model"], int(time.time())
        kind = "chat.completion" if chat else "text_completion"
        words = text.split(" ")
        usage = {"prompt_tokens": 5, "completion_tokens": len(words), "total_tokens": 5 + len(words)}
        if not body.get("stream"):
            choice = (
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                if chat
                else {"index": 0, "text": text, "finish_reason": "stop"}
            )
            return JSONResponse(
                {
                    "id": "cmpl-fake",
                    "object": kind,
                    "created": created,
                    "model": model,
                    "choices": [choice],
                    "usage": usage,
                }
            )

        obj = kind + ".chunk" if chat else kind

        def event(piece: str | None, finish: str | None) -> str:
            if chat:
                choice = {"index": 0, "delta": {"content": piece} if piece else {}, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": piece or "", "finish_reason": finish}
            chunk = {
                "id": "cmpl-fake",
                "object": obj,
                "created": created,
                "model": model,
                "choices": [choice],
            }
            return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

        async def events():
            ended = False  # finished, or broken off on purpose
            try:
                for i, word in enumerate(words):
                    if i == self.break_stream_after:
                        yield event(word, None)[:20]
                        ended = True
                        raise RuntimeError("fake upstream: replica killed mid-stream")
                    yield event(word if i == len(words) - 1 else word + " ", None)
                    if self.chunk_delay_s:
                        await asyncio.sleep(self.chunk_delay_s)
                yield event(None, "stop")
                yield "data: [DONE]\n\n"
                ended = True
            finally:
                if not ended:
                    self.streams_abandoned += 1

        return StreamingResponse(events(), media_type="text/event-stream")


def bound_socket() -> socket.socket:
    """A socket bound to a free loopback port and not listening yet: connecting to it is refused until a
    ServerThread serves it (a server that is down, then comes back on the same port)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


class ServerThread:
    """An ASGI app served by uvicorn on 127.0.0.1 (a free port) in a daemon thread."""

    def __init__(
        self, app: Any, *, startup_timeout_s: float = 30.0, sock: socket.socket | None = None
    ) -> None:
        self.sock = sock if sock is not None else bound_socket()
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + startup_timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"server for {app!r} did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()

    def __enter__(self) -> ServerThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
