"""Load test of an OpenAI-compatible endpoint (our Ray Serve app, or any server on this machine), bounded in time.

    python benchmarks/serve_load.py --url http://127.0.0.1:8000/v1 --model tulpar-tiny-v1 \\
        --concurrency 16,64 --duration 30 --max-tokens 32
    python benchmarks/serve_load.py --start-model /tmp/tiny-hf --concurrency 16,64 --duration 20

For each concurrency level C, C streaming clients (httpx, one asyncio task each) send requests back to back for
`--duration` seconds, cycling through kk/ru/en prompts; requests started before the deadline are allowed to
finish (at most `--grace` seconds more; those still running then are cancelled and counted as errors). Reported
per level: completed requests/s and output tokens/s (over the wall time until the last request finished), time to
first token (first streamed chunk carrying a choice) and end-to-end latency p50/p99, and errors (non-200 answers,
error events in the stream, streams without `[DONE]`, timeouts; the goal is 0). Output tokens are the server's
`usage.completion_tokens` (`stream_options.include_usage`). By default `ignore_eos` is sent (a vLLM extension) so
every request generates exactly `--max-tokens` tokens and levels are comparable.

Only loopback endpoints are accepted (127.0.0.0/8, ::1, localhost): this is a load generator. `--start-model`
starts `python -m services.llm_serve --model <dir> port=<free port>` on a private local Ray (RAY_ADDRESS=local),
waits for /v1/models, runs the test and stops it. Prints a markdown table and appends a dated section (machine,
load average, command) to docs/benchmarks.md unless --no-append.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import ipaddress
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
from machine import BENCHMARKS_DOC, append_section, cpu_model  # benchmarks/machine.py, beside this script

REPO = Path(__file__).resolve().parent.parent

PROMPTS: list[tuple[str, str]] = [
    ("kk", "Қазақстанның астанасы туралы қысқаша айтып берші."),
    ("kk", "Абай Құнанбайұлы кім болған?"),
    ("kk", "Дала мен таулар туралы шағын әңгіме жаз."),
    ("kk", "Сәлем! Бүгін ауа райы қандай болады?"),
    ("kk", "Қазақ тілінің тарихы туралы не білесің?"),
    ("kk", "Алматы қаласының көрікті жерлерін ата."),
    ("kk", "Наурыз мерекесі қалай тойланады?"),
    ("kk", "Балаларға арналған ертегі айтып берші."),
    ("ru", "Расскажи кратко об истории Казахстана."),
    ("ru", "Москва — столица России. Что ещё ты знаешь о ней?"),
    ("ru", "Напиши короткое стихотворение о весне."),
    ("ru", "Какие реки текут через Сибирь?"),
    ("ru", "Объясни простыми словами, что такое нейронная сеть."),
    ("ru", "Привет! Как дела?"),
    ("ru", "Опиши степь летним вечером."),
    ("ru", "Какие книги стоит прочитать школьнику?"),
    ("en", "The history of the Great Steppe begins"),
    ("en", "Write a short story about a horse on the steppe."),
    ("en", "Explain in simple words how a language model works."),
    ("en", "Hello! What is the capital of Kazakhstan?"),
    ("en", "List three facts about the Caspian Sea."),
    ("en", "Translate 'good morning' into Kazakh and Russian."),
    ("en", "Describe the city of Almaty in a few sentences."),
    ("en", "Give me a recipe for a simple soup."),
]


# ---------------------------------------------------------------------------------------------- shared helpers


def loadavg() -> tuple[float, float, float]:
    return os.getloadavg()


def fmt_load(load: tuple[float, float, float]) -> str:
    return "/".join(f"{x:.2f}" for x in load)


def require_loopback(url: str) -> str:
    """The host of `url` if it is a loopback address; SystemExit(2) otherwise (this is a load generator)."""
    parts = urlsplit(url)
    host = parts.hostname
    if parts.scheme not in ("http", "https") or not host:
        raise SystemExit(f"error: {url!r} is not an http(s) URL")
    try:
        addrs = {ipaddress.ip_address(host)}
    except ValueError:
        try:
            addrs = {ipaddress.ip_address(a[4][0]) for a in socket.getaddrinfo(host, parts.port or 80)}
        except socket.gaierror as exc:
            print(f"error: refusing to load-test {url}: cannot resolve {host!r} ({exc})", file=sys.stderr)
            raise SystemExit(2) from None
    if not addrs or not all(a.is_loopback for a in addrs):
        print(
            f"error: refusing to load-test {url}: {host} is not a loopback address "
            f"({', '.join(sorted(map(str, addrs)))}); only 127.0.0.0/8, ::1 and localhost are allowed",
            file=sys.stderr,
        )
        raise SystemExit(2)
    return host


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values), q)) if values else None


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:,.0f}"


def command_line() -> str:
    argv = [Path(sys.argv[0]).resolve().relative_to(REPO).as_posix()] if sys.argv[0] else []
    return "python " + shlex.join(argv + sys.argv[1:])


class ServerProcess:
    """A server subprocess on loopback, ready once GET <url>/models lists a model.

    Started in its own session, its output in `log_path`; stopped with SIGINT (an app shuts Serve and Ray down),
    then SIGKILL to whatever of its process group is left."""

    def __init__(
        self,
        cmd: list[str],
        url: str,
        log_path: Path,
        env: dict[str, str] | None = None,
        timeout: float = 600.0,
        headers: dict[str, str] | None = None,
        name: str = "the server",
        cwd: Path = REPO,
    ):
        self.cmd, self.url, self.log_path, self.timeout, self.headers = cmd, url, log_path, timeout, headers
        self.name, self.cwd = name, cwd
        self.env = dict(env if env is not None else os.environ)
        self.proc: subprocess.Popen | None = None
        self.startup_s: float | None = None
        self.models: list[str] = []

    def command(self) -> list[str]:
        return self.cmd

    def __enter__(self) -> ServerProcess:
        t0 = time.perf_counter()
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(
                self.command(),
                cwd=self.cwd,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.perf_counter() - t0
        return self

    def _wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.time() + self.timeout
        with httpx.Client(trust_env=False, timeout=5, headers=self.headers) as client:
            while time.time() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
                try:
                    r = client.get(self.url + "/models")
                    if r.status_code == 200 and r.json().get("data"):
                        self.models = [m["id"] for m in r.json()["data"]]
                        return
                except (httpx.HTTPError, ValueError):
                    pass
                time.sleep(1)
        raise TimeoutError(f"{self.name} was not ready after {self.timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(90)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # Ray processes the app started and left behind
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        self.proc = None

    def __exit__(self, *exc) -> None:
        self.stop()


class ServeProcess(ServerProcess):
    """`python -m services.llm_serve --model <dir> port=<free> [overrides]` on a private local Ray."""

    def __init__(self, model: str, overrides: list[str] | None = None, timeout: float = 600.0):
        port = free_port()
        log_path = Path(tempfile.mkdtemp(prefix="serve-bench-")) / "serve.log"
        env = {**os.environ, "RAY_ADDRESS": "local", "PYTHONUNBUFFERED": "1"}
        env.setdefault("TULPAR_HOME", str(log_path.parent / "home"))
        cmd = [
            sys.executable,
            "-m",
            "services.llm_serve",
            "--model",
            model,
            f"port={port}",
            *(overrides or []),
        ]
        super().__init__(cmd, f"http://127.0.0.1:{port}/v1", log_path, env, timeout, name="the serving app")


def gateway_process(
    upstream: str,
    log_path: Path,
    overrides: list[str],
    *,
    api_key: str | None = None,
    cwd: Path = REPO,
    timeout: float = 600.0,
) -> ServerProcess:
    """`python -m services.gateway` on a free loopback port in front of `upstream` (no admin listener), plus
    `overrides`. With `api_key`, auth stays on with that key as its only one (the caller's requests and the
    readiness check send it); without, `auth.enabled=false`. `cwd` is the checkout whose gateway runs."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "services.gateway",
        f"port={port}",
        "admin.port=null",
        f"upstream.base_url={upstream}",
    ]
    env, headers = dict(os.environ), None
    if api_key is None:
        cmd.append("auth.enabled=false")
    else:
        sys.path.insert(0, str(REPO))
        from services.gateway.keys import hash_key

        env["TULPAR_GATEWAY_KEYS"] = f"bench: {hash_key(api_key)}"  # auth.keys_env's default
        headers = {"authorization": f"Bearer {api_key}"}
    url = f"http://127.0.0.1:{port}/v1"
    return ServerProcess(
        cmd + overrides, url, log_path, env, timeout, headers=headers, name="the gateway", cwd=cwd
    )


# --------------------------------------------------------------------------------------------------- load test


class RequestFailed(Exception):
    pass


def request_body(endpoint: str, model: str, prompt: str, args: argparse.Namespace) -> dict:
    body: dict = {
        "model": model,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if args.ignore_eos:
        body["ignore_eos"] = True
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body


async def stream_one(client: httpx.AsyncClient, url: str, body: dict) -> tuple[float, float, int]:
    """(TTFT s, latency s, output tokens) of one streamed request; RequestFailed on any problem."""
    t0 = time.perf_counter()
    ttft = None
    usage_tokens = None
    content_chunks = 0
    done = False
    async with client.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            text = (await r.aread()).decode(errors="replace")
            raise RequestFailed(f"HTTP {r.status_code}: {text[:160]}")
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                break
            event = json.loads(data)
            if "error" in event:
                raise RequestFailed(f"error event: {str(event['error'])[:160]}")
            if event.get("choices"):
                if ttft is None:
                    ttft = time.perf_counter() - t0
                content_chunks += 1
            if event.get("usage"):
                usage_tokens = event["usage"].get("completion_tokens")
    if not done:
        raise RequestFailed("stream ended without [DONE]")
    if ttft is None:
        raise RequestFailed("no token streamed")
    return ttft, time.perf_counter() - t0, usage_tokens if usage_tokens is not None else content_chunks


async def run_level(url: str, model: str, concurrency: int, args: argparse.Namespace) -> dict:
    endpoint_url = url.rstrip("/") + ("/chat/completions" if args.endpoint == "chat" else "/completions")
    ttfts: list[float] = []
    latencies: list[float] = []
    tokens: list[int] = []
    errors: Counter[str] = Counter()
    inflight: dict[int, float] = {}
    last_end = 0.0
    timeout = httpx.Timeout(args.timeout, connect=10)
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    load_before = loadavg()
    async with httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False) as client:
        start = time.perf_counter()
        deadline = start + args.duration

        async def worker(i: int) -> None:
            nonlocal last_end
            k = i
            while time.perf_counter() < deadline:
                _, prompt = PROMPTS[k % len(PROMPTS)]
                k += concurrency
                key = id(asyncio.current_task())
                inflight[key] = time.perf_counter()
                try:
                    ttft, latency, n = await stream_one(
                        client, endpoint_url, request_body(args.endpoint, model, prompt, args)
                    )
                except (RequestFailed, httpx.HTTPError, json.JSONDecodeError) as exc:
                    errors[f"{type(exc).__name__}: {exc}"[:200]] += 1
                    await asyncio.sleep(0.2)  # no hot loop against a server that refuses
                    continue
                finally:
                    inflight.pop(key, None)
                ttfts.append(ttft)
                latencies.append(latency)
                tokens.append(n)
                last_end = time.perf_counter()

        tasks = [asyncio.create_task(worker(i)) for i in range(concurrency)]
        _, pending = await asyncio.wait(tasks, timeout=args.duration + args.grace)
        if pending:
            errors[f"still running {args.duration + args.grace:.0f} s after the start (cancelled)"] += len(
                inflight
            )
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
    elapsed = max(last_end - start, 1e-9) if latencies else args.duration
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "elapsed_s": elapsed,
        "rps": len(latencies) / elapsed,
        "tok_s": sum(tokens) / elapsed,
        "tokens_per_request": (sum(tokens) / len(tokens)) if tokens else 0.0,
        "ttft_p50": percentile(ttfts, 50),
        "ttft_p99": percentile(ttfts, 99),
        "lat_p50": percentile(latencies, 50),
        "lat_p99": percentile(latencies, 99),
        "errors": sum(errors.values()),
        "error_kinds": dict(errors.most_common(5)),
        "load_before": load_before,
        "load_after": loadavg(),
    }


def resolve_model_name(url: str) -> str:
    r = httpx.get(url.rstrip("/") + "/models", timeout=10, trust_env=False)
    r.raise_for_status()
    data = r.json().get("data") or []
    if not data:
        raise SystemExit(f"error: {url}/models lists no model; pass --model")
    return data[0]["id"]


async def warm_up(url: str, model: str, args: argparse.Namespace, n: int) -> None:
    endpoint_url = url.rstrip("/") + ("/chat/completions" if args.endpoint == "chat" else "/completions")
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.timeout, connect=10), trust_env=False) as client:
        for i in range(n):
            await stream_one(client, endpoint_url, request_body(args.endpoint, model, PROMPTS[i][1], args))


def table(rows: list[dict]) -> str:
    lines = [
        "| concurrency | requests | requests/s | output tokens/s | tokens/request | TTFT p50 (ms) | TTFT p99 (ms) "
        "| latency p50 (ms) | latency p99 (ms) | errors | load avg 1-min before -> after |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['concurrency']} | {r['requests']} | {r['rps']:.2f} | {r['tok_s']:,.1f} | "
            f"{r['tokens_per_request']:.1f} | {ms(r['ttft_p50'])} | {ms(r['ttft_p99'])} | {ms(r['lat_p50'])} | "
            f"{ms(r['lat_p99'])} | {r['errors']} | {r['load_before'][0]:.2f} -> {r['load_after'][0]:.2f} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="OpenAI-compatible base URL on loopback, e.g. http://127.0.0.1:8000/v1")
    where.add_argument(
        "--start-model", help="HF directory (or models:/...) to serve on a free port for the test"
    )
    p.add_argument("--model", help="served model name (default: the first one /v1/models lists)")
    p.add_argument("--concurrency", default="16,64", help="comma-separated concurrency levels")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of load per level")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument(
        "--no-ignore-eos", dest="ignore_eos", action="store_false", help="let requests stop at EOS"
    )
    p.add_argument("--timeout", type=float, default=120.0, help="per-request read timeout (s)")
    p.add_argument("--grace", type=float, default=60.0, help="seconds after --duration before cancelling")
    p.add_argument("--warmup", type=int, default=2, help="untimed sequential requests before the first level")
    p.add_argument(
        "--serve-arg",
        action="append",
        default=[],
        help="with --start-model: a ServeConfig override (k=v), e.g. models.0.max_model_len=512; repeatable",
    )
    p.add_argument("--start-timeout", type=float, default=600.0)
    p.add_argument("--no-append", action="store_true")
    args = p.parse_args(argv)
    args.levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    if not args.levels or min(args.levels) < 1:
        p.error("--concurrency needs positive integers")
    if args.duration <= 0 or args.max_tokens < 1:
        p.error("--duration and --max-tokens must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.url:
        require_loopback(args.url)
    load_start = loadavg()
    server: ServeProcess | None = None
    try:
        if args.start_model:
            server = ServeProcess(args.start_model, args.serve_arg, args.start_timeout)
            print(f"starting python {' '.join(server.command()[1:])} (log {server.log_path})", flush=True)
            server.__enter__()
            print(f"ready at {server.url} after {server.startup_s:.1f} s: {server.models}", flush=True)
            url = server.url
        else:
            url = args.url
        try:
            model = args.model or resolve_model_name(url)
            asyncio.run(warm_up(url, model, args, args.warmup))
        except (RequestFailed, httpx.HTTPError) as exc:
            print(f"error: {url} does not answer: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        rows = []
        for c in args.levels:
            print(f"concurrency {c}: {args.duration:.0f} s ...", flush=True)
            row = asyncio.run(run_level(url, model, c, args))
            rows.append(row)
            print(
                f"  {row['requests']} requests, {row['rps']:.2f} req/s, {row['tok_s']:.1f} tok/s, "
                f"errors {row['errors']} {row['error_kinds'] or ''}, load {fmt_load(row['load_after'])}",
                flush=True,
            )
    finally:
        if server is not None:
            server.stop()
    load_end = loadavg()
    result = table(rows)
    print(result)
    total_errors = sum(r["errors"] for r in rows)
    print(f"errors: {total_errors} (goal 0); load average {fmt_load(load_start)} -> {fmt_load(load_end)}")
    if not args.no_append:
        cores = os.cpu_count()
        if server is not None:
            serve_cmd = " ".join(
                ["python -m services.llm_serve --model", args.start_model, "port=<free>", *args.serve_arg]
            )
            where = (
                f"started by the script (`{serve_cmd}`, private local Ray), ready after "
                f"{server.startup_s:.0f} s (not timed)"
            )
        else:
            where = f"{url} (already running)"
        kinds = Counter()
        for r in rows:
            kinds.update(r["error_kinds"])
        section = (
            f"\n## {dt.datetime.now():%Y-%m-%d %H:%M:%S} serve load: {model}, streaming {args.endpoint}, "
            f"max_tokens {args.max_tokens}\n\n"
            f"- machine: {cpu_model()}, {cores} cores; 1/5/15-min load average {fmt_load(load_start)} at start, "
            f"{fmt_load(load_end)} at end (the machine is shared with other jobs)\n"
            f"- command: `{command_line()}`\n"
            f"- server: {where}\n"
            f"- method: per level, C streaming clients (httpx asyncio) send requests back to back for "
            f"{args.duration:.0f} s over {len(PROMPTS)} kk/ru/en prompts, temperature {args.temperature}, "
            f"ignore_eos {args.ignore_eos}; requests/s and tokens/s over the wall time until the last request "
            f"ended; TTFT = first streamed chunk with a choice; output tokens = usage.completion_tokens; the client "
            f"runs on the same machine as the server\n\n"
            f"{result}\n\n"
            f"- errors: {total_errors} (goal 0){': ' + json.dumps(dict(kinds), ensure_ascii=False) if kinds else ''}\n"
        )
        append_section(section)
        print(f"appended to {BENCHMARKS_DOC}")
    return 0 if total_errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
