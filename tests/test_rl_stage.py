"""The `jobs.rl` stage on the tiny SFT model (issue 17's CPU acceptance): GRPO and PPO raise the held-out reward of
a task a tiny model can learn (answer in the question's language, judged by the preprocessing language detector)
by >= 0.3, the result is a registered child version `@rl-latest` with its curves in MLflow; bad input is exit 2
with a message naming the setting."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from jobs.platform.runtime import run_job
from tests.conftest import REPO
from tests.factory import sft_tiny_hf, train_tiny_hf
from tests.stack import job_env
from tests.test_pretrain import result_of

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sft_model(tmp_path_factory, data_dir) -> Path:
    root = tmp_path_factory.mktemp("rl-sft")
    base = train_tiny_hf(root / "base", data_dir, steps=150)
    return sft_tiny_hf(base, root / "sft", data_dir, steps=150)


def run_rl(config: str, home: Path, data_dir: Path, *overrides: str) -> dict:
    env = job_env(home, data_dir)
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.rl", "--config", f"configs/rl/{config}.yaml", *overrides],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    return result_of(proc)


def client(home: Path):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{home / 'mlflow.db'}")
    return mlflow.MlflowClient()


def history(home: Path, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client(home).get_metric_history(run_id, key))


def test_grpo_raises_the_held_out_reward_and_registers_rl_latest(sft_model, data_dir, tmp_path):
    home = tmp_path / "home"
    r = run_rl("tiny-grpo", home, data_dir, f"init={sft_model}")
    m = r["metrics"]
    assert m["val_reward_gain"] >= 0.3, m
    val = history(home, r["mlflow_run_id"], "val_reward")
    assert val[0][0] == 0 and val[0][1] == pytest.approx(m["baseline_val_reward"])
    # log-probs are recomputed by the trainer: the first update of every batch has an importance ratio of exactly 1
    assert {v for _, v in history(home, r["mlflow_run_id"], "ratio_max_deviation_first_update")} == {0.0}
    logged = client(home).get_run(r["mlflow_run_id"]).data.metrics
    for key in (
        "reward",
        "reward_std",
        "reward/language_consistency",
        "reward/lang_en",
        "reward/lang_ru",
        "entropy",
        "clip_fraction",
        "response_length",
        "rollout_tokens_per_s",
        "time/rollout_s",
        "time/update_s",
        "val_reward/lang_en",
    ):
        assert key in logged, key
    # a registered child version with lineage, alias rl-latest, and its curves as a PNG
    out = r["outputs"]
    version = client(home).get_model_version_by_alias("tulpar-tiny", "rl-latest")
    assert out["model_uri"] == f"models:/tulpar-tiny/{version.version}"
    assert version.tags["tulpar.parent_model_uri"] == out["parent_model_uri"]
    assert version.tags["tulpar.stage"] == "rl"
    assert Path(out["loss_curve"]).read_bytes()[:4] == b"\x89PNG"
    assert "plots/rl_curves.png" in [a.path for a in client(home).list_artifacts(r["mlflow_run_id"], "plots")]
    # the registered weights are the best checkpoint's policy, not the starting model
    from llm_core.export_hf import load_hf

    best = torch.load(Path(out["best_checkpoint"]) / "state.pt", weights_only=False)["policy"]
    exported = load_hf(out["hf_dir"]).state_dict()
    assert all(torch.equal(exported[k], v) for k, v in best.items())
    start = load_hf(sft_model).state_dict()
    assert not all(torch.equal(start[k], v) for k, v in best.items())


def test_ppo_raises_the_held_out_reward_and_its_value_loss_falls(sft_model, data_dir, tmp_path):
    home = tmp_path / "home"
    r = run_rl("tiny-ppo", home, data_dir, f"init={sft_model}")
    assert r["metrics"]["val_reward_gain"] >= 0.3, r["metrics"]
    value = [v for _, v in history(home, r["mlflow_run_id"], "value_loss")]
    first, last = sum(value[:5]) / 5, sum(value[-5:]) / 5
    assert last < 0.5 * first, value
    assert history(home, r["mlflow_run_id"], "kl")  # the KL penalty to the reference was measured


# ------------------------------------------------------------------------------------------------ bad input


def run_in_process(home: Path, data_dir: Path, monkeypatch, capsys, *args: str) -> tuple[int, str]:
    from jobs.rl import RLConfig, main

    monkeypatch.setenv("TULPAR_HOME", str(home))
    monkeypatch.setenv("TULPAR_DATA", str(data_dir))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    code = run_job("rl", RLConfig, main, ["--config", str(REPO / "configs/rl/tiny-grpo.yaml"), *args])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_bad_input_is_exit_2_naming_the_setting(sft_model, data_dir, tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    cases = {
        # group of one: GRPO's advantage needs at least two samples of a prompt
        "grpo.group_size 1": ["grpo.group_size=1"],
        # no prompt survives: Kazakh only, from an English file
        "an empty prompt set": [
            "prompts.files=[sft/en_selfinstruct_user_oriented_252.jsonl]",
            "prompts.languages=[kk]",
        ],
        # a prompt longer than the context leaves for the completion
        "does not fit the model's context of 512": [
            "prompts.drop_longer=false",
            "prompts.max_prompt_tokens=null",
        ],
        "more than prompts.max_prompt_tokens 8": ["prompts.drop_longer=false", "prompts.max_prompt_tokens=8"],
        # the workers are replicas: FSDP sharding is refused, not silently ignored
        "ray.parallelism=fsdp is not supported": ["ray.parallelism=fsdp"],
    }
    for expected, args in cases.items():
        code, text = run_in_process(home, data_dir, monkeypatch, capsys, f"init={sft_model}", *args)
        assert code == 2, (expected, text[-2000:])
        assert expected in text, (expected, text[-2000:])
        assert "Traceback" not in text


def test_a_reward_model_with_another_tokenizer_is_refused(sft_model, data_dir, tmp_path, monkeypatch, capsys):
    from llm_core.config import ModelConfig
    from llm_core.model import Transformer
    from llm_core.tokenizer import train_bpe
    from llm_core.value_model import ScalarHeadModel, export_hf_reward_model

    other = train_bpe(["одна строка текста", "another line of text", "тағы бір жол"] * 20, 300)
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=300, dim=32, num_layers=1, num_heads=1, num_kv_heads=1, max_seq_len=64, ffn_hidden_dim=64
    )
    rm_dir = export_hf_reward_model(
        ScalarHeadModel(Transformer(cfg)), tmp_path / "rm", pad_token_id=other.pad_id, tokenizer=other
    )
    rewards = json.dumps([{"name": "reward_model", "params": {"model": str(rm_dir)}}])
    code, text = run_in_process(
        tmp_path / "home", data_dir, monkeypatch, capsys, f"init={sft_model}", f"rewards={rewards}"
    )
    assert code == 2, text[-2000:]
    assert "tokenizer" in text and str(rm_dir) in text and "Traceback" not in text
