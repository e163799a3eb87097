"""services.gateway against a fake OpenAI-compatible upstream on loopback (no vLLM): auth, limits, errors, aliases
through a real MLflow SQLite registry, canaries, streaming, metrics, the CLI. Every bad request is followed by a
good one to show the gateway keeps serving."""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from llm_core.config import ConfigError
from services.gateway import Gateway, load_gateway_config
from services.gateway.config import AliasConfig, env_overrides
from services.gateway.errors import normalize_error_body
from services.gateway.keys import KeyStore, hash_key, new_key, parse_keys
from services.gateway.ratelimit import BucketStore, Limits, RateLimiter
from services.gateway.routing import ResolvedAlias
from services.gateway.schema import ChatCompletionRequest
from tests.fake_openai import FakeUpstream, ServerThread, bound_socket

REPO = Path(__file__).resolve().parent.parent
ITER = 2_000  # PBKDF2 iterations in tests (production default: 600,000)
SERVED = ["kk-350m-v1", "kk-350m-v2", "plain-v7", "tulpar-tiny-v1"]


def assert_openai_error(resp: httpx.Response, status: int, code: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> str:
    """A SQLite MLflow registry: kk-350m v1 (@champion) and v2 (@challenger), tulpar-tiny v1 (@pretrain-latest)."""
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    for name, n in (("kk-350m", 2), ("tulpar-tiny", 1)):
        client.create_registered_model(name)
        for v in range(1, n + 1):
            client.create_model_version(name, source=str(root / name / str(v)), tags={"tulpar.format": "hf"})
    client.set_registered_model_alias("kk-350m", "champion", "1")
    client.set_registered_model_alias("kk-350m", "challenger", "2")
    client.set_registered_model_alias("tulpar-tiny", "pretrain-latest", "1")
    return uri


@pytest.fixture(scope="module")
def keys() -> dict[str, str]:
    alice = new_key()[1]
    bob = new_key()[1]
    carol = "carol-" + uuid.uuid4().hex + uuid.uuid4().hex  # not made by us: stored as plain sha256
    return {"alice": alice, "bob": bob, "carol": carol}


@pytest.fixture(scope="module")
def keys_yaml(keys) -> str:
    return "\n".join(
        [
            f"alice: '{hash_key(keys['alice'], iterations=ITER)}'",
            f"bob: {{hash: '{hash_key(keys['bob'], iterations=ITER)}', requests_per_minute: 3}}",
            f"carol: {{hash: '{hash_key(keys['carol'], scheme='sha256')}', tokens_per_minute: 100}}",
        ]
    )


@pytest.fixture(scope="module")
def upstream():
    fake = FakeUpstream(models=list(SERVED))
    with ServerThread(fake.app) as server:
        fake.url = server.url
        yield fake


@pytest.fixture(scope="module")
def gw(upstream, registry, keys_yaml, tmp_path_factory):
    secret = tmp_path_factory.mktemp("secret") / "keys.yaml"  # a Kubernetes Secret mounted as a file
    secret.write_text(keys_yaml)
    cfg = load_gateway_config(
        None,
        [
            f"upstream.base_url={upstream.url}/v1",
            f"auth.keys_file={secret}",
            "auth.keys_env=null",
            f"mlflow_tracking_uri={registry}",
            "max_body_bytes=16384",
            "alias_refresh_s=0.5",
            "rate_limits.requests_per_minute=1000",
        ],
    )
    cfg.aliases = {
        "tulpar-kk": AliasConfig(targets=[{"model": "models:/kk-350m@champion"}]),
        "tulpar-kk-canary": AliasConfig(
            targets=[
                {"model": "models:/kk-350m@champion", "weight": 0.8},
                {"model": "models:/kk-350m@challenger", "weight": 0.2},
            ]
        ),
        "kk-pinned": AliasConfig(targets=[{"model": "models:/kk-350m/2"}]),
        "ghost": AliasConfig(targets=[{"model": "not-deployed-v1"}]),  # upstream answers {"detail": ...} 404
        "crash": AliasConfig(targets=[{"model": "crash"}]),  # upstream answers a plain-text 500
    }
    gateway = Gateway(cfg)
    with ServerThread(gateway.app) as server:
        gateway.url = server.url
        yield gateway


@pytest.fixture(scope="module")
def client(gw, keys) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=keys["alice"], max_retries=0, timeout=30)


def chat(c: openai.OpenAI, model: str = "tulpar-kk", text: str = "сәлем", **kw):
    return c.chat.completions.create(model=model, messages=[{"role": "user", "content": text}], **kw)


@pytest.fixture(scope="module")
def still_serving(client):
    """Call after a bad request: a good one right after must succeed."""

    def check() -> None:
        r = chat(client, text="still there?")
        assert r.choices[0].message.content == "Hello from kk-350m-v1! You said: still there?"

    return check


def post(gw, body: bytes | dict, key: str | None, path: str = "chat/completions", **kw) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    headers.update(kw.pop("headers", {}))
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    return httpx.post(
        f"{gw.url}/v1/{path}",
        content=body,
        headers={"content-type": "application/json", **headers},
        timeout=30,
        **kw,
    )


# ---------------------------------------------------------------------------------------------- happy paths


def test_models_lists_public_names(client):
    ids = [m.id for m in client.models.list()]
    assert ids[:5] == ["tulpar-kk", "tulpar-kk-canary", "kk-pinned", "ghost", "crash"]
    assert set(SERVED) <= set(ids)  # plain served ids are allowed too
    assert client.models.retrieve("tulpar-kk").id == "tulpar-kk"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_alias_resolves_through_mlflow_and_refreshes(gw, client, upstream, registry):
    r = chat(client, "tulpar-kk", "hi")
    assert r.choices[0].message.content == "Hello from kk-350m-v1! You said: hi"
    assert upstream.requests[-1]["body"]["model"] == "kk-350m-v1"
    raw = client.chat.completions.with_raw_response.create(
        model="tulpar-kk", messages=[{"role": "user", "content": "x"}]
    )
    assert raw.headers["x-tulpar-model"] == "tulpar-kk"
    assert raw.headers["x-tulpar-served-model"] == "kk-350m-v1"
    assert chat(client, "kk-pinned").choices[0].message.content.startswith("Hello from kk-350m-v2!")
    assert chat(client, "plain-v7").choices[0].message.content.startswith("Hello from plain-v7!")
    # multi-LoRA ids: `<public name>:<adapter>` -> `<served id>:<adapter>`
    assert (
        chat(client, "tulpar-kk:legal").choices[0].message.content.startswith("Hello from kk-350m-v1:legal!")
    )
    assert chat(client, "plain-v7:legal").choices[0].message.content.startswith("Hello from plain-v7:legal!")
    with pytest.raises(openai.NotFoundError):
        chat(client, "nobody:legal")

    from mlflow import MlflowClient

    mc = MlflowClient(tracking_uri=registry, registry_uri=registry)
    mc.set_registered_model_alias("kk-350m", "champion", "2")  # the eval gate promotes v2
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if chat(client, "tulpar-kk").choices[0].message.content.startswith("Hello from kk-350m-v2!"):
                break
            time.sleep(0.2)
        else:
            pytest.fail("the gateway did not pick up the moved alias")
    finally:
        mc.set_registered_model_alias("kk-350m", "champion", "1")
        gw.resolve_aliases(strict=True)
    assert chat(client, "tulpar-kk").choices[0].message.content.startswith("Hello from kk-350m-v1!")


def test_completions_and_upstream_headers(gw, client, upstream, keys):
    r = client.completions.create(model="tulpar-kk", prompt="Алматы", max_tokens=8)
    assert r.choices[0].text == "Hello from kk-350m-v1! You said: Алматы"
    seen = upstream.requests[-1]
    assert keys["alice"] not in json.dumps(seen["headers"])  # the caller's key never goes upstream
    assert seen["body"]["max_tokens"] == 8 and seen["body"]["model"] == "kk-350m-v1"


def test_streaming_passes_chunks_through_as_they_arrive(client, upstream):
    upstream.chunk_delay_s = 0.15
    try:
        arrivals, pieces = [], []
        t0 = time.monotonic()
        for chunk in chat(client, text="бір екі үш", stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                arrivals.append(time.monotonic() - t0)
                pieces.append(chunk.choices[0].delta.content)
    finally:
        upstream.chunk_delay_s = 0.0
    assert "".join(pieces) == "Hello from kk-350m-v1! You said: бір екі үш"
    assert len(pieces) == 8
    # buffered, every chunk would land together at the end; passed through, they are ~0.15 s apart
    assert arrivals[-1] - arrivals[0] > 0.5, arrivals  # 7 gaps of 0.15 s; buffered: all at once
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    assert sorted(gaps)[len(gaps) // 2] > 0.07, gaps


def test_client_disconnect_mid_stream_closes_upstream(gw, keys, upstream, still_serving):
    upstream.chunk_delay_s = 0.3
    abandoned = upstream.streams_abandoned
    try:
        with httpx.stream(
            "POST",
            f"{gw.url}/v1/chat/completions",
            json={
                "model": "tulpar-kk",
                "messages": [{"role": "user", "content": "a b c d e f"}],
                "stream": True,
            },
            headers={"authorization": f"Bearer {keys['alice']}"},
            timeout=30,
        ) as r:
            next(r.iter_raw())  # the first chunk, then hang up
    finally:
        upstream.chunk_delay_s = 0.0
    deadline = time.monotonic() + 10
    while True:  # the relay noticed, closed the upstream connection (the upstream stopped) and counted a 499
        text = TestClient(gw.admin_app).get("/metrics").text
        if (
            "tulpar_gateway_in_flight_requests 0.0" in text
            and 'status="499"' in text
            and upstream.streams_abandoned == abandoned + 1
        ):
            break
        assert time.monotonic() < deadline, text
        time.sleep(0.1)
    still_serving()


def test_upstream_dying_mid_stream_ends_with_an_openai_error_event(client, upstream, still_serving):
    """A replica killed mid-stream: the client gets the complete events, not the torn one, then an error event
    that the openai client raises (not a silently truncated answer, not a hang)."""
    upstream.break_stream_after = 2
    pieces = []
    try:
        with pytest.raises(openai.APIError, match="stopped in the middle of the response"):
            for chunk in chat(client, text="a b c d", stream=True):
                pieces.append(chunk.choices[0].delta.content or "")
    finally:
        upstream.break_stream_after = None
    assert "".join(pieces) == "Hello from "
    still_serving()


def test_streaming_completions_with_httpx_sse(gw, keys):
    with httpx.stream(
        "POST",
        f"{gw.url}/v1/completions",
        json={"model": "tulpar-kk", "prompt": "a", "stream": True},
        headers={"authorization": f"Bearer {keys['alice']}"},
        timeout=30,
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    text = "".join(json.loads(line[6:])["choices"][0]["text"] for line in lines[:-1])
    assert text == "Hello from kk-350m-v1! You said: a"


def test_health_and_metrics(gw, client, upstream):
    """The public port says only ok/503 and has no /metrics; the admin app has the details."""
    public = httpx.get(f"{gw.url}/health")
    assert public.status_code == 200 and public.json() == {"status": "ok"}
    assert httpx.get(f"{gw.url}/livez").json() == {"status": "ok"}
    assert_openai_error(httpx.get(f"{gw.url}/metrics"), 404)
    admin = TestClient(gw.admin_app)
    h = admin.get("/health").json()
    assert h["status"] == "ok" and h["upstream"]["reachable"] is True
    assert h["upstream"]["base_url"] == f"{upstream.url}/v1"
    assert h["aliases"]["tulpar-kk"] == [
        {"target": "models:/kk-350m@champion", "weight": 1.0, "served": "kk-350m-v1"}
    ]
    chat(client)
    text = admin.get("/metrics").text
    assert (
        'tulpar_gateway_requests_total{key="alice",model="tulpar-kk",route="chat/completions",status="200"}'
        in text
    )
    assert (
        'tulpar_gateway_upstream_requests_total{model="tulpar-kk",served_model="kk-350m-v1",status="200"}'
        in text
    )
    assert 'tulpar_gateway_alias_target{alias="tulpar-kk-canary",served_model="kk-350m-v2",' in text
    assert "tulpar_gateway_time_to_first_byte_seconds_bucket" in text


# ---------------------------------------------------------------------------------------------- bad requests


def test_missing_and_wrong_api_key_get_401(gw, keys, still_serving):
    for key in (None, "sk-wrong", keys["alice"][:-2] + "xx", "tlp-00000000-" + "a" * 43):
        r = post(gw, {"model": "tulpar-kk", "messages": []}, key)
        err = assert_openai_error(r, 401)
        assert err["code"] in ("missing_api_key", "invalid_api_key")
        assert keys["alice"] not in r.text
        still_serving()
    with pytest.raises(openai.AuthenticationError) as exc:
        chat(openai.OpenAI(base_url=f"{gw.url}/v1", api_key="nope", max_retries=0))
    assert exc.value.status_code == 401 and exc.value.code == "invalid_api_key"
    assert_openai_error(httpx.get(f"{gw.url}/v1/models"), 401)
    still_serving()


def test_rate_limit_429_with_retry_after(gw, keys, still_serving):
    bob = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=keys["bob"], max_retries=0)
    for _ in range(3):  # requests_per_minute: 3 -> a bucket of 3
        chat(bob)
    with pytest.raises(openai.RateLimitError) as exc:
        chat(bob)
    r = exc.value.response
    err = assert_openai_error(r, 429, "rate_limit_exceeded")
    assert err["type"] == "requests"
    assert 1 <= int(r.headers["retry-after"]) <= 20  # one request refills in 60/3 = 20 s
    still_serving()  # other keys are not affected


def test_tokens_per_minute_limit(gw, keys, still_serving):
    carol = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=keys["carol"], max_retries=0)
    chat(carol, max_tokens=60)  # tokens_per_minute: 100
    with pytest.raises(openai.RateLimitError) as exc:
        chat(carol, max_tokens=60)
    assert exc.value.response.json()["error"]["type"] == "tokens"
    assert int(exc.value.response.headers["retry-after"]) >= 1
    with pytest.raises(openai.RateLimitError) as exc:  # can never fit: no Retry-After
        chat(carol, max_tokens=1000)
    assert "retry-after" not in exc.value.response.headers
    still_serving()


def test_body_too_large_413(gw, keys, still_serving):
    big = {"model": "tulpar-kk", "messages": [{"role": "user", "content": "x" * 20_000}]}
    assert_openai_error(post(gw, big, keys["alice"]), 413, "request_too_large")
    still_serving()

    def chunks():  # no Content-Length: counted while reading
        for _ in range(40):
            yield b" " * 1024

    r = httpx.post(
        f"{gw.url}/v1/chat/completions",
        content=chunks(),
        headers={"authorization": f"Bearer {keys['alice']}"},
        timeout=30,
    )
    assert_openai_error(r, 413)
    still_serving()


@pytest.mark.parametrize(
    "body, param",
    [
        (b'{"model": "tulpar-kk", "messages": [', None),
        (b"not json at all", None),
        (b"[1, 2, 3]", None),
        (b'{"messages": []}', "model"),
        (
            b'{"model": "tulpar-kk", "messages": [{"role": "user", "content": "x"}], "max_tokens": -5}',
            "max_tokens",
        ),
        (
            b'{"model": "tulpar-kk", "messages": [{"role": "user", "content": "x"}], "max_tokens": "9"}',
            "max_tokens",
        ),
        (b'{"model": "tulpar-kk", "messages": [{"role": "user", "content": "x"}], "top_p": NaN}', None),
        (b'{"model": "tulpar-kk", "messages": []}', "messages"),
        # would overflow a recursive parser (the body limit is raised below)
        pytest.param(b"[" * 100_000 + b"]" * 100_000, None, id="deep"),
        pytest.param(
            b'{"model": "tulpar-kk", "messages": [{"role": "user", "content": "\xff"}]}', None, id="not-utf8"
        ),
    ],
)
def test_malformed_requests_400(gw, keys, still_serving, body, param, monkeypatch):
    monkeypatch.setattr(gw.cfg, "max_body_bytes", 1_000_000)
    err = assert_openai_error(post(gw, body, keys["alice"]), 400)
    assert err["type"] == "invalid_request_error" and err["param"] == param
    still_serving()


def test_unknown_model_404(gw, client, keys, still_serving):
    with pytest.raises(openai.NotFoundError) as exc:
        chat(client, "kk-9000")
    err = assert_openai_error(exc.value.response, 404, "model_not_found")
    assert err["param"] == "model" and "kk-9000" in err["message"]
    still_serving()
    assert_openai_error(post(gw, {"model": "x"}, keys["alice"], path="images/generations"), 404)
    assert_openai_error(httpx.get(f"{gw.url}/nowhere"), 404)
    assert_openai_error(httpx.delete(f"{gw.url}/v1/models"), 405)
    still_serving()


def test_upstream_detail_404_is_normalized(gw, client, upstream, still_serving):
    with pytest.raises(openai.NotFoundError) as exc:
        chat(client, "ghost")
    assert upstream.requests[-1]["body"]["model"] == "not-deployed-v1"  # the upstream said {"detail": ...}
    err = assert_openai_error(exc.value.response, 404, "model_not_found")
    assert "not-deployed-v1" in err["message"] and "does not exist" in err["message"]
    still_serving()


def test_upstream_plain_text_500_is_normalized(gw, client, still_serving):
    with pytest.raises(openai.InternalServerError) as exc:
        chat(client, "crash")
    err = assert_openai_error(exc.value.response, 500)
    assert err["type"] == "server_error" and "Internal Server Error" in err["message"]
    still_serving()


def inproc_gateway(upstream_models: list[str], *overrides: str, aliases=None, **kw) -> Gateway:
    """A gateway whose upstream is a FakeUpstream called in-process (no sockets), without keys unless
    `overrides` configure them."""
    fake = FakeUpstream(models=upstream_models)
    cfg = load_gateway_config(
        None,
        [
            "auth.enabled=false",
            "rate_limits.requests_per_minute=null",
            "upstream.base_url=http://fake/v1",
            *overrides,
        ],
    )
    cfg.aliases = aliases or {"m": AliasConfig(targets=[{"model": upstream_models[0]}])}
    gateway = Gateway(cfg, upstream_transport=httpx.ASGITransport(app=fake.app), **kw)
    gateway.fake = fake
    return gateway


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def schema_gw():
    """In-process gateway for schema tests: public name m -> served m-v1, small body limit, no keys."""
    gateway = inproc_gateway(["m-v1"], "max_body_bytes=131072", "request_limits.max_string_chars=50000")
    with TestClient(gateway.app) as gw:
        gw.fake = gateway.fake
        yield gw


def user(content="hi") -> dict:
    return {"role": "user", "content": content}


RICH_CHAT = {
    "model": "m",
    "messages": [
        {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [
            {"type": "text", "text": "Бұл не?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low"}},
        ]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "look", "arguments": "{}"}}]},
        {"role": "tool", "content": "a cat", "tool_call_id": "c1"},
    ],
    "tools": [{"type": "function", "function": {"name": "look", "parameters": {"type": "object"}}}],
    "tool_choice": {"type": "function", "function": {"name": "look"}},
    "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object"}}},
    "temperature": 0, "top_p": 1, "n": 2, "max_tokens": 8, "presence_penalty": -2, "frequency_penalty": 2.0,
    "stop": ["\n", "END"], "seed": -(2**63), "logprobs": True, "top_logprobs": 20, "logit_bias": {"42": -100},
    "stream": True, "stream_options": {"include_usage": True}, "user": "u1", "metadata": {"k": "v"},
    "top_k": 40, "min_p": 0.1, "repetition_penalty": 1.1,  # vLLM's extensions
}  # fmt: skip


@pytest.mark.parametrize(
    "route, body",
    [
        ("chat/completions", RICH_CHAT),
        (
            "completions",
            {"model": "m", "prompt": [[1, 2], [3]], "best_of": 3, "n": 2, "logprobs": 5, "echo": True},
        ),
        ("completions", {"model": "m", "prompt": "x", "suffix": "y", "stop": "z", "max_tokens": 1}),
        ("embeddings", {"model": "m", "input": ["a", "b"], "encoding_format": "float", "dimensions": 4}),
    ],
)
def test_schema_valid_requests_reach_the_upstream_unchanged(schema_gw, route, body):
    r = schema_gw.post(f"/v1/{route}", json=body)
    assert r.status_code == 200, r.text
    assert schema_gw.fake.requests[-1]["body"] == {**body, "model": "m-v1"}


@pytest.mark.parametrize(
    "route, body, param, code",
    [
        ("chat/completions", {**CHAT, "temperature": 2.5}, "temperature", "invalid_value"),
        ("chat/completions", {**CHAT, "temperature": "1"}, "temperature", "invalid_value"),
        ("chat/completions", {**CHAT, "top_p": -0.1}, "top_p", "invalid_value"),
        ("chat/completions", {**CHAT, "n": 0}, "n", "invalid_value"),
        ("chat/completions", {**CHAT, "n": True}, "n", "invalid_value"),
        ("chat/completions", {**CHAT, "max_completion_tokens": 0}, "max_completion_tokens", "invalid_value"),
        ("chat/completions", {**CHAT, "presence_penalty": 2.01}, "presence_penalty", "invalid_value"),
        ("chat/completions", {**CHAT, "frequency_penalty": -3}, "frequency_penalty", "invalid_value"),
        ("chat/completions", {**CHAT, "stop": ["a", "b", "c", "d", "e"]}, "stop", "invalid_value"),
        ("chat/completions", {**CHAT, "stop": 7}, "stop", "invalid_value"),
        ("chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs", "invalid_value"),
        ("chat/completions", {**CHAT, "top_logprobs": 2}, "top_logprobs", "invalid_value"),
        ("chat/completions", {**CHAT, "logit_bias": {"5": 101}}, "logit_bias.5", "invalid_value"),
        ("chat/completions", {**CHAT, "logit_bias": {"cat": 1}}, "logit_bias.cat", "invalid_value"),
        ("chat/completions", {**CHAT, "stream_options": {"include_usage": True}}, "stream_options", "invalid_value"),
        ("chat/completions", {**CHAT, "stream": "yes"}, "stream", "invalid_value"),
        ("chat/completions", {**CHAT, "tool_choice": "auto"}, "tool_choice", "invalid_value"),
        ("chat/completions", {**CHAT, "tools": [{"type": "retrieval"}]}, "tools[0].type", "invalid_value"),
        ("chat/completions", {**CHAT, "response_format": {"type": "xml"}}, "response_format", "invalid_value"),
        ("chat/completions", {**CHAT, "response_format": {"type": "json_schema"}}, "response_format.json_schema",
         "missing_required_parameter"),
        ("chat/completions", {**CHAT, "messages": []}, "messages", "invalid_value"),
        ("chat/completions", {**CHAT, "messages": [{"role": "robot", "content": "x"}]}, "messages[0]", "invalid_value"),
        ("chat/completions", {**CHAT, "messages": [user(5)]}, "messages[0].content", "invalid_value"),
        ("chat/completions", {**CHAT, "messages": [user([{"type": "image_url", "image_url": {"url": "u", "detail": "4k"}}])]},
         "messages[0].content[0].image_url.detail", "invalid_value"),
        ("chat/completions", {**CHAT, "messages": [{"role": "system", "content": [{"type": "image_url"}]}]},
         "messages[0].content[0].type", "invalid_value"),
        ("chat/completions", {**CHAT, "messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id",
         "missing_required_parameter"),
        ("chat/completions", {**CHAT, "messages": [user()] * 2049}, "messages", "array_above_max_length"),
        ("chat/completions", {**CHAT, "messages": [user("x" * 60_000)]}, "messages[0].content", "string_above_max_length"),
        ("chat/completions", {**CHAT, "metadata": json.loads('{"a":' * 40 + "1" + "}" * 40)}, "metadata" + ".a" * 31,
         "invalid_value"),
        ("chat/completions", {**CHAT, "frobnicate": 1}, "frobnicate", "unknown_parameter"),
        ("chat/completions", {**CHAT, "messages": [{**user(), "x": 1}]}, "messages[0].x", "unknown_parameter"),
        ("chat/completions", {"messages": [user()]}, "model", "missing_required_parameter"),
        ("completions", {"model": "m", "prompt": [1, "a"]}, "prompt[0]", "invalid_value"),
        ("completions", {"model": "m", "prompt": "x", "logprobs": 6}, "logprobs", "invalid_value"),
        ("completions", {"model": "m", "prompt": "x", "best_of": 1, "n": 2}, "best_of", "invalid_value"),
        ("completions", {"model": "m"}, "prompt", "missing_required_parameter"),
        ("embeddings", {"model": "m", "input": []}, "input", "invalid_value"),
        ("embeddings", {"model": "m", "input": "x", "encoding_format": "int8"}, "encoding_format", "invalid_value"),
    ],
)  # fmt: skip
def test_schema_invalid_requests_get_400_naming_the_param(schema_gw, route, body, param, code):
    n = len(schema_gw.fake.requests)
    err = assert_openai_error(schema_gw.post(f"/v1/{route}", json=body), 400, code)
    assert err["param"] == param and err["type"] == "invalid_request_error"
    assert len(schema_gw.fake.requests) == n  # nothing reached the engine
    assert schema_gw.post("/v1/chat/completions", json=CHAT).status_code == 200


# Hypothesis strategies written from the API reference (independently of services/gateway/schema.py): requests
# valid by construction, and valid requests with exactly one documented rule broken.
_text = st.text(max_size=20)
_text_part = st.fixed_dictionaries({"type": st.just("text"), "text": _text})
_image_part = st.fixed_dictionaries(
    {"type": st.just("image_url"), "image_url": st.fixed_dictionaries(
        {"url": _text}, optional={"detail": st.sampled_from(["auto", "low", "high"])})}
)  # fmt: skip
_message = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["system", "developer"]),
                           "content": _text | st.lists(_text_part, min_size=1, max_size=2)}),
    st.fixed_dictionaries({"role": st.just("user"),
                           "content": _text | st.lists(_text_part | _image_part, min_size=1, max_size=3)},
                          optional={"name": _text}),
    st.fixed_dictionaries({"role": st.just("assistant")}, optional={"content": _text | st.none()}),
    st.fixed_dictionaries({"role": st.just("tool"), "content": _text, "tool_call_id": _text}),
)  # fmt: skip
_fname = st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True)
_tools = st.lists(
    st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
        {"name": _fname}, optional={"description": _text, "parameters": st.just({"type": "object"})})}),
    min_size=1, max_size=2,
)  # fmt: skip
_num = {"allow_nan": False, "allow_infinity": False}
_SAMPLING = {
    "temperature": st.floats(0, 2, **_num),
    "top_p": st.floats(0, 1, **_num),
    "presence_penalty": st.floats(-2, 2, **_num),
    "frequency_penalty": st.floats(-2, 2, **_num),
    "max_tokens": st.integers(1, 4096),
    "n": st.integers(1, 8),
    "seed": st.integers(-(2**63), 2**63 - 1),
    "stop": st.none() | _text | st.lists(_text, min_size=1, max_size=4),
    "user": _text,
    "logit_bias": st.dictionaries(st.integers(0, 10**6).map(str), st.integers(-100, 100), max_size=3),
}


@st.composite
def valid_chat(draw) -> dict:
    body = draw(st.fixed_dictionaries(
        {"model": st.just("m"), "messages": st.lists(_message, min_size=1, max_size=4)},
        optional={**_SAMPLING, "max_completion_tokens": st.integers(1, 4096), "logprobs": st.booleans(),
                  "response_format": st.sampled_from([{"type": "text"}, {"type": "json_object"}])},
    ))  # fmt: skip
    if body.get("logprobs") and draw(st.booleans()):
        body["top_logprobs"] = draw(st.integers(0, 20))
    if draw(st.booleans()):
        body["tools"] = draw(_tools)
        body["tool_choice"] = draw(st.sampled_from(["none", "auto", "required"]))
    if draw(st.booleans()):
        body["stream"] = True
        if draw(st.booleans()):
            body["stream_options"] = {"include_usage": draw(st.booleans())}
    return body


_valid_completion = st.fixed_dictionaries(
    {"model": st.just("m"),
     "prompt": _text | st.lists(_text, min_size=1, max_size=3) | st.lists(st.integers(0, 50_000), min_size=1)},
    optional={**_SAMPLING, "echo": st.booleans(), "logprobs": st.integers(0, 5), "suffix": _text},
)  # fmt: skip
_valid_embedding = st.fixed_dictionaries(
    {"model": st.just("m"), "input": _text | st.lists(_text, min_size=1, max_size=3)},
    optional={"encoding_format": st.sampled_from(["float", "base64"]), "dimensions": st.integers(1, 4096)},
)  # fmt: skip
_not_number = (
    st.text(max_size=3) | st.booleans() | st.lists(st.integers(), max_size=2) | st.none().map(lambda _: {})
)
_BREAK = {  # field -> values the reference rules out
    "temperature": st.floats(2, 3, exclude_min=True) | st.floats(-1, 0, exclude_max=True) | _not_number,
    "top_p": st.floats(1, 2, exclude_min=True) | st.floats(-1, 0, exclude_max=True) | _not_number,
    "presence_penalty": st.floats(2, 3, exclude_min=True) | st.floats(-3, -2, exclude_max=True),
    "frequency_penalty": st.floats(2, 3, exclude_min=True) | st.floats(-3, -2, exclude_max=True),
    "max_tokens": st.integers(max_value=0) | st.floats(0.5, 99.5).filter(lambda x: x != int(x)) | _not_number,
    "n": st.integers(max_value=0) | st.booleans() | st.text(max_size=2),
    "stop": st.lists(_text, min_size=5, max_size=8) | st.integers() | st.lists(st.integers(), min_size=1, max_size=2),
    "logit_bias": st.dictionaries(st.integers(0, 99).map(str), st.integers(101, 10**6), min_size=1, max_size=2),
    "stream": st.integers() | st.text(max_size=3),
    "model": st.integers() | st.just("") | st.lists(_text, max_size=1),
    "messages": st.just([]) | st.text(max_size=3) | st.lists(st.fixed_dictionaries(
        {"role": _text.filter(lambda r: r not in ("system", "developer", "user", "assistant", "tool", "function")),
         "content": _text}), min_size=1, max_size=2),
    "response_format": st.fixed_dictionaries({"type": _text.filter(
        lambda t: t not in ("text", "json_object", "json_schema"))}),
    "top_logprobs": st.integers(21, 30) | st.integers(-10, -1),
    "tool_choice": _text.filter(lambda t: t not in ("none", "auto", "required")),
}  # fmt: skip
_KNOWN = set(ChatCompletionRequest.model_fields)


_RULES = sorted(_BREAK) + [
    "unknown field", "missing model", "not an object", "top_logprobs without logprobs", "stream_options without stream"
]  # fmt: skip


@st.composite
def invalid_chat(draw, rule: str) -> dict:
    body = draw(valid_chat())
    if rule == "top_logprobs without logprobs":
        body["top_logprobs"] = draw(st.integers(0, 20))
        body["logprobs"] = draw(st.sampled_from([False, None]))
    elif rule == "stream_options without stream":
        body.pop("stream", None)
        body["stream_options"] = {"include_usage": True}
        if draw(st.booleans()):
            body["stream"] = False
    elif rule == "unknown field":
        body[draw(st.from_regex(r"[a-z_]{1,12}", fullmatch=True).filter(lambda k: k not in _KNOWN))] = 1
    elif rule == "missing model":
        del body["model"]
    elif rule == "not an object":
        return draw(st.lists(st.just(body), max_size=1) | st.just("m") | st.integers() | st.none())
    else:
        body[rule] = draw(_BREAK[rule])
        if rule == "top_logprobs":
            body["logprobs"] = True
        if rule == "tool_choice":
            body["tools"] = draw(_tools)
    return body


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(**_num) | _text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=4),
    max_leaves=20,
)
_garbage = st.one_of(
    st.binary(max_size=64),
    _json.map(lambda v: json.dumps(v).encode()),
    st.integers(33, 400).map(lambda d: b'{"model": "m", "messages": ' + b"[" * d + b"]" * d + b"}"),  # deep
    st.integers(1, 3).map(lambda k: b'{"model": "m", "pad": "' + b"x" * (k * 70_000) + b'"}'),  # huge
    st.sampled_from([b'{"model": "m", "messages": [], "temperature": NaN}', b"\xff\xfe{", b"", b"{" * 5000]),
)


def _sent(gw, route: str, raw: bytes) -> httpx.Response:
    return gw.post(f"/v1/{route}", content=raw, headers={"content-type": "application/json"})


# no deadline and no too_slow check: CI machines are shared and slow; the examples are bounded instead
_FUZZ = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
}


@settings(max_examples=150, **_FUZZ)
@given(
    valid=st.tuples(st.just("chat/completions"), valid_chat())
    | st.tuples(st.just("completions"), _valid_completion)
    | st.tuples(st.just("embeddings"), _valid_embedding),
    garbage=st.tuples(st.sampled_from(["chat/completions", "completions", "embeddings"]), _garbage),
)
def test_fuzz_valid_get_2xx_garbage_never_5xx(schema_gw, valid, garbage):
    route, body = valid
    r = _sent(schema_gw, route, json.dumps(body).encode())
    assert r.status_code == 200, (body, r.text)
    assert schema_gw.fake.requests[-1]["body"] == {**body, "model": "m-v1"}
    route, raw = garbage
    r = _sent(schema_gw, route, raw)
    assert r.status_code < 500, (raw[:200], r.text)
    if r.status_code >= 400:
        assert_openai_error(r, r.status_code)


@pytest.mark.parametrize("rule", _RULES)
def test_fuzz_one_broken_rule_gets_4xx(schema_gw, rule):
    """Valid chat requests with one rule of the reference broken (per rule, so every rule gets examples)."""

    @settings(max_examples=10, database=None, **_FUZZ)
    @given(invalid_chat(rule))
    def check(body) -> None:
        n = len(schema_gw.fake.requests)
        r = _sent(schema_gw, "chat/completions", json.dumps(body).encode())
        assert 400 <= r.status_code < 500, (body, r.text)
        assert_openai_error(r, r.status_code)
        assert len(schema_gw.fake.requests) == n

    check()


def test_no_healthy_upstream_503_with_retry_after_then_recovers():
    """Upstream refusing connections (no replica) -> 503 + Retry-After in OpenAI's format, for plain and streaming
    requests, and public /health 503; once it listens again the next request succeeds (no waiting)."""
    sock = bound_socket()  # bound, not listening: connections are refused
    port = sock.getsockname()[1]
    cfg = load_gateway_config(
        None,
        [
            f"upstream.base_url=http://127.0.0.1:{port}/v1",
            "auth.enabled=false",
            "upstream.unavailable_retry_after_s=3",
        ],
    )
    cfg.aliases = {"m": AliasConfig(targets=[{"model": "m-v1"}])}
    fake = FakeUpstream(models=["m-v1"])
    with TestClient(Gateway(cfg).app) as gw:
        for body in (CHAT, {**CHAT, "stream": True}):
            r = gw.post("/v1/chat/completions", json=body)
            err = assert_openai_error(r, 503, "no_healthy_upstream")
            assert err["type"] == "server_error" and r.headers["retry-after"] == "3"
        h = gw.get("/health")
        assert (h.status_code, h.json(), h.headers["retry-after"]) == (503, {"status": "unavailable"}, "3")
        with ServerThread(fake.app, sock=sock):
            r = gw.post("/v1/chat/completions", json=CHAT)
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"].startswith(
                "Hello from m-v1"
            )
            assert gw.get("/health").json() == {"status": "ok"}
    # Ray Serve's own 503 (no replica can take it): passed on in OpenAI's format, with Retry-After
    gateway = inproc_gateway(["m-v1"], aliases={"m": AliasConfig(targets=[{"model": "no-replica"}])})
    with TestClient(gateway.app) as gw:
        r = gw.post("/v1/chat/completions", json=CHAT)
        assert_openai_error(r, 503)
        assert r.headers["retry-after"] == "5"


class RawUpstream:
    """A loopback TCP server that answers /v1/models like an OpenAI server and treats every other request as
    `mode` says: "close" (read it, then close the connection without a word: a replica that died with the
    request) or "stall" (read it and never answer: a hung replica)."""

    MODELS = b'{"object": "list", "data": [{"id": "m-v1", "object": "model", "owned_by": "raw"}]}'

    def __init__(self, mode: str) -> None:
        self.mode, self.held = mode, []
        self.sock = bound_socket()
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while True:
                data = b""
                while b"\r\n\r\n" not in data:
                    piece = conn.recv(65536)
                    if not piece:
                        return conn.close()
                    data += piece
                head, _, body = data.partition(b"\r\n\r\n")
                length = (
                    int(re.search(rb"(?i)content-length: *(\d+)", head).group(1)) if b"POST" in head else 0
                )
                while len(body) < length:
                    body += conn.recv(65536)
                if head.startswith(b"GET /v1/models"):
                    conn.sendall(
                        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
                        + str(len(self.MODELS)).encode()
                        + b"\r\n\r\n"
                        + self.MODELS
                    )
                elif self.mode == "close":
                    return conn.close()
                else:
                    self.held.append(conn)
                    return

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


@pytest.mark.parametrize(
    "mode, status, words",
    [("close", 502, "closed the connection before answering"), ("stall", 504, "upstream timed out")],
)
def test_upstream_that_drops_or_stalls_gets_502_or_504(mode, status, words):
    """Through the real upstream transport (aiohttp): a connection closed with the request unanswered is a 502,
    an answer that never comes a 504 after upstream.read_timeout_s, both in OpenAI's format, plain and
    streaming; the gateway then serves the next request."""
    raw = RawUpstream(mode)
    cfg = load_gateway_config(
        None, [f"upstream.base_url={raw.url}", "auth.enabled=false", "upstream.read_timeout_s=0.5"]
    )
    cfg.aliases = {"m": AliasConfig(targets=[{"model": "m-v1"}])}
    try:
        with TestClient(Gateway(cfg).app) as gw:
            for body in (CHAT, {**CHAT, "stream": True}, CHAT):
                t0 = time.monotonic()
                err = assert_openai_error(gw.post("/v1/chat/completions", json=body), status)
                assert words in err["message"], err
                assert time.monotonic() - t0 < 10
            assert gw.get("/v1/models").json()["data"][0]["id"] == "m"
    finally:
        raw.close()


def test_restart_keeps_keys_and_quota_usage(keys, keys_yaml, tmp_path):
    """A second gateway process on the same state_dir (the first one not shut down: as after a kill) accepts the
    same keys and remembers what bob (3 requests/minute) has spent; a fresh state_dir would have forgotten."""
    secret = tmp_path / "keys.yaml"
    secret.write_text(keys_yaml)

    def start(state_dir: Path) -> TestClient:
        gateway = inproc_gateway(
            ["m-v1"],
            "auth.enabled=true",
            f"auth.keys_file={secret}",
            "auth.keys_env=null",
            f"state_dir={state_dir}",
        )
        return TestClient(gateway.app)

    def ask(gw: TestClient, who: str) -> httpx.Response:
        return gw.post("/v1/chat/completions", json=CHAT, headers={"authorization": f"Bearer {keys[who]}"})

    with start(tmp_path / "state") as first:
        assert [ask(first, "bob").status_code for _ in range(4)] == [200, 200, 200, 429]
        with start(tmp_path / "state") as second:
            assert ask(second, "alice").status_code == 200
            r = ask(second, "bob")
            assert_openai_error(r, 429, "rate_limit_exceeded")
            assert 1 <= int(r.headers["retry-after"]) <= 20
    with start(tmp_path / "other-state") as fresh:
        assert ask(fresh, "bob").status_code == 200


def test_rate_limit_state_refills_for_the_time_down(tmp_path):
    """Stored levels refill at the bucket's rate for the wall-clock time between the write and the restart."""
    now = [1000.0]
    store = BucketStore(tmp_path)
    first = RateLimiter(lambda: 0.0, store=store, wall_clock=lambda: now[0])  # frozen monotonic clock
    limits = Limits(requests_per_minute=6, request_burst=3, tokens_per_minute=600)
    assert [first.acquire("k", limits, 200).allowed for _ in range(4)] == [True, True, True, False]
    assert store.load("k", "requests")[0] == 0.0 and store.load("k", "tokens")[0] == 0.0
    now[0] += 25.0  # down for 25 s: 6/min refills 2.5 requests, 600/min 250 tokens
    second = RateLimiter(lambda: 0.0, store=BucketStore(tmp_path), wall_clock=lambda: now[0])
    assert [second.acquire("k", limits, 100).allowed for _ in range(3)] == [True, True, False]
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ValueError, match="state_dir .* is not usable"):
        BucketStore(tmp_path / "a-file" / "state")


def test_public_port_exposes_nothing_admin_port_has_details(tmp_path):
    gateway = inproc_gateway(["m-v1"])
    with TestClient(gateway.app) as gw:
        assert gw.post("/v1/chat/completions", json=CHAT).status_code == 200
        assert gw.get("/health").json() == {"status": "ok"}
        for path in ("/metrics", "/admin", "/health/details"):
            assert_openai_error(gw.get(path), 404)
        admin = TestClient(gateway.admin_app)
        assert 'route="chat/completions"' in admin.get("/metrics").text
        assert admin.get("/health").json()["upstream"]["base_url"] == "http://fake/v1"
        assert_openai_error(admin.post("/v1/chat/completions", json=CHAT), 404)  # no API on the admin port
    with pytest.raises(ConfigError, match="admin.port 8080 is the public port"):
        load_gateway_config(None, ["port=8080", "admin.port=8080"])


# ---------------------------------------------------------------------------------------------- canary


def test_canary_random_split_is_weighted_and_seeded():
    cfg = AliasConfig(
        targets=[{"model": "a", "weight": 0.8}, {"model": "b", "weight": 0.2}], split="random", seed=1234
    )
    n = 20_000
    ra = ResolvedAlias("c", cfg, ["a", "b"])
    picks = [ra.pick_index("") for _ in range(n)]
    share_b = sum(picks) / n
    sigma = math.sqrt(0.2 * 0.8 / n)
    assert abs(share_b - 0.2) < 4 * sigma, share_b  # 4 sigma: fails by chance ~6e-5 of the time, never seeded
    again = ResolvedAlias("c", cfg, ["a", "b"])
    assert [again.pick_index("") for _ in range(n)] == picks  # same seed, same sequence
    three = AliasConfig(targets=[{"model": "a", "weight": 1}, {"model": "b", "weight": 1}, {"model": "c", "weight": 2}],
                        split="random", seed=7)  # fmt: skip
    ra3 = ResolvedAlias("c3", three, ["a", "b", "c"])
    counts = [0, 0, 0]
    for _ in range(n):
        counts[ra3.pick_index("")] += 1
    for count, p in zip(counts, (0.25, 0.25, 0.5)):
        assert abs(count / n - p) < 4 * math.sqrt(p * (1 - p) / n), counts


def test_canary_request_id_split_is_weighted_and_sticky():
    cfg = AliasConfig(targets=[{"model": "a", "weight": 0.9}, {"model": "b", "weight": 0.1}])
    ra = ResolvedAlias("c", cfg, ["a", "b"])
    rng = random.Random(0)
    ids = [f"{rng.getrandbits(128):032x}" for _ in range(20_000)]
    picks = [ra.pick_index(i) for i in ids]
    share_b = sum(picks) / len(ids)
    assert abs(share_b - 0.1) < 4 * math.sqrt(0.1 * 0.9 / len(ids)), share_b
    assert all(ra.pick_index(i) == p for i, p in zip(ids[:500], picks))  # same id -> same target
    zero = ResolvedAlias("z", AliasConfig(targets=[{"model": "a"}, {"model": "b", "weight": 0}]), ["a", "b"])
    assert {zero.pick_index(i) for i in ids[:2000]} == {0}  # weight 0 gets nothing


def test_canary_through_the_gateway(gw, client, upstream):
    """Requests with X-Request-ID go where the router says; both versions get traffic, ~80/20."""
    ra = ResolvedAlias("tulpar-kk-canary", gw.cfg.aliases["tulpar-kk-canary"], ["kk-350m-v1", "kk-350m-v2"])
    served = []
    for i in range(60):
        rid = f"req-{i}"
        r = chat(client, "tulpar-kk-canary", extra_headers={"x-request-id": rid})
        got = r.choices[0].message.content.split("!")[0].removeprefix("Hello from ")
        assert got == ["kk-350m-v1", "kk-350m-v2"][ra.pick_index(rid)]
        assert upstream.requests[-1]["headers"]["x-request-id"] == rid
        served.append(got)
    assert 30 <= served.count("kk-350m-v1") <= 59 and served.count("kk-350m-v2") >= 1
    same = {chat(client, "tulpar-kk-canary", extra_headers={"x-request-id": "sticky"}).choices[0].message.content
            for _ in range(5)}  # fmt: skip
    assert len(same) == 1


# ---------------------------------------------------------------------------------------------- units


def test_keys_hash_verify_and_formats(tmp_path):
    key_id, key = new_key()
    stored = hash_key(key, iterations=ITER)
    assert stored.startswith(f"pbkdf2-sha256:{key_id}:{ITER}:") and key not in stored
    assert stored != hash_key(key, iterations=ITER)  # salted
    (k,) = parse_keys(f"me: '{stored}'", "test")
    assert k.matches(key) and not k.matches(key + "x")
    with pytest.raises(ValueError, match="pbkdf2-sha256 needs a key made by"):
        hash_key("short-human-password")
    with pytest.raises(ValueError, match="stored hash is not"):
        parse_keys("me: 'md5:abc'", "test")
    with pytest.raises(ValueError, match="unknown fields"):
        parse_keys("me: {hash: 'sha256:" + "0" * 64 + "', rpm: 3}", "test")
    listed = parse_keys(f"keys:\n  - name: me\n    hash: '{stored}'\n    tokens_per_minute: 10", "test")
    assert listed[0].tokens_per_minute == 10

    secret = tmp_path / "keys.yaml"
    secret.write_text(f"me: '{stored}'\n")
    store = KeyStore(secret, None, reload_s=0.0)
    assert store.verify(key).name == "me" and store.verify("tlp-" + key_id + "-" + "x" * 43) is None
    other_key = new_key()[1]
    time.sleep(0.01)
    secret.write_text(f"you: '{hash_key(other_key, iterations=ITER)}'\n# rotated\n")  # the Secret is rotated
    store.maybe_reload()
    assert store.verify(key) is None and store.verify(other_key).name == "you"
    with pytest.raises(ValueError, match="not found"):
        KeyStore(tmp_path / "missing.yaml", None)


def test_keys_cli(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-m", "services.gateway.keys", "new", "--name", "ci", "--iterations", "1000"],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=60, check=True,
    )  # fmt: skip
    key = out.stderr.strip().rsplit(" ", 1)[-1]
    (k,) = parse_keys(out.stdout, "cli")
    assert k.name == "ci" and k.matches(key)


def test_rate_limiter_refills():
    now = [0.0]
    rl = RateLimiter(clock=lambda: now[0])
    lim = Limits(requests_per_minute=2, request_burst=None, tokens_per_minute=None)
    assert rl.acquire("k", lim, 1).allowed and rl.acquire("k", lim, 1).allowed
    d = rl.acquire("k", lim, 1)
    assert not d.allowed and d.limit == "requests" and math.isclose(d.retry_after_s, 30.0)
    now[0] = 30.0
    assert rl.acquire("k", lim, 1).allowed
    both = Limits(requests_per_minute=100, request_burst=None, tokens_per_minute=60)
    assert rl.acquire("t", both, 50).allowed
    d = rl.acquire("t", both, 50)
    assert not d.allowed and d.limit == "tokens" and math.isclose(d.retry_after_s, 40.0)
    assert rl.acquire("t", both, 10).allowed  # refusing one request took nothing from either bucket


def test_normalize_error_bodies():
    def norm(status, body):
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        return normalize_error_body(status, raw)["error"]

    e = norm(404, {"detail": "The model `x` does not exist."})
    msg = "The model `x` does not exist."
    assert e == {"message": msg, "type": "invalid_request_error", "param": None, "code": "not_found"}
    e = norm(
        422, {"detail": [{"loc": ["body", "max_tokens"], "msg": "must be positive", "type": "value_error"}]}
    )
    assert e["message"] == "max_tokens: must be positive" and e["param"] == "max_tokens"
    vllm = {
        "error": {"message": "max_tokens too large", "type": "BadRequestError", "param": None, "code": 400}
    }
    assert norm(400, vllm) == {
        "message": "max_tokens too large",
        "type": "BadRequestError",
        "param": None,
        "code": "400",
    }
    assert norm(400, {"error": {"message": "m"}})["type"] == "invalid_request_error"
    assert norm(503, b"<html>Service Unavailable</html>")["message"].startswith("upstream error 503: <html>")
    assert norm(502, b"")["message"] == "upstream error 502: Bad Gateway"
    assert norm(500, {"error": "boom"}) == {
        "message": "boom",
        "type": "server_error",
        "param": None,
        "code": None,
    }


# ---------------------------------------------------------------------------------------------- config, CLI


def test_local_config_resolves_tiny_alias(registry, keys_yaml, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry)
    monkeypatch.setenv("TULPAR_GATEWAY_KEYS", keys_yaml)
    monkeypatch.setenv("TULPAR_GATEWAY__PORT", "9999")
    cfg = load_gateway_config(REPO / "configs/gateway/local.yaml", ["rate_limits.tokens_per_minute=null"])
    assert cfg.port == 9999 and cfg.upstream.base_url == "http://127.0.0.1:8000/v1"
    assert cfg.rate_limits.tokens_per_minute is None
    gateway = Gateway(cfg)
    assert gateway.router.table()["tulpar-tiny"][0]["served"] == "tulpar-tiny-v1"
    env = {"TULPAR_GATEWAY__UPSTREAM__BASE_URL": "http://x/v1", "OTHER": "1", "PORT": "81", "HOST": "0.0.0.0"}
    assert env_overrides(env) == ["host=0.0.0.0", "port=81", "upstream.base_url=http://x/v1"]
    cfg = load_gateway_config(None, ["aliases.tulpar-kk=models:/kk-350m@champion"], environ=env)
    assert (cfg.host, cfg.port, cfg.upstream.base_url) == ("0.0.0.0", 81, "http://x/v1")
    assert cfg.aliases["tulpar-kk"].targets[0].model == "models:/kk-350m@champion"  # the short form


def test_bad_configs_fail_with_clear_messages(registry, keys_yaml, monkeypatch):
    monkeypatch.setenv("TULPAR_GATEWAY_KEYS", keys_yaml)
    with pytest.raises(ConfigError, match="upstream.base_url"):
        load_gateway_config(None, ["upstream.base_url=localhost:8000"])
    with pytest.raises(ConfigError, match="unknown key"):
        load_gateway_config(None, ["ratelimits.rpm=3"])
    cfg = load_gateway_config(None, [f"mlflow_tracking_uri={registry}"])
    cfg.aliases = {"kk": AliasConfig(targets=[{"model": "models:/kk-350m@no-such-alias"}])}
    with pytest.raises(ValueError, match="models:/kk-350m@no-such-alias"):
        Gateway(cfg)
    cfg.require_resolved_aliases = False  # start anyway; the alias answers 503 until it resolves
    served, why = Gateway(cfg).router.route("kk", "r")
    assert served is None and "no-such-alias" in why
    monkeypatch.delenv("TULPAR_GATEWAY_KEYS")
    with pytest.raises(ValueError, match="no API keys are configured"):
        Gateway(load_gateway_config(None, []))


def test_cli_serves_and_refuses_bad_config(upstream, registry, keys, keys_yaml, tmp_path):
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "MLFLOW_TRACKING_URI": registry,
        "TULPAR_GATEWAY_KEYS": keys_yaml,
        "TULPAR_GATEWAY__UPSTREAM__BASE_URL": f"{upstream.url}/v1",
    }
    bad = subprocess.run(
        [sys.executable, "-m", "services.gateway", "--config", "configs/gateway/local.yaml", "prot=1"],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.startswith("error: invalid config") and "prot" in bad.stderr
    with socket.socket() as s, socket.socket() as s2:
        s.bind(("127.0.0.1", 0))
        s2.bind(("127.0.0.1", 0))
        port, admin_port = s.getsockname()[1], s2.getsockname()[1]
    log = (tmp_path / "gateway.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.gateway", "--config", "configs/gateway/local.yaml", f"port={port}",
         f"admin.port={admin_port}"],
        env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "gateway.log").read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "gateway did not come up"
            time.sleep(0.3)
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=keys["alice"], max_retries=0)
        assert (
            chat(c, "tulpar-tiny", "hi").choices[0].message.content
            == "Hello from tulpar-tiny-v1! You said: hi"
        )
        assert "tulpar-tiny" in [m.id for m in c.models.list()]
        assert httpx.get(f"http://127.0.0.1:{port}/health").json() == {"status": "ok"}
        assert httpx.get(f"http://127.0.0.1:{port}/metrics").status_code == 404
        metrics = httpx.get(f"http://127.0.0.1:{admin_port}/metrics").text  # the second listener
        assert 'key="alice",model="tulpar-tiny",route="chat/completions",status="200"' in metrics
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=30)
        log.close()
    # uvicorn shuts down gracefully, then re-raises the signal: exit status -15 (128 + 15 from a shell)
    assert rc in (0, -signal.SIGTERM), (tmp_path / "gateway.log").read_text()
    assert "Finished server process" in (tmp_path / "gateway.log").read_text()
