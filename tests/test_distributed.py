"""Data parallelism without Ray: DDP and FSDP2 over gloo give the single-process trajectory; FSDP checkpoints
gather the full state and resume exactly."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from llm_core.data import RandomWindows
from llm_core.model import Transformer
from llm_core.trainer import EvalSet, TrainConfig, Trainer
from tests.conftest import small_config
from tests.stack import free_port

TOKENS = np.random.default_rng(0).integers(0, 256, 20_000).astype(np.uint16)
STEPS = 4


def make(batch_size: int, parallelism: str = "none") -> Trainer:
    torch.manual_seed(0)
    cfg = TrainConfig(steps=10, batch_size=batch_size, seq_len=32, lr=1e-3, warmup_steps=0)
    return Trainer(Transformer(small_config()), cfg, parallelism=parallelism)


def trajectory(trainer: Trainer, sampler: RandomWindows) -> list[float]:
    losses = [trainer.train_step(sampler.next_step(trainer.accum))["loss"] for _ in range(STEPS)]
    return losses + [trainer.evaluate([EvalSet("x", TOKENS[:3000], 1.0)])["val_loss"]]


def _worker(rank: int, world: int, port: int, ckpt_dir: str, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        out = {}
        for parallelism in ("ddp", "fsdp"):
            trainer = make(4, parallelism)
            sampler = RandomWindows(TOKENS, 32, 4, seed=1, rank=rank, world_size=world)
            out[parallelism] = trajectory(trainer, sampler)
        # FSDP: save (full state gathered), restore into a fresh sharded trainer, take one more step on each
        trainer.save_to(Path(ckpt_dir), sampler, {})
        dist.barrier()
        fresh = make(4, "fsdp")
        fresh_sampler = RandomWindows(TOKENS, 32, 4, seed=1, rank=rank, world_size=world)
        fresh.resume(Path(ckpt_dir), fresh_sampler)
        a = trainer.train_step(sampler.next_step())["loss"]
        b = fresh.train_step(fresh_sampler.next_step())["loss"]
        out["resume"] = (a, b)
        if rank == 0:
            queue.put(out)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_ddp_and_fsdp_match_single_process(tmp_path):
    single = trajectory(make(8), RandomWindows(TOKENS, 32, 8, seed=1))
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(
        _worker, args=(2, free_port(), str(tmp_path / "ckpt"), queue), nprocs=2, start_method="spawn"
    )
    out = queue.get()
    for parallelism in ("ddp", "fsdp"):
        np.testing.assert_allclose(out[parallelism], single, rtol=1e-5, err_msg=parallelism)
    a, b = out["resume"]
    assert a == b, "a resumed FSDP run continues bit-identically"


def test_step_lines_give_progress_and_the_eta_of_this_attempt():
    from jobs.training.distributed import StepETA

    now = [0.0]
    eta = StepETA(100, 400, clock=lambda: now[0])  # an attempt resumed at step 100
    assert eta.describe(100) == "25% of 400 steps, ETA unknown"
    now[0] = 10.0  # 50 steps in 10 s: 250 steps left take 50 s
    assert eta.describe(150) == "38% of 400 steps, ETA 50s"
    now[0] = 40.0  # 100 steps in 40 s: 200 left take 80 s
    assert eta.describe(200) == "50% of 400 steps, ETA 1m20s"
    assert eta.describe(400) == "100% of 400 steps, ETA 0s"
    long = StepETA(0, 100_000, clock=lambda: now[0])
    now[0] = 100.0  # 10 steps in 60 s: 99,990 steps left take 599,940 s
    assert long.describe(10) == "0% of 100000 steps, ETA 166h39m"
