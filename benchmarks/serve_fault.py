"""Load-and-fault benchmark: streaming clients for a bounded time while the model replica is killed once.

    python benchmarks/serve_fault.py --start-model /tmp/tiny-hf --concurrency 64 --duration 60 --kill-at 15

Starts the app (`python -m services.llm_serve --model <dir>`, private local Ray; see serve_load.py) and, unless
--no-gateway, the gateway in front of it (`python -m services.gateway`, auth off, no rate limit); C streaming clients
send requests back to back to the gateway for --duration seconds, and on until --after seconds after the recovery
(at most --max-duration; requests started before the deadline may finish, at most --grace s more). At --kill-at seconds the LLMServer replica's worker process (Ray's
`ray::ServeReplica:<app>:LLMServer…`, which holds the vLLM engine) gets SIGKILL; Ray Serve starts a new one.

Reported: requests total, successes, errors by type (error event in a stream, HTTP status with or without
Retry-After, stream without [DONE], transport error, timeout), time to recovery (kill -> the end of the first
successful request sent after the kill), and TTFT p50/p99 of the successful requests started before the kill,
between the kill and the recovery, and after it. A client waits 0.5 s after an error before its next request (not
the Retry-After: the recovery time is measured to about 0.5 s). Loopback only. Appends a dated section to
docs/benchmarks.md unless --no-append.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass

import httpx
import psutil
from machine import BENCHMARKS_DOC, append_section, cpu_model  # benchmarks/machine.py, beside this script
from serve_load import (
    PROMPTS,
    ServeProcess,
    command_line,
    fmt_load,
    gateway_process,
    loadavg,
    ms,
    percentile,
)


@dataclass
class Outcome:
    started: float  # seconds since the start of the load
    ended: float
    ttft: float | None  # None unless the request succeeded
    error: str | None  # None: success; else the error type


def replica_process(app_pid: int) -> psutil.Process:
    """The LLMServer replica's worker: a descendant of the app process titled ray::ServeReplica:…:LLMServer…."""
    found = [
        p
        for p in psutil.Process(app_pid).children(recursive=True)
        if "ServeReplica" in (cmd := " ".join(p.cmdline())) and "LLMServer" in cmd
    ]
    if len(found) != 1:
        raise RuntimeError(f"expected one LLMServer replica process under pid {app_pid}, found {len(found)}")
    return found[0]


async def stream_one(client: httpx.AsyncClient, url: str, body: dict, t0: float) -> Outcome:
    start = time.perf_counter()
    ttft, done, error = None, False, None
    try:
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                await r.aread()
                retry = "with Retry-After" if "retry-after" in r.headers else "without Retry-After"
                try:
                    code = r.json()["error"].get("code")
                    error = f"HTTP {r.status_code} {retry} (code {code})"
                except (ValueError, KeyError, TypeError, AttributeError):
                    error = f"HTTP {r.status_code} {retry}, not an OpenAI error body"
            else:
                async for line in r.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        done = True
                        break
                    event = json.loads(data)
                    if "error" in event:
                        error = f"error event in the stream (code {event['error'].get('code')})"
                    elif event.get("choices") and ttft is None:
                        ttft = time.perf_counter() - start
                if error is None and not done:
                    error = "stream ended without [DONE] or an error event"
    except httpx.TimeoutException:
        error = "client timeout"
    except httpx.HTTPError as exc:
        error = f"transport error ({type(exc).__name__})"
    end = time.perf_counter()
    return Outcome(start - t0, end - t0, ttft if error is None else None, error)


async def run(url: str, model: str, app_pid: int, args: argparse.Namespace) -> dict:
    endpoint = url.rstrip("/") + "/completions"
    outcomes: list[Outcome] = []
    timeout = httpx.Timeout(args.timeout, connect=10)
    limits = httpx.Limits(
        max_connections=args.concurrency + 4, max_keepalive_connections=args.concurrency + 4
    )
    kill: dict = {}
    async with httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False) as client:
        t0 = time.perf_counter()
        deadline = [t0 + args.duration]  # moved on once the replica is back, to measure the recovered service

        async def worker(i: int) -> None:
            k = i
            while time.perf_counter() < deadline[0] or (
                "recovered" not in kill and time.perf_counter() < t0 + args.max_duration
            ):  # until --duration, and on until the replica is back
                body = {
                    "model": model,
                    "prompt": PROMPTS[k % len(PROMPTS)][1],
                    "max_tokens": args.max_tokens,
                    "stream": True,
                    "ignore_eos": True,
                }
                k += args.concurrency
                o = await stream_one(client, endpoint, body, t0)
                outcomes.append(o)
                if o.error is None and "at" in kill and o.started >= kill["at"] and "recovered" not in kill:
                    kill["recovered"] = o.ended
                    deadline[0] = min(
                        max(deadline[0], time.perf_counter() + args.after), t0 + args.max_duration
                    )
                if o.error is not None:
                    await asyncio.sleep(0.5)

        async def killer() -> None:
            await asyncio.sleep(args.kill_at)  # the fault's scheduled time, not a wait for a condition
            proc = replica_process(app_pid)
            kill["load"] = loadavg()
            kill["at"] = time.perf_counter() - t0
            proc.send_signal(signal.SIGKILL)
            print(f"killed the replica (pid {proc.pid}) at {kill['at']:.1f} s", flush=True)

        tasks = [asyncio.create_task(worker(i)) for i in range(args.concurrency)]
        kill_task = asyncio.create_task(killer())
        _, pending = await asyncio.wait(tasks, timeout=args.max_duration + args.grace)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await kill_task  # raises if the replica could not be found
        cancelled = len(pending)
    killed = kill["at"]
    after_kill_ok = [o for o in outcomes if o.started >= killed and o.error is None]
    recovered = min((o.ended for o in after_kill_ok), default=None)
    phases = {
        "before the kill": [o for o in outcomes if o.started < killed],
        "kill -> recovery": [o for o in outcomes if killed <= o.started < (recovered or float("inf"))],
        "after recovery": [o for o in outcomes if recovered is not None and o.started >= recovered],
    }
    errors = Counter(o.error for o in outcomes if o.error is not None)
    if cancelled:
        errors[f"still running {args.max_duration + args.grace:.0f} s after the start (cancelled)"] += (
            cancelled
        )
    return {
        "load_s": max((o.ended for o in outcomes), default=0.0),
        "requests": len(outcomes) + cancelled,
        "ok": sum(o.error is None for o in outcomes),
        "errors": dict(errors.most_common()),
        "killed_at": killed,
        "recovery_s": None if recovered is None else recovered - killed,
        "phases": {
            name: {
                "requests": len(os_),
                "ok": sum(o.error is None for o in os_),
                "ttft_p50": percentile([o.ttft for o in os_ if o.ttft is not None], 50),
                "ttft_p99": percentile([o.ttft for o in os_ if o.ttft is not None], 99),
            }
            for name, os_ in phases.items()
        },
        "load_at_kill": kill["load"],
    }


def complete_once(url: str, model: str) -> str | None:
    """None when a short completion succeeds, else what went wrong."""
    body = {"model": model, "prompt": PROMPTS[0][1], "max_tokens": 2}
    try:
        r = httpx.post(url.rstrip("/") + "/completions", json=body, timeout=120, trust_env=False)
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None if r.status_code == 200 else f"HTTP {r.status_code}: {r.text[:200]}"


def table(result: dict) -> str:
    lines = [
        "| phase (by request start) | requests | succeeded | TTFT p50 (ms) | TTFT p99 (ms) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, p in result["phases"].items():
        lines.append(f"| {name} | {p['requests']} | {p['ok']} | {ms(p['ttft_p50'])} | {ms(p['ttft_p99'])} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--start-model", required=True, help="HF directory (or models:/...) to serve for the test")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load at least")
    p.add_argument("--after", type=float, default=20.0, help="load goes on this long after the recovery")
    p.add_argument("--max-duration", type=float, default=300.0, help="load never goes on longer than this")
    p.add_argument(
        "--kill-at", type=float, default=15.0, help="seconds into the load when the replica is killed"
    )
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--timeout", type=float, default=120.0, help="per-request read timeout (s)")
    p.add_argument("--grace", type=float, default=60.0, help="seconds after --duration before cancelling")
    p.add_argument(
        "--no-gateway", dest="gateway", action="store_false", help="clients talk to the app directly"
    )
    p.add_argument(
        "--serve-arg", action="append", default=[], help="a ServeConfig override (k=v); repeatable"
    )
    p.add_argument("--start-timeout", type=float, default=600.0)
    p.add_argument("--no-append", action="store_true")
    args = p.parse_args(argv)
    if not 0 < args.kill_at < args.duration:
        p.error(
            f"--kill-at {args.kill_at} must be inside the load (0 < kill-at < --duration {args.duration})"
        )
    if args.concurrency < 1 or args.max_tokens < 1:
        p.error("--concurrency and --max-tokens must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_start = loadavg()
    with (
        ServeProcess(args.start_model, args.serve_arg, args.start_timeout) as server,
        contextlib.ExitStack() as up,
    ):
        print(f"app ready at {server.url} after {server.startup_s:.1f} s: {server.models}", flush=True)
        url = server.url
        if args.gateway:
            limits = ["rate_limits.requests_per_minute=null", "log_level=warning"]
            gateway = gateway_process(server.url, server.log_path.parent / "gateway.log", limits, timeout=120)
            url = up.enter_context(gateway).url
            print(f"gateway at {url}", flush=True)
        assert server.proc is not None
        # /v1/models answers before the model replica runs: wait for a served request (untimed)
        deadline = time.time() + args.start_timeout
        while (warm := complete_once(url, server.models[0])) is not None:
            if time.time() > deadline:
                raise TimeoutError(f"no request succeeded within --start-timeout: {warm}")
            time.sleep(1)
        result = asyncio.run(run(url, server.models[0], server.proc.pid, args))
        print(json.dumps(result), flush=True)
    load_end = loadavg()
    rec = "not within the run" if result["recovery_s"] is None else f"{result['recovery_s']:.1f} s"
    errors = "; ".join(f"{k}: {v}" for k, v in result["errors"].items()) or "none"
    print(table(result))
    print(
        f"requests {result['requests']}, succeeded {result['ok']}; errors: {errors}; time to recovery {rec}"
    )
    if not args.no_append:
        via = (
            "the gateway (`python -m services.gateway`, auth off) in front of the app"
            if args.gateway
            else "the app"
        )
        section = (
            f"\n## {dt.datetime.now():%Y-%m-%d %H:%M:%S} serve load and fault: {server.models[0]}, "
            f"{args.concurrency} streaming clients, replica killed at {result['killed_at']:.0f} s\n\n"
            f"- machine: {cpu_model()}, {os.cpu_count()} cores; 1/5/15-min load average {fmt_load(load_start)} at "
            f"start, {fmt_load(result['load_at_kill'])} at the kill, {fmt_load(load_end)} at end (the machine is "
            f"shared with other jobs: figures are upper bounds)\n"
            f"- command: `{command_line()}`\n"
            f"- load: {args.concurrency} clients send streamed completions (max_tokens {args.max_tokens}, ignore_eos) "
            f"back to back through {via} for {result['load_s']:.0f} s (at least {args.duration:.0f} s, and "
            f"{args.after:.0f} s past the recovery); at {result['killed_at']:.1f} s the LLMServer "
            f"replica's process gets SIGKILL; after an error a client waits 0.5 s\n"
            f"- requests {result['requests']}, succeeded {result['ok']}; **time to recovery** (kill -> end of the "
            f"first successful request sent after it): **{rec}**\n"
            f"- errors by type: {errors}\n\n"
            f"{table(result)}\n"
        )
        append_section(section)
        print(f"appended to {BENCHMARKS_DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
