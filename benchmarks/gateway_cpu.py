"""CPU the gateway spends per streamed request, against a cheap loopback SSE upstream (no model, no Ray).

    .venv/bin/python benchmarks/gateway_cpu.py --requests 2000 --concurrency 64

Starts an upstream (aiohttp: /v1/models, and /v1/completions streaming `--chunks` SSE events of a vLLM-shaped
completion chunk, `--chunk-gap-ms` apart, then `data: [DONE]`) and `python -m services.gateway` in front of it with
one API key, sends the same streamed requests to both at the given concurrency, and prints, for each path, the wall
time and the CPU seconds per request of the gateway process and of the upstream process (from /proc, so other
load on the machine changes the wall time but hardly the CPU per request). The gateway's figure is what it adds to
every streamed answer on the machine it shares with the model server. `--repo DIR` runs the gateway of another
checkout (e.g. a `git worktree` of an older commit) to compare before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from serve_load import ServerProcess, free_port, gateway_process  # noqa: E402  (benchmarks/, beside this script)

from services.gateway.keys import new_key  # noqa: E402

CHUNK = {
    "id": "cmpl-bench", "object": "text_completion", "created": 0, "model": "m",
    "choices": [{"index": 0, "text": " tok", "logprobs": None, "finish_reason": None, "stop_reason": None}],
}  # fmt: skip


def serve_upstream(port: int, gap_s: float) -> None:
    from aiohttp import web

    line = f"data: {json.dumps(CHUNK)}\n\n".encode()

    async def models(request: web.Request) -> web.Response:
        return web.json_response(
            {"object": "list", "data": [{"id": "m", "object": "model", "owned_by": "bench"}]}
        )

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        for _ in range(int(body.get("max_tokens", 32))):
            await resp.write(line)
            await asyncio.sleep(gap_s)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/completions", completions)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def load(url: str, headers: dict[str, str] | None, requests: int, concurrency: int, chunks: int) -> int:
    """Send `requests` streamed completions, `concurrency` at a time; the number of SSE events received."""
    sem, events = asyncio.Semaphore(concurrency), 0
    body = {"model": "m", "prompt": "hi", "max_tokens": chunks, "stream": True}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:

        async def one() -> None:
            nonlocal events
            async with sem, session.post(f"{url}/completions", json=body, headers=headers) as r:
                if r.status != 200:
                    raise SystemExit(f"{url}: HTTP {r.status}: {await r.text()}")
                async for line in r.content:
                    events += line.startswith(b"data:")

        await asyncio.gather(*(one() for _ in range(requests)))
    return events


async def bench(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="gateway-cpu-"))
    up_port = free_port()
    upstream = ServerProcess(
        [sys.executable, __file__, "--serve-upstream", str(up_port), "--chunk-gap-ms", str(args.chunk_gap_ms)],
        f"http://127.0.0.1:{up_port}/v1", work / "upstream.log", timeout=60, name="the upstream",
    )  # fmt: skip
    _, key = new_key()
    limits = [
        "rate_limits.requests_per_minute=1e9",
        "rate_limits.tokens_per_minute=1e12",
        "log_level=warning",
    ]
    with (
        upstream,
        gateway_process(
            upstream.url, work / "gateway.log", limits, api_key=key, cwd=args.repo, timeout=60
        ) as gateway,
    ):
        assert upstream.proc is not None and gateway.proc is not None
        up_pid, gw_pid = upstream.proc.pid, gateway.proc.pid
        await load(gateway.url, gateway.headers, args.concurrency, args.concurrency, args.chunks)  # warm both
        print(f"gateway from {args.repo}; {args.requests} streamed requests of {args.chunks} events, "
              f"concurrency {args.concurrency}")  # fmt: skip
        for label, url, hdrs in (
            ("upstream directly", upstream.url, None),
            ("through the gateway", gateway.url, gateway.headers),
        ):
            g0, u0, t0 = cpu_seconds(gw_pid), cpu_seconds(up_pid), time.perf_counter()
            events = await load(url, hdrs, args.requests, args.concurrency, args.chunks)
            wall = time.perf_counter() - t0
            g, u = cpu_seconds(gw_pid) - g0, cpu_seconds(up_pid) - u0
            print(
                f"{label:>20}: {wall:6.2f} s, {events} events; CPU per request: gateway "
                f"{1000 * g / args.requests:.2f} ms, upstream {1000 * u / args.requests:.2f} ms",
                flush=True,
            )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--chunks", type=int, default=32, help="SSE events per answer (before [DONE])")
    p.add_argument("--chunk-gap-ms", type=float, default=5.0)
    p.add_argument("--repo", type=Path, default=REPO, help="the checkout whose services.gateway runs")
    p.add_argument("--serve-upstream", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve_upstream:
        serve_upstream(args.serve_upstream, args.chunk_gap_ms / 1000)
        return 0
    asyncio.run(bench(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
