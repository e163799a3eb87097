"""`python -m jobs.generate`: prompts and chat from the terminal, checked against llm_core's sampler.

Greedy output equal to the served model's is checked in tests/test_serving.py, beside its server."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time

import pytest
import torch

from jobs import generate as gen
from llm_core.export_hf import load_hf
from llm_core.generate import SamplingParams, generate
from llm_core.tokenizer import Tokenizer
from tests.conftest import REPO
from tests.factory import train_tiny_hf

PROMPTS = ["Қазақстан", "Москва — столица", "The history of"]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, data_dir):
    return train_tiny_hf(tmp_path_factory.mktemp("gen") / "hf", data_dir, steps=60)


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("TULPAR_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = gen.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_greedy_equals_the_llm_core_reference(hf_dir, capsys):
    tok, model = Tokenizer.from_dir(hf_dir), load_hf(hf_dir).eval()
    stops = [tok.eos_id, tok.im_end_id]
    want = [
        tok.decode(ids)
        for ids in generate(
            model,
            [tok.encode(p) for p in PROMPTS],
            SamplingParams(max_new_tokens=12, temperature=0, stop_token_ids=stops),
        )
    ]
    argv = [a for p in PROMPTS for a in ("--prompt", p)]
    code, out, err = run(
        capsys, "--model", str(hf_dir), *argv, "--temperature", "0", "--max-new-tokens", "12"
    )
    assert code == 0 and out.splitlines() == want
    assert "tokens/s]" in err
    # one prompt is streamed token by token: the same text
    code, out, _ = run(
        capsys, "--model", str(hf_dir), "--prompt", PROMPTS[0], "--temperature", "0", "--max-new-tokens", "12"
    )
    assert code == 0 and out == want[0] + "\n"


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy(hf_dir, capsys, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n\n", encoding="utf-8")
    base = [
        "--output",
        "jsonl",
        "--model",
        str(hf_dir),
        "--prompts-file",
        str(prompts),
        "--max-new-tokens",
        "16",
        "--temperature",
        "1.0",
    ]
    first = run(capsys, *base, "--seed", "7")
    again = run(capsys, *base, "--seed", "7")
    other = run(capsys, *base, "--seed", "8")
    assert first[0] == 0 and first[1] == again[1]
    assert [json.loads(line)["prompt"] for line in first[1].splitlines()] == PROMPTS
    assert other[1] != first[1]
    greedy = run(capsys, *base, "--temperature", "0")
    top1 = run(capsys, *base, "--top-k", "1", "--seed", "3")
    assert top1[1] == greedy[1]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "/nowhere/model", "--prompt", "x"], "model '/nowhere/model' not found"),
        (["--prompt", "x", "--top-p", "2"], "--top-p 2.0 must be in (0, 1]"),
        (["--prompt", "x", "--temperature", "-1"], "--temperature -1.0 must be >= 0"),
        (["--prompt", "x", "--device", "tpu"], "device 'tpu' is not one of"),
        ([], "nothing to generate"),
        (["--chat", "--prompt", "x"], "--chat reads its turns from the terminal"),
    ],
)
def test_user_errors_exit_2_with_a_message(hf_dir, capsys, argv, message):
    if "--model" not in argv:
        argv = ["--model", str(hf_dir), *argv]
    code, out, err = run(capsys, *argv)
    assert code == 2 and message in err and "Traceback" not in err and out == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error(hf_dir, capsys):
    code, _, err = run(capsys, "--model", str(hf_dir), "--prompt", "x", "--device", "cuda")
    assert code == 2 and "no CUDA GPU is visible" in err


def read_until(fd: int, marker: bytes, timeout: float = 120.0) -> bytes:
    """Bytes from the pseudo-terminal until `marker` appears (or the process closes it)."""
    buf, deadline = b"", time.monotonic() + timeout
    while marker not in buf:
        left = deadline - time.monotonic()
        assert left > 0, f"no {marker!r} within {timeout} s; got {buf[-500:]!r}"
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            buf += chunk
    return buf


def test_chat_two_turns_through_a_pseudo_terminal(hf_dir, tmp_path):
    """The chat reads turns from a terminal, streams answers, keeps the history (the second answer is the
    continuation of the whole conversation), forgets it on /reset and quits on /exit."""
    tok, model = Tokenizer.from_dir(hf_dir), load_hf(hf_dir).eval()
    params = SamplingParams(max_new_tokens=8, temperature=0, stop_token_ids=[tok.eos_id, tok.im_end_id])

    def answer(messages):
        ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True))
        return tok.decode(generate(model, [ids], params)[0])

    first = answer([{"role": "user", "content": "Сәлем!"}])
    second = answer(
        [
            {"role": "user", "content": "Сәлем!"},
            {"role": "assistant", "content": first},
            {"role": "user", "content": "Hello?"},
        ]
    )
    main_fd, child_fd = pty.openpty()
    env = {**os.environ, "TULPAR_HOME": str(tmp_path / "home"), "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobs.generate", "--model", str(hf_dir), "--chat", "--temperature", "0"]
        + ["--max-new-tokens", "8"],
        cwd=REPO,
        env=env,
        stdin=child_fd,
        stdout=child_fd,
        stderr=subprocess.DEVNULL,
        close_fds=True,
    )
    os.close(child_fd)
    try:
        read_until(main_fd, b"you> ")
        os.write(main_fd, "Сәлем!\n".encode())
        turn1 = read_until(main_fd, b"you> ").decode()
        os.write(main_fd, b"Hello?\n")
        turn2 = read_until(main_fd, b"you> ").decode()
        os.write(main_fd, b"/reset\n")
        read_until(main_fd, b"you> ")
        os.write(main_fd, b"/exit\n")
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(main_fd)
    # the terminal echoes the input and turns \n into \r\n
    assert f"model> {first}" in turn1.replace("\r\n", "\n")
    assert f"model> {second}" in turn2.replace("\r\n", "\n")


def test_device_choice_is_resolved_the_same_everywhere(monkeypatch):
    from jobs.training.distributed import RayTrainConfig, worker_device
    from llm_core import device as dev

    assert dev.resolve_device("cpu").type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dev, "mps_available", lambda: False)
    assert dev.resolve_device("auto").type == "cpu"
    monkeypatch.setattr(dev, "mps_available", lambda: True)
    assert dev.resolve_device("auto").type == "mps"  # auto: CUDA, else MPS, else CPU
    assert worker_device(RayTrainConfig(), 1).type == "mps"
    assert worker_device(RayTrainConfig(num_workers=2), 2).type == "cpu"  # MPS is one process
    monkeypatch.setattr(dev, "mps_available", lambda: False)
    assert worker_device(RayTrainConfig(), 1).type == "cpu"
    with pytest.raises(ValueError, match="device 'mps': Apple's Metal backend is not available"):
        worker_device(RayTrainConfig(device="mps"), 1)
    with pytest.raises(ValueError, match="ray.device=cuda needs ray.use_gpu=true"):
        RayTrainConfig(device="cuda")
    with pytest.raises(ValueError, match="ray.device=cpu with ray.use_gpu=true"):
        RayTrainConfig(device="cpu", use_gpu=True)
    with pytest.raises(ValueError, match="set ray.num_workers=1"):
        RayTrainConfig(device="mps", num_workers=2)
    with pytest.raises(ValueError, match="ray.device 'tpu' is not one of"):
        RayTrainConfig(device="tpu")
    with pytest.raises(ValueError, match="cuda:3.*only 0 CUDA device|no CUDA GPU is visible"):
        dev.resolve_device("cuda:3")
