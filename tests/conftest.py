"""Shared fixtures. Tests read real text through TULPAR_DATA (default ../shared/data) and write under tmp dirs."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llm_core.config import ModelConfig

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("TULPAR_DATA", REPO.parent / "shared" / "data")).resolve()


def pytest_collection_modifyitems(config, items):
    # The container tests go last: their images build in the background meanwhile (pytest_collection_finish).
    items.sort(key=lambda item: "containers" in item.keywords)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA / "corpus").is_dir():
        pytest.skip(f"TULPAR_DATA={DATA} has no corpus/: set TULPAR_DATA or run `make data`")
    return DATA


@pytest.fixture
def tulpar_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("TULPAR_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("TULPAR_DATA", str(DATA))
    return home


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """A test that changes torch's intra-op thread count does so for itself only: the count sets the order of
    float sums, so a leaked count would make a later test's numerics depend on which tests ran before it."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def small_config(**overrides) -> ModelConfig:
    base = dict(
        vocab_size=256, dim=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_dim=128, max_seq_len=128
    )
    base.update(overrides)
    return ModelConfig(**base)


# Multi-head latent attention with every MLA width distinct, so a swapped dimension cannot go unnoticed (4 heads).
MLA_TEST_FIELDS = dict(
    num_kv_heads=4,
    attention="mla",
    kv_lora_rank=40,
    qk_nope_head_dim=12,
    qk_rope_head_dim=8,
    v_head_dim=10,
    norm_eps=1e-6,
)


def small_mla_config(**overrides) -> ModelConfig:
    return small_config(**{**MLA_TEST_FIELDS, **overrides})


def small_moe_config(**overrides) -> ModelConfig:
    base = dict(num_experts=4, num_experts_per_token=2, num_shared_experts=1, moe_ffn_hidden_dim=32)
    base.update(overrides)
    return small_config(**base)


@pytest.fixture(autouse=True)
def _log_handlers_never_keep_a_closed_stream():
    """Jobs run in-process by tests (run_job under capsys or redirect_stderr) can make Ray (Ray Train's driver
    logging, Ray Data's) attach console handlers to the captured stream of that test; once pytest closes it, every
    later Ray log line in the session would print "--- Logging error --- Traceback" into the next test's captured
    stderr. A real job is its own process with one stderr; here, handlers left on a closed stream go back to the
    process's stderr after each test."""
    yield
    loggers = [logging.getLogger()] + [
        lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    for logger in loggers:
        for handler in logger.handlers:
            stream = handler.__dict__.get(
                "stream"
            )  # a StreamHandler's own stream (not _StderrHandler's property)
            if (
                isinstance(handler, logging.StreamHandler)
                and stream is not None
                and getattr(stream, "closed", False)
            ):
                with handler.lock:  # not setStream: it flushes the old, closed stream first
                    handler.stream = sys.__stderr__


# ------------------------------------------------------------------ the images, built while the other tests run

IMAGE_BUILD_KEY = pytest.StashKey["ImageBuild"]()


class ImageBuild:
    """`infra/images/build_local.sh` (engine, then every CPU image) as a background process started when the
    session collects a `containers` test; tests/test_containers.py waits for it. Building the seven images from
    cold takes ~10 minutes of mostly downloading and unpacking wheels, which overlaps the rest of the suite instead
    of adding to it. Exit 3: no Docker engine can be started here."""

    def __init__(self, names: list[str]):
        build = REPO / "build"
        build.mkdir(exist_ok=True)
        self.log = build / "image-build-test.log"
        # build_local.sh writes one "name seconds size_bytes" line per image there
        timings = build / "image-timings-test.txt"
        timings.unlink(missing_ok=True)
        script = (
            "infra/images/build_local.sh --engine || exit $?; exec infra/images/build_local.sh "
            + " ".join(names)
        )
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                ["bash", "-c", script],
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "TIMINGS": str(timings)},
                start_new_session=True,
            )

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=60)


def pytest_collection_finish(session):
    if session.config.option.collectonly:
        return
    if any("containers" in item.keywords for item in session.items):
        from tests.test_containers import IMAGES

        session.config.stash[IMAGE_BUILD_KEY] = ImageBuild(IMAGES)


def pytest_sessionfinish(session):
    from tests.stack import stop_shared_ray

    stop_shared_ray()  # the session's Ray for job subprocesses, if a test started it
    build = session.config.stash.get(IMAGE_BUILD_KEY, None)
    if build is not None:
        build.stop()
