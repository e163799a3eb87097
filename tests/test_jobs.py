"""The job contract: CLI, overrides, JSON result, exit codes, and a real (tiny) pretraining run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

TINY = [
    "--config",
    "configs/pretrain/tiny.yaml",
    "train.steps=6",
    "train.eval_every=3",
    "train.log_every=3",
    "train.batch_size=4",
    "train.seq_len=64",
    "data.max_chars_per_language=120000",
    "tokenizer.vocab_size=1024",
    "model.vocab_size=1024",
    "sample.max_new_tokens=8",
]


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


def test_missing_data_dir_is_a_user_error(tmp_path):
    r = run(["jobs.pretrain", *TINY], env_extra={"TULPAR_DATA": str(tmp_path / "nowhere")}, home=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "data not found" in r.stderr and "make data" in r.stderr


def test_tiny_pretraining_end_to_end(tmp_path, data_dir):
    home = tmp_path / "home"
    r = run(["jobs.pretrain", *TINY], env_extra={"TULPAR_DATA": str(data_dir)}, home=home)
    assert r.returncode == 0, r.stderr[-3000:]
    result = last_json(r.stdout)
    assert result["stage"] == "pretrain" and result["status"] == "ok" and result["mlflow_run_id"]
    out = result["outputs"]
    assert json.loads((Path(out["checkpoint_dir"]) / "result.json").read_text()) == result
    for lang in ("kk", "ru", "en"):
        assert f"best_val_bpb/{lang}" in result["metrics"]
        assert out["samples"][lang]
    assert "val loss kk" in r.stdout and "train loss" in r.stdout
    assert Path(out["loss_curve"]).read_bytes()[:4] == b"\x89PNG"

    # the HF export loads in transformers and its logits match the best checkpoint
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_core.checkpoint import load_model_from_checkpoint

    hf = AutoModelForCausalLM.from_pretrained(out["hf_dir"]).eval()
    tok = AutoTokenizer.from_pretrained(out["hf_dir"])
    ids = torch.tensor([tok.encode("Қазақстан", add_special_tokens=False)])
    ours = load_model_from_checkpoint(out["best_checkpoint"]).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids).logits, atol=1e-4, rtol=0)

    # registered in MLflow with the stage alias and lineage tags
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{home / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    mv = client.get_model_version_by_alias("tulpar-tiny", "pretrain-latest")
    assert out["model_uri"] == f"models:/tulpar-tiny/{mv.version}"
    assert mv.tags["tulpar.stage"] == "pretrain"
    run_tags = client.get_run(result["mlflow_run_id"]).data.tags
    for tag in ("tulpar.stage", "tulpar.config_sha256", "tulpar.git_commit", "tulpar.tokenizer_sha256"):
        assert run_tags[tag]
    local = mlflow.artifacts.download_artifacts(
        "models:/tulpar-tiny@pretrain-latest", dst_path=str(tmp_path / "dl")
    )
    assert (Path(local) / "config.json").is_file() and (Path(local) / "tokenizer.json").is_file()

    # running the same config again resumes the finished run instead of retraining
    r2 = run(["jobs.pretrain", *TINY], env_extra={"TULPAR_DATA": str(data_dir)}, home=home)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "resumed" in r2.stderr and "step     3 | train loss" not in r2.stdout
    assert last_json(r2.stdout)["outputs"]["checkpoint_dir"] == out["checkpoint_dir"]
