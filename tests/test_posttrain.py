"""The post-training chain on the tiny preset: pretrain -> SFT (full and LoRA) -> DPO -> distillation (white-box
and black-box against a local OpenAI-compatible server), each registered in MLflow with its parent as lineage."""

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO
from tests.stack import job_env
from tests.test_pretrain import make_dataset, result_of, run_pretrain

pytestmark = pytest.mark.slow
SMALL = ["train.seq_len=128", "train.batch_size=4", "train.log_every=2", "sample.max_new_tokens=8"]


def run_job(stage: str, config: str, home: Path, data_dir: Path, *overrides: str) -> dict:
    env = job_env(home, data_dir)
    proc = subprocess.run(
        [sys.executable, "-m", f"jobs.{stage}", "--config", config, *overrides],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    return result_of(proc)


@pytest.fixture(scope="module")
def chain(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("chain")
    home = root / "home"
    dataset = make_dataset(root, data_dir)
    pre = result_of(
        run_pretrain(
            home,
            dataset,
            "train.steps=30",
            "train.eval_every=15",
            "train.log_every=5",
            "train.seq_len=128",
            data_dir=data_dir,
        )
    )
    return {"home": home, "data": data_dir, "pretrain": pre}


def client(home: Path):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{home / 'mlflow.db'}")
    return mlflow.MlflowClient()


def assert_loss_curve(home, r):
    """The stage wrote its loss curve (a PNG) and logged it to its MLflow run, like pretraining."""
    assert Path(r["outputs"]["loss_curve"]).read_bytes()[:4] == b"\x89PNG"
    logged = [a.path for a in client(home).list_artifacts(r["mlflow_run_id"], "plots")]
    assert "plots/loss_curve.png" in logged


def test_sft_registers_a_child_version_with_lineage(chain):
    home = chain["home"]
    r = run_job(
        "sft",
        "configs/sft/tiny.yaml",
        home,
        chain["data"],
        *SMALL,
        "train.steps=12",
        "train.eval_every=6",
        "data.max_records_per_file=40",
    )
    c = client(home)
    mv = c.get_model_version_by_alias("tulpar-tiny", "sft-latest")
    assert r["outputs"]["model_uri"] == f"models:/tulpar-tiny/{mv.version}"
    assert mv.tags["tulpar.stage"] == "sft"
    assert mv.tags["tulpar.parent_model_uri"] == chain["pretrain"]["outputs"]["model_uri"]
    run_tags = c.get_run(r["mlflow_run_id"]).data.tags
    assert run_tags["tulpar.parent_model_uri"] == chain["pretrain"]["outputs"]["model_uri"]
    data = r["outputs"]["data"]
    assert data["kept"] == data["read"] - sum(data["skipped"].values()) and data["train_rows"] > 0
    assert "best_val_loss/chat" in r["metrics"]
    assert_loss_curve(home, r)
    chain["sft"] = r


def test_sft_with_lora_saves_a_peft_adapter_matching_the_merged_export(chain):
    home = chain["home"]
    r = run_job(
        "sft",
        "configs/sft/tiny-lora.yaml",
        home,
        chain["data"],
        *SMALL,
        "train.steps=6",
        "train.eval_every=6",
        "data.max_records_per_file=20",
        "name=tulpar-tiny-lora",
    )
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from jobs.platform.registry import hf_model
    from jobs.platform.runtime import Settings

    os.environ["TULPAR_HOME"] = str(home)
    base_dir = hf_model(chain["pretrain"]["outputs"]["model_uri"], Settings.from_env()).path
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir), r["outputs"]["adapter_dir"]
    )
    merged = AutoModelForCausalLM.from_pretrained(r["outputs"]["hf_dir"])
    ids = torch.randint(0, 1024, (1, 20))
    with torch.no_grad():
        a, b = peft_model.eval()(ids).logits, merged.eval()(ids).logits
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    assert json.loads((Path(r["outputs"]["adapter_dir"]) / "adapter_config.json").read_text())["r"] == 8
    chain["lora"] = r


def test_merge_adapter_rebuilds_the_registered_merge_from_the_adapter(chain, tmp_path, capsys):
    """`jobs.merge_adapter` merges the SFT-LoRA adapter (a directory, or the registered version's adapter artifact)
    into its base: the same weights as the merged version SFT registered; refusals exit 2."""
    if "lora" not in chain:
        pytest.skip("needs the LoRA SFT stage")
    from safetensors.torch import load_file

    from jobs import merge_adapter

    r = chain["lora"]
    os.environ["TULPAR_HOME"] = str(chain["home"])
    want = load_file(str(Path(r["outputs"]["hf_dir"]) / "model.safetensors"))
    for i, adapter in enumerate((r["outputs"]["adapter_dir"], r["outputs"]["model_uri"])):
        out = tmp_path / f"merged-{i}"
        assert merge_adapter.main(["--adapter", adapter, "--out", str(out)]) == 0
        got = load_file(str(out / "model.safetensors"))
        assert got.keys() == want.keys()
        for k in want:
            torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=0)
        assert (out / "tokenizer.json").is_file()
    capsys.readouterr()
    code = merge_adapter.main(
        ["--adapter", chain["pretrain"]["outputs"]["model_uri"], "--out", str(tmp_path / "x")]
    )
    assert code == 2 and "has no tulpar.adapter_uri tag" in capsys.readouterr().err
    gguf = tmp_path / "m.gguf"
    code = merge_adapter.main(
        ["--adapter", r["outputs"]["adapter_dir"], "--out", str(tmp_path / "y"), "--gguf", str(gguf)]
    )
    assert code == 2 and "--allow-tokenizer-mismatch" in capsys.readouterr().err
    assert not gguf.exists() and not (tmp_path / "y").exists()  # refused before anything was written


def test_dpo_raises_reward_accuracy_on_its_training_pairs(chain):
    if "sft" not in chain:
        pytest.skip("needs the SFT stage")
    home = chain["home"]
    r = run_job(
        "dpo",
        "configs/dpo/tiny.yaml",
        home,
        chain["data"],
        *SMALL,
        "train.steps=24",
        "train.eval_every=12",
        "data.max_records_per_file=24",
        "data.val_fraction=0.2",
        "train.lr=0.001",
        "train.warmup_steps=2",
    )
    mv = client(home).get_model_version_by_alias("tulpar-tiny", "dpo-latest")
    assert mv.tags["tulpar.parent_model_uri"] == chain["sft"]["outputs"]["model_uri"]
    history = client(home).get_metric_history(r["mlflow_run_id"], "rewards/accuracy")
    assert history, "reward accuracy is logged"
    last = [m.value for m in sorted(history, key=lambda m: m.step)][-3:]
    assert sum(last) / len(last) > 0.5, f"training-pair reward accuracy should rise above 0.5: {last}"
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert client(home).get_metric_history(r["mlflow_run_id"], key)
    assert_loss_curve(home, r)


def test_whitebox_distillation(chain):
    if "sft" not in chain:
        pytest.skip("needs the SFT stage")
    r = run_job(
        "distill",
        "configs/distill/tiny-whitebox.yaml",
        chain["home"],
        chain["data"],
        *SMALL,
        "train.steps=6",
        "train.eval_every=6",
        "data.max_records_per_file=10",
    )
    hist = client(chain["home"]).get_metric_history(r["mlflow_run_id"], "kl")
    assert hist and all(m.value >= 0 for m in hist)
    assert r["outputs"]["model_uri"].startswith("models:/tulpar-tiny-student/")
    assert_loss_curve(chain["home"], r)


class _Teacher(BaseHTTPRequestHandler):
    """A minimal OpenAI-compatible chat endpoint that fails every first attempt (to exercise retries)."""

    seen: dict = {}

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        question = body["messages"][-1]["content"]
        attempts = _Teacher.seen[question] = _Teacher.seen.get(question, 0) + 1
        if attempts == 1:
            self.send_response(503)
            self.end_headers()
            return
        answer = {
            "id": "x",
            "object": "chat.completion",
            "created": 0,
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "stop",
                    "message": {
                        "role": "assistant",
                        "content": f"<think>\nshort\n</think>\n\nAnswer: {len(question)}",
                    },
                }
            ],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_blackbox_distillation_from_a_local_openai_server(chain):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Teacher)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        r = run_job(
            "distill",
            "configs/distill/tiny-blackbox.yaml",
            chain["home"],
            chain["data"],
            *SMALL,
            f"endpoint.base_url={url}",
            "train.steps=4",
            "train.eval_every=4",
            "data.max_records_per_file=8",
            "name=tulpar-tiny-bb",
        )
    finally:
        server.shutdown()
    generated = Path(chain["home"]) / "datasets" / "distill" / "tulpar-tiny-bb.jsonl"
    records = [json.loads(line) for line in generated.read_text().splitlines()]
    assert len(records) == 8 and all(v == 2 for v in _Teacher.seen.values()), "each prompt retried once"
    rec = records[0]
    assert rec["messages"][-1]["content"].startswith("<think>\nshort\n</think>")
    assert rec["provenance"]["teacher_model"] == "tulpar-tiny" and rec["provenance"]["endpoint"] == url
    data = r["outputs"][
        "data"
    ]  # long prompts may leave no room for the answer in seq_len: counted, not silent
    assert data["read"] == 8 and data["kept"] + sum(data["skipped"].values()) == 8 and data["kept"] > 0
