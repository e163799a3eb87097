"""The platform as containers: every CPU image built here from a debootstrap base, then the compose stack end to end.

`make images-local` (infra/images/build_local.sh) installs and starts Docker when it can; where no engine can be
started (no apt, no root) the tests skip and say why. With an engine every CPU image is built (in the background
from the moment pytest has collected these tests, which run last; pip's cache and BuildKit's layers make a
rebuild take seconds), the tests check what is inside the images, then run the stack of
infra/compose (as the compose project `tulpar-test`, its own volumes) and drive it as a user would:

  tokenizer -> preprocess -> pretrain submitted through the Ray Jobs API to the containerized Ray head (training on
  the Ray worker container) -> a model version in the containerized MLflow (metadata in PostgreSQL, artifacts in
  the S3 store) -> the serving container serves it -> the `openai` client through the gateway container with the
  stack's API key -> the chat UI container in headless Chromium -> MLflow and PostgreSQL restarted lose nothing ->
  `stack-down` / `stack-up` comes back healthy with the version's weights unchanged in MLflow and S3.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCKER = os.environ.get("DOCKER", "/usr/bin/docker")
PROJECT = "tulpar-test"
IMAGES = ["train-cpu", "serve-cpu", "gateway", "chat-ui", "mlflow", "postgres", "s3"]
REGISTRY, TAG = "ghcr.io/tulpar-ai", "0.1.0"
pytestmark = [pytest.mark.containers, pytest.mark.slow]


def _settings() -> dict[str, str]:
    out = {}
    for line in (REPO / "infra/compose/defaults.env").read_text().splitlines():
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            out[key] = value
    return out


PORTS = _settings()


def _run(
    cmd: list[str], timeout: float, env: dict | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )
    if check and proc.returncode != 0:
        pytest.fail(
            f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


def _stack(*args: str, timeout: float = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    return _run(["infra/compose/stack.sh", *args], timeout, {"STACK_PROJECT": PROJECT, **(env or {})})


def _secrets() -> dict[str, str]:
    lines = (REPO / "build/compose/secrets.env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line)


def _container(service: str) -> str:
    return f"{PROJECT}_{service}_1"


def _logs(service: str, lines: int = 40) -> str:
    """The last lines a container printed, for a failure's message."""
    proc = subprocess.run(
        [DOCKER, "logs", "--tail", str(lines), _container(service)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return f"--- docker logs {_container(service)} ---\n{proc.stdout}{proc.stderr}"


@pytest.fixture(scope="module")
def images(request):
    """Docker started (or the module skips, saying why), then every CPU image built (seconds and size of each in
    build/image-timings-test.txt). The build started in the background when the session was collected
    (tests/conftest.py); this waits for it."""
    from tests.conftest import IMAGE_BUILD_KEY, ImageBuild

    build = request.config.stash.get(IMAGE_BUILD_KEY, None) or ImageBuild(IMAGES)
    rc = build.wait(timeout=2400)
    if rc == 3:
        pytest.skip(f"no Docker engine can be started here: {build.tail(1)}")
    assert rc == 0, f"infra/images/build_local.sh exited {rc}:\n{build.tail()}"


def _inspect(image: str) -> dict:
    return json.loads(_run([DOCKER, "image", "inspect", image], 60).stdout)[0]


def test_images_are_non_root_labelled_checked_and_lean(images):
    commit = _run(["git", "rev-parse", "HEAD"], 30).stdout.strip()
    for name in IMAGES:
        image = f"{REGISTRY}/tulpar-{name}:{TAG}"
        cfg = _inspect(image)["Config"]
        assert cfg["User"] not in ("", "0", "root"), f"{image} runs as root"
        assert cfg.get("Healthcheck", {}).get("Test"), f"{image} declares no health check"
        labels = cfg["Labels"]
        assert labels["org.opencontainers.image.version"] == TAG, (image, labels)
        assert labels["org.opencontainers.image.revision"] == commit, (image, labels)
    # The Python images: the code and configs inside, no tests, no pip cache, torch's CPU build, importable as
    # the non-root user from any directory.
    probe = (
        "import os, pathlib, torch, jobs, llm_core; "
        "assert not pathlib.Path('/app/tests').exists(); "
        "assert pathlib.Path('/app/configs/eval/tiny.yaml').exists(); "
        "assert not any(pathlib.Path('/root/.cache', '/home/tulpar/.cache').exists() for _ in [0]); "
        "assert torch.__version__.endswith('+cpu'), torch.__version__; "
        "print(os.getuid(), torch.__version__)"
    )
    out = _run(
        [
            DOCKER,
            "run",
            "--rm",
            "--network",
            "host",
            "-w",
            "/tmp",
            f"{REGISTRY}/tulpar-train-cpu:{TAG}",
            "python",
            "-c",
            probe,
        ],
        120,
    ).stdout
    assert out.split()[0] == "10001", out
    vllm = _run(
        [
            DOCKER,
            "run",
            "--rm",
            "--network",
            "host",
            f"{REGISTRY}/tulpar-serve-cpu:{TAG}",
            "python",
            "-c",
            "import vllm, importlib.util as u; print(vllm.__version__, u.find_spec('torchvision'))",
        ],
        180,
    ).stdout
    assert vllm.split()[0].startswith("0.32") and vllm.split()[1] == "None", vllm
    # A second build of an image reuses every layer: seconds, not a download.
    started = time.monotonic()
    _run(["infra/images/build_local.sh", "gateway"], 600)
    assert time.monotonic() - started < 120, "a warm rebuild of the gateway image took over 2 minutes"


@pytest.fixture(scope="module")
def stack(images):
    _stack("down", "--volumes", timeout=300)
    _stack("up")
    yield _secrets()
    _run(["infra/compose/stack.sh", "down", "--volumes"], 300, {"STACK_PROJECT": PROJECT}, check=False)


def _submit(stage: str, *overrides: str) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "pipelines.submit",
        stage,
        "--config",
        "tiny",
        "--target",
        f"http://127.0.0.1:{PORTS['RAY_DASHBOARD_PORT']}",
        *overrides,
    ]
    proc = _run(cmd, 1200)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["status"] in ("ok", "cached"), result
    return result


def _mlflow():
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"http://127.0.0.1:{PORTS['MLFLOW_PORT']}")


def _psql(sql: str) -> str:
    return _run(
        [
            DOCKER,
            "exec",
            _container("postgres"),
            "psql",
            "-h",
            "/var/run/postgresql",
            "-U",
            "mlflow",
            "-d",
            "mlflow",
            "-At",
            "-c",
            sql,
        ],
        60,
    ).stdout.strip()


def _s3_keys(secrets: dict[str, str]) -> list[str]:
    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{PORTS['S3_PORT']}",
        region_name="us-east-1",
        aws_access_key_id=secrets["S3_ACCESS_KEY"],
        aws_secret_access_key=secrets["S3_SECRET_KEY"],
    )
    keys, token = [], None
    while True:
        page = s3.list_objects_v2(Bucket="mlflow", **({"ContinuationToken": token} if token else {}))
        keys += [o["Key"] for o in page.get("Contents", [])]
        token = page.get("NextContinuationToken")
        if not token:
            return keys


def _chat(secrets: dict[str, str], model: str) -> str:
    """A greedy 8-token answer through the gateway. The tiny model trained for 20 steps ends its turn at once, so
    its end tokens (<|endoftext|> 0, <|im_start|> 1, <|im_end|> 2) get OpenAI's logit_bias -100: 8 real tokens."""
    import openai

    client = openai.OpenAI(
        base_url=f"http://127.0.0.1:{PORTS['GATEWAY_PORT']}/v1",
        api_key=secrets["TULPAR_API_KEY"],
        max_retries=0,
        timeout=120,
    )
    try:
        reply = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Сәлем"}],
            max_tokens=8,
            temperature=0,
            logit_bias={"0": -100, "1": -100, "2": -100},
        )
    except openai.APIError as exc:
        pytest.fail(f"{type(exc).__name__}: {exc}\n{_logs('gateway')}\n{_logs('serve')}")
    assert reply.usage.completion_tokens == 8 and reply.choices[0].finish_reason == "length", reply
    return reply.choices[0].message.content


def _served_model(secrets: dict[str, str]) -> str:
    import openai

    client = openai.OpenAI(
        base_url=f"http://127.0.0.1:{PORTS['GATEWAY_PORT']}/v1",
        api_key=secrets["TULPAR_API_KEY"],
        max_retries=0,
        timeout=30,
    )
    return [m.id for m in client.models.list().data][0]


def test_stack_end_to_end(stack, tmp_path):
    secrets = stack
    # 1. Jobs through the Ray Jobs API: the driver on the head container, training on the worker container.
    _submit("tokenizer")
    _submit("preprocess")
    pretrain = _submit(
        "pretrain",
        "train.steps=20",
        "train.eval_every=10",
        "train.log_every=5",
        "train.eval_windows=4",
        "sample.max_new_tokens=4",
    )
    uri = pretrain["outputs"]["model_uri"]  # models:/tulpar-tiny/<version>
    assert uri.startswith("models:/tulpar-tiny/"), uri
    version = uri.rsplit("/", 1)[1]
    mv = _mlflow().get_model_version("tulpar-tiny", version)
    assert mv.status == "READY"
    # metadata in PostgreSQL, the artifacts in the S3 store (through MLflow's artifact proxy)
    assert (
        _psql(f"select version from model_versions where name = 'tulpar-tiny' and version = {version}")
        == version
    )
    keys = _s3_keys(secrets)
    assert any(k.endswith("model.safetensors") for k in keys), keys[:20]
    # the training workers ran on the worker container (the head has no CPUs to give them)
    assert _train_worker_nodes() == {"worker"}

    # 2. The serving container serves that version; the openai client reaches it through the gateway with the key.
    _stack("up", "--serve", env={"SERVE_MODEL": f"models:/tulpar-tiny/{version}"})
    model = _served_model(secrets)
    assert model.startswith("tulpar-tiny"), model
    answer = _chat(secrets, model)
    assert answer, answer
    import openai

    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(
            base_url=f"http://127.0.0.1:{PORTS['GATEWAY_PORT']}/v1", api_key="tlp-wrong", max_retries=0
        ).models.list()

    # 3. The chat UI container renders in headless Chromium and answers through the gateway.
    _chat_ui_renders(tmp_path, model)

    # 4. MLflow and PostgreSQL restarted: nothing lost.
    _run([DOCKER, "restart", _container("postgres"), _container("mlflow")], 180)
    _stack("up", "--serve", env={"SERVE_MODEL": f"models:/tulpar-tiny/{version}"})
    assert _mlflow().get_model_version("tulpar-tiny", version).status == "READY"
    run = _mlflow().get_run(mv.run_id)
    assert run.data.metrics, "the training run's metrics were lost"

    # 5. stack-down / stack-up: back healthy, and the version's weights come back from MLflow and S3 unchanged
    # (the serving container, restarted, would download exactly these; starting vLLM again adds minutes, no check).
    before = _model_weights(tmp_path / "before", f"models:/tulpar-tiny/{version}")
    _stack("down", timeout=300)
    _stack("up")
    assert _mlflow().get_model_version("tulpar-tiny", version).status == "READY"
    assert _model_weights(tmp_path / "after", f"models:/tulpar-tiny/{version}") == before


def _model_weights(dest: Path, source: str) -> str:
    """sha256 of the registered version's model.safetensors, downloaded through the MLflow container."""
    import hashlib

    import mlflow

    mlflow.set_tracking_uri(f"http://127.0.0.1:{PORTS['MLFLOW_PORT']}")
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dest)))
    files = sorted(local.rglob("model.safetensors"))
    assert files, f"no model.safetensors under {source}"
    return hashlib.sha256(files[0].read_bytes()).hexdigest()


def _train_worker_nodes() -> set[str]:
    """Where Ray Train's workers ran, from the containerized head's state API: 'head' or 'worker' per actor."""
    import httpx

    base = f"http://127.0.0.1:{PORTS['RAY_DASHBOARD_PORT']}/api/v0"
    nodes = httpx.get(f"{base}/nodes", params={"limit": 100}, timeout=30).json()["data"]["result"]["result"]
    head = {n["node_id"] for n in nodes if n["is_head_node"]}
    actors = httpx.get(f"{base}/actors", params={"limit": 1000, "detail": "true"}, timeout=30).json()
    workers = [a for a in actors["data"]["result"]["result"] if a["class_name"] == "RayTrainWorker"]
    assert workers, "no Ray Train worker actor on the cluster"
    return {"head" if a["node_id"] in head else "worker" for a in workers}


def _chat_ui_renders(tmp_path: Path, model: str) -> None:
    chromium = os.environ.get("TULPAR_CHROMIUM", "/usr/bin/chromium")
    if not Path(chromium).exists():
        pytest.fail(f"no chromium at {chromium}: make test installs it (make browser)")
    from playwright.sync_api import sync_playwright

    from tests.test_chat_ui import CHROMIUM_ARGS

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 720})
            page.set_default_timeout(60_000)
            page.goto(f"http://127.0.0.1:{PORTS['CHAT_UI_PORT']}")
            box = page.get_by_test_id("stChatInput").locator("textarea")
            box.wait_for()
            box.fill("Сәлем")
            box.press("Enter")
            messages = page.get_by_test_id("stChatMessage")
            # the user's turn, then the assistant's (sampled: its text may be short); Playwright polls until then
            messages.nth(1).wait_for(timeout=120_000)
            assert messages.nth(0).inner_text().strip().endswith("Сәлем")
            for error in ("stAlert", "stException"):
                assert page.get_by_test_id(error).count() == 0, page.get_by_test_id(error).first.inner_text()
            page.screenshot(path=str(tmp_path / "chat_ui_container.png"))
        finally:
            browser.close()
