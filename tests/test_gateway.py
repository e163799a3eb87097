"""services.gateway against a fake OpenAI-compatible upstream on loopback (no vLLM): auth, limits, errors, aliases
through a real MLflow SQLite registry, canaries, streaming, metrics, the CLI. Every bad request is followed by a
good one to show the gateway keeps serving."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import openai
import pytest

from llm_core.config import ConfigError
from services.gateway import Gateway, load_gateway_config
from services.gateway.config import AliasConfig, env_overrides
from services.gateway.errors import normalize_error_body
from services.gateway.keys import KeyStore, hash_key, new_key, parse_keys
from services.gateway.ratelimit import Limits, RateLimiter
from services.gateway.routing import ResolvedAlias
from tests.fake_openai import FakeUpstream, ServerThread

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
    while True:  # the relay noticed, closed the upstream response and counted a 499
        text = httpx.get(f"{gw.url}/metrics").text
        if "tulpar_gateway_in_flight_requests 0.0" in text and 'status="499"' in text:
            break
        assert time.monotonic() < deadline, text
        time.sleep(0.1)
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


def test_health_and_metrics(gw, client):
    h = httpx.get(f"{gw.url}/health").json()
    assert h["status"] == "ok" and h["upstream"]["reachable"] is True
    assert h["aliases"]["tulpar-kk"] == [
        {"target": "models:/kk-350m@champion", "weight": 1.0, "served": "kk-350m-v1"}
    ]
    chat(client)
    text = httpx.get(f"{gw.url}/metrics").text
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
        (b'{"model": "tulpar-kk", "messages": [], "max_tokens": -5}', "max_tokens"),
        (b'{"model": "tulpar-kk", "messages": [], "max_tokens": "many"}', "max_tokens"),
    ],
)
def test_malformed_requests_400(gw, keys, still_serving, body, param):
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


def test_upstream_down_gives_502(keys_yaml, keys, monkeypatch):
    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("GW_TEST_KEYS", keys_yaml)
    cfg = load_gateway_config(
        None, [f"upstream.base_url=http://127.0.0.1:{port}/v1", "auth.keys_env=GW_TEST_KEYS"]
    )
    cfg.aliases = {"m": AliasConfig(targets=[{"model": "m-v1"}])}
    with ServerThread(Gateway(cfg).app) as server:
        r = post(server, {"model": "m", "messages": []}, keys["alice"])
        assert_openai_error(r, 502, "upstream_unavailable")
        assert httpx.get(f"{server.url}/health").json()["upstream"]["reachable"] is False


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
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = (tmp_path / "gateway.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.gateway", "--config", "configs/gateway/local.yaml", f"port={port}"],
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
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=30)
        log.close()
    # uvicorn shuts down gracefully, then re-raises the signal: exit status -15 (128 + 15 from a shell)
    assert rc in (0, -signal.SIGTERM), (tmp_path / "gateway.log").read_text()
    assert "Finished server process" in (tmp_path / "gateway.log").read_text()
