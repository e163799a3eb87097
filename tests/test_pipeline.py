"""The end-to-end pipeline (configs/pipelines/ci.yaml): raw text to an answer through the OpenAI-compatible
endpoint, with lineage in MLflow, cached re-runs and a clear stop on a failing stage."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.stack import free_port

pytestmark = pytest.mark.slow


def run(home: Path, data_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TULPAR_HOME": str(home), "TULPAR_DATA": str(data_dir), "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "pipelines.train_to_serve",
        "--config",
        "configs/pipelines/ci.yaml",
        f'serve.overrides=["port={port}"]',
        *extra,
    ]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)


def test_pipeline_end_to_end_cached_rerun_and_failure(tmp_path, data_dir):
    home = tmp_path / "home"
    first = run(home, data_dir)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    result = json.loads(first.stdout.strip().splitlines()[-1])
    answers = result["outputs"]["serve"]["answers"]
    assert set(answers) == {"kk", "ru", "en"} and all(isinstance(a, str) for a in answers.values())
    assert result["outputs"]["serve"]["source"] == "models:/tulpar-ci@champion", "the gate promoted the model"
    for stage in ("preprocess", "pretrain", "sft", "dpo", "eval", "serve"):
        assert f"] {stage}" in first.stdout
    assert "final model: models:/tulpar-ci/3" in first.stdout

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{home / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    parent = result["mlflow_run_id"]
    children = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], f"tags.mlflow.parentRunId = '{parent}'"
    )
    assert {r.data.tags["tulpar.stage"] for r in children} >= {"preprocess", "pretrain", "sft", "dpo", "eval"}
    v = {n: client.get_model_version("tulpar-ci", n) for n in ("1", "2", "3")}
    assert v["2"].tags["tulpar.parent_model_uri"] == "models:/tulpar-ci/1"
    assert v["3"].tags["tulpar.parent_model_uri"] == "models:/tulpar-ci/2"
    assert str(client.get_model_version_by_alias("tulpar-ci", "champion").version) == "3"
    pretrain_run = next(r for r in children if r.data.tags["tulpar.stage"] == "pretrain")
    assert pretrain_run.data.tags["tulpar.dataset_manifest_sha256"]

    second = run(home, data_dir)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count(" cached ") == 5, second.stdout
    t1 = json.loads(first.stdout.strip().splitlines()[-1])["metrics"]
    t2 = json.loads(second.stdout.strip().splitlines()[-1])["metrics"]
    assert sum(t2.values()) < 0.6 * sum(t1.values())

    failed = run(home, data_dir, 'sft.overrides=["train.stepz=3"]')
    assert failed.returncode == 1
    assert "stage sft failed" in failed.stderr and "--from sft" in failed.stderr
    assert str(home / "pipelines" / "ci" / "logs" / "sft.log") in failed.stderr
    assert failed.stdout.count(" cached ") == 2  # preprocess and pretrain outputs were kept
