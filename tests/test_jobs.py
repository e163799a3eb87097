"""The job contract: CLI, overrides, JSON result, exit codes, settings."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


def run(args, env_extra=None, home=None):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    if home is not None:
        env["TULPAR_HOME"] = str(home)
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "extra, message",
    [
        (["model.num_kv_heads=3"], "num_heads % num_kv_heads != 0"),
        (["train.stepz=3"], "train.stepz: unknown key"),
        (["model=huge"], "unknown model preset 'huge'"),
        (["train.seq_len=1024"], "train.seq_len 1024 > model.max_seq_len 512"),
    ],
)
def test_user_errors_exit_2_without_traceback(tmp_path, extra, message):
    r = run(["jobs.pretrain", "--config", "configs/pretrain/tiny.yaml", *extra], home=tmp_path)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr
    assert "Traceback" not in r.stderr
    assert last_json(r.stdout)["status"] == "error"


def test_missing_dataset_is_a_user_error(tmp_path):
    r = run(
        ["jobs.pretrain", "--config", "configs/pretrain/tiny.yaml", "data.dataset=nowhere"], home=tmp_path
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "no dataset at 'nowhere'" in r.stderr and "make preprocess" in r.stderr


def test_settings_defaults(monkeypatch, tmp_path):
    from jobs.platform.runtime import Settings

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("TULPAR_STORAGE", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("TULPAR_HOME", str(tmp_path))
    s = Settings.from_env()
    assert s.mlflow_tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert s.storage == str(tmp_path) and s.ray_address is None
    monkeypatch.setenv("TULPAR_STORAGE", "s3://bucket/tulpar")
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    s = Settings.from_env()
    assert s.storage == "s3://bucket/tulpar" and s.ray_address == "ray://head:10001"
    with pytest.raises(ValueError, match="make data"):
        Settings(tmp_path / "none", tmp_path, str(tmp_path), "sqlite://", None).require_data("corpus")


CHATTY_JOB = """
import ray
from pydantic import BaseModel

from jobs.platform.runtime import JobResult, main_entry


class ChattyConfig(BaseModel):
    workers: int = 4


def main(cfg, settings):
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=True)

    @ray.remote
    def chatter():
        for _ in range(20):
            print("step | train loss 6.74", flush=True)

    ray.get([chatter.remote() for _ in range(cfg.workers)])
    return JobResult(stage="chatty", metrics={"workers": cfg.workers})


if __name__ == "__main__":
    main_entry("chatty", ChattyConfig, main)
"""


@pytest.mark.slow
def test_result_line_stays_last_when_ray_workers_log(tmp_path):
    """Ray forwards worker prints to the driver's stdout and flushes its de-duplicated "[repeated Nx across
    cluster]" lines when it disconnects; the job's JSON result must still be the last stdout line."""
    script = tmp_path / "chatty_job.py"
    script.write_text(CHATTY_JOB)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TULPAR_HOME": str(tmp_path), "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    r = subprocess.run(
        [sys.executable, str(script)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "train loss" in r.stdout  # the worker lines did reach the driver's stdout
    assert last_json(r.stdout) == {
        "stage": "chatty",
        "status": "ok",
        "outputs": {},
        "metrics": {"workers": 4},
        "mlflow_run_id": None,
    }
