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
