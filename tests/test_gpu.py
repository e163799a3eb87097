"""GPU checks (`pytest -m gpu`; skipped without CUDA, see conftest). `benchmarks/gpu.sh` runs them on a GPU machine.

Each test compares the GPU path with a reference: the CPU fp32 train step, a single-device run for DDP/FSDP2 over
NCCL, eager for torch.compile, no checkpointing for activation checkpointing (same loss, less memory), and
llm_core's own greedy decoding for vLLM serving (bf16 and bitsandbytes). The vLLM tests also need `vllm` (and
`bitsandbytes`) installed: the `gpu` extra.
"""

from __future__ import annotations

import math
import socket

import numpy as np
import pytest
import torch

from llm_core.config import ModelConfig
from llm_core.generate import SamplingParams, generate
from llm_core.model import Transformer
from llm_core.trainer import TrainConfig, Trainer

pytestmark = pytest.mark.gpu

VOCAB = 512


def gpu_config(**overrides) -> ModelConfig:
    base = dict(
        vocab_size=VOCAB,
        dim=256,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        ffn_hidden_dim=688,
        max_seq_len=512,
    )
    base.update(overrides)
    return ModelConfig(**base)


def random_batches(
    steps: int, batch: int, seq: int, seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        tokens = torch.randint(0, VOCAB, (batch, seq + 1), generator=g)
        out.append((tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()))
    return out


def pattern_batches(steps: int, batch: int, seq: int, period: int = 61, seed: int = 0):
    """Sequences counting up modulo `period` from a random start: a model learns them in ~100 steps, after which
    its greedy continuation is confident (a wide margin between the top two logits), so two engines agree."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        starts = rng.integers(0, period, batch)
        tokens = torch.from_numpy((starts[:, None] + np.arange(seq + 1)[None, :]) % period + 1)
        out.append((tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()))
    return out


def make_trainer(
    cfg: ModelConfig, device: str, seed: int = 0, init_from=None, parallelism="none", **train_kw
):
    torch.manual_seed(seed)
    model = Transformer(cfg)
    if init_from is not None:
        model.load_state_dict(init_from)
    tcfg = TrainConfig(
        **{
            "steps": 100,
            "batch_size": 8,
            "seq_len": 128,
            "lr": 1e-3,
            "warmup_steps": 0,
            "schedule": "constant",
            **train_kw,
        }
    )
    return Trainer(model, tcfg, device=device, parallelism=parallelism)


@pytest.fixture(autouse=True)
def _exact_fp32():
    """fp32 comparisons mean fp32: TF32 matmuls (10-bit mantissa) would be the difference under test."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def run_steps(trainer: Trainer, batches) -> list[float]:
    return [trainer.train_step([b])["loss"] for b in batches]


def test_train_step_on_gpu_matches_cpu_reference():
    """fp32 on the GPU follows the CPU step for step; bf16 autocast stays within bf16's precision of it."""
    cfg = gpu_config()
    batches = pattern_batches(8, 8, 128)
    kw = {"lr": 3e-4}  # a smooth trajectory: at 1e-3 bf16 rounding moves the losses of later steps by ~10%
    cpu = make_trainer(cfg, "cpu", precision="fp32", **kw)
    init = {k: v.clone() for k, v in cpu.model.state_dict().items()}
    cpu_losses = run_steps(cpu, batches)
    fp32 = run_steps(make_trainer(cfg, "cuda", init_from=init, precision="fp32", **kw), batches)
    bf16_trainer = make_trainer(cfg, "cuda", init_from=init, precision="auto", **kw)
    assert bf16_trainer.autocast_dtype == torch.bfloat16  # auto = bf16 on a GPU
    bf16 = run_steps(bf16_trainer, batches)
    assert cpu_losses[-1] < cpu_losses[0] - 1.0  # the steps do train
    for ref, a, b in zip(cpu_losses, fp32, bf16):
        assert math.isclose(a, ref, rel_tol=1e-4), (a, ref)
        assert math.isclose(b, ref, rel_tol=1e-2), (b, ref)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _nccl_worker(rank: int, world: int, port: int, mode: str, init: dict, batches, out_path: str) -> None:
    torch.distributed.init_process_group(
        "nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        torch.cuda.set_device(rank)
        trainer = make_trainer(
            gpu_config(), f"cuda:{rank}", init_from=init, parallelism=mode, precision="fp32"
        )
        assert trainer.parallelism == mode
        losses = []
        for (
            x,
            y,
        ) in batches:  # this rank's share of the global batch (every world-th row), in two micro-batches
            xr, yr = x[rank::world], y[rank::world]
            half = xr.size(0) // 2
            losses.append(trainer.train_step([(xr[:half], yr[:half]), (xr[half:], yr[half:])])["loss"])
        states, _ = trainer._full_states()
        if rank == 0:
            torch.save({"losses": losses, "state": {k: v.cpu() for k, v in states.items()}}, out_path)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_ddp_and_fsdp2_over_nccl_equal_one_device(mode, tmp_path):
    """All GPUs present, NCCL: the losses and final weights equal one device's run on the whole batch."""
    world = torch.cuda.device_count()
    batches = random_batches(4, 4 * world, 128, seed=1)
    ref = make_trainer(gpu_config(), "cuda", precision="fp32")
    init = {k: v.detach().cpu().clone() for k, v in ref.model.state_dict().items()}
    ref_losses = run_steps(ref, batches)
    out = tmp_path / "rank0.pt"
    torch.multiprocessing.spawn(
        _nccl_worker, args=(world, _free_port(), mode, init, batches, str(out)), nprocs=world, join=True
    )
    got = torch.load(out)
    for a, b in zip(got["losses"], ref_losses):
        assert math.isclose(a, b, rel_tol=1e-5), (got["losses"], ref_losses)
    ref_state = ref.model.state_dict()
    for name, value in got["state"].items():
        # Adam moves every weight by ~lr per step whatever its gradient's size, so a weight whose gradient is ~0
        # may differ by a fraction of lr (1e-3) after reductions in another order; on average they agree to ~1e-8
        ref_value = ref_state[name].cpu()
        torch.testing.assert_close(value, ref_value, atol=2e-4, rtol=1e-4)
        assert (value - ref_value).abs().mean() < 1e-7, name


def test_compiled_step_matches_eager():
    cfg = gpu_config()
    batches = random_batches(6, 8, 128, seed=2)
    eager = make_trainer(cfg, "cuda", precision="bf16")
    init = {k: v.clone() for k, v in eager.model.state_dict().items()}
    compiled = make_trainer(cfg, "cuda", init_from=init, precision="bf16", compile=True)
    for a, b in zip(run_steps(eager, batches), run_steps(compiled, batches)):
        assert math.isclose(a, b, rel_tol=5e-3), (a, b)


def test_activation_checkpointing_saves_memory_and_keeps_the_loss():
    cfg = gpu_config(num_layers=8, max_seq_len=1024)
    (batch,) = random_batches(1, 16, 1024, seed=3)
    peaks, results = {}, {}
    init = None
    for ckpt in (False, True):
        trainer = make_trainer(cfg, "cuda", init_from=init, precision="bf16", activation_checkpointing=ckpt)
        init = init or {k: v.clone() for k, v in trainer.model.state_dict().items()}
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        results[ckpt] = trainer.train_step([batch])
        peaks[ckpt] = torch.cuda.max_memory_allocated() - base
        del trainer
        torch.cuda.empty_cache()
    assert peaks[True] < 0.6 * peaks[False], peaks
    assert math.isclose(results[True]["loss"], results[False]["loss"], rel_tol=1e-4)
    assert math.isclose(results[True]["grad_norm"], results[False]["grad_norm"], rel_tol=1e-2)


# ------------------------------------------------------------------------------------------ vLLM on the GPU


@pytest.fixture(scope="module")
def pattern_model(tmp_path_factory):
    """A small model trained on the GPU until it continues the counting pattern, exported as an HF directory."""
    from llm_core.export_hf import export_hf

    cfg = gpu_config(num_layers=2, max_seq_len=256)
    trainer = make_trainer(cfg, "cuda", precision="bf16", lr=3e-3, seq_len=64)
    losses = run_steps(trainer, pattern_batches(200, 32, 64))
    assert losses[-1] < 0.05, losses[-10:]
    model = trainer.model.eval()
    out = export_hf(model, tmp_path_factory.mktemp("hf") / "pattern", dtype="bfloat16")
    return model, out


PROMPTS = [[5, 6, 7, 8], [40, 41, 42], [60, 61, 1, 2, 3]]


def llm_core_greedy(model: Transformer, n: int) -> list[list[int]]:
    with torch.autocast("cuda", dtype=torch.bfloat16):
        return generate(model, PROMPTS, SamplingParams(max_new_tokens=n, temperature=0.0))


def vllm_greedy(model_dir, n: int, **engine) -> list[list[int]]:
    vllm = pytest.importorskip("vllm")
    from vllm.inputs import TokensPrompt

    llm = vllm.LLM(
        model=str(model_dir), skip_tokenizer_init=True, gpu_memory_utilization=0.2, seed=0, **engine
    )
    params = vllm.SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, detokenize=False)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in PROMPTS], params)
    return [list(o.outputs[0].token_ids) for o in outs]


def expected_pattern(n: int) -> list[list[int]]:
    return [[(p[-1] + i) % 61 + 1 for i in range(n)] for p in PROMPTS]


def test_vllm_gpu_serving_greedy_equals_llm_core(pattern_model):
    model, hf_dir = pattern_model
    ours = llm_core_greedy(model, 24)
    assert ours == expected_pattern(24)  # the reference itself is right
    assert vllm_greedy(hf_dir, 24, dtype="bfloat16") == ours


def test_vllm_bitsandbytes_4bit_keeps_greedy_output(pattern_model):
    pytest.importorskip("bitsandbytes")
    _, hf_dir = pattern_model
    # in-flight 4-bit (NF4) quantization of the bf16 export: what quantization=bitsandbytes serves
    assert vllm_greedy(hf_dir, 24, dtype="bfloat16", quantization="bitsandbytes") == expected_pattern(24)


def test_vllm_bitsandbytes_8bit_checkpoint_keeps_greedy_output(pattern_model, tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    _, hf_dir = pattern_model
    quantized = AutoModelForCausalLM.from_pretrained(
        hf_dir, quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map={"": 0}
    )
    quantized.save_pretrained(tmp_path / "int8")  # a pre-quantized 8-bit checkpoint vLLM loads as such
    assert vllm_greedy(
        tmp_path / "int8", 24, dtype="bfloat16", quantization="bitsandbytes"
    ) == expected_pattern(24)
