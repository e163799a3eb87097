"""Shared fixtures. Tests read real text through TULPAR_DATA (default ../shared/data) and write under tmp dirs."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pytest
import torch

from llm_core.config import ModelConfig

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("TULPAR_DATA", REPO.parent / "shared" / "data")).resolve()


def pytest_collection_modifyitems(config, items):
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
