"""Shared fixtures. Tests read real text through TULPAR_DATA (default ../shared/data) and write under tmp dirs."""

from __future__ import annotations

import os
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


def small_moe_config(**overrides) -> ModelConfig:
    base = dict(num_experts=4, num_experts_per_token=2, num_shared_experts=1, moe_ffn_hidden_dim=32)
    base.update(overrides)
    return small_config(**base)
