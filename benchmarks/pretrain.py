"""Pretraining throughput: a plain single-process PyTorch loop vs Ray Train with 1 and 2 workers, same model.

    python benchmarks/pretrain.py [--presets tiny,gpt-130m] [--steps 12] [--warmup 3] [--no-append]

For each preset the three variants run back to back on the same random token stream, with the same per-worker
micro-batch, using llm_core's Trainer (the code the pretraining job runs). Tokens/s is measured over the steps
after warm-up; MFU is reported where the device's peak is known (GPUs). "Ray overhead" compares the 1-worker
Ray Train run with the plain loop (goal: <= 10%). On CPU, 2 workers share the machine's cores, so their total
tokens/s shows how well the cores are split, not a speed-up. Appends a dated table to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from machine import append_section, cpu_model  # noqa: E402  (benchmarks/machine.py, beside this script)

from jobs.platform.configfile import model_config_from_preset  # noqa: E402
from llm_core.data import RandomWindows  # noqa: E402
from llm_core.model import Transformer  # noqa: E402
from llm_core.trainer import TrainConfig, Trainer  # noqa: E402

SHAPES = {  # per-worker micro-batch and sequence length per preset, sized for a 2-core CPU; presets take their
    # vocabulary from a tokenizer: the tiny one's 4k, the recipe's 32k for the others
    "tiny": {"batch_size": 16, "seq_len": 128, "overrides": ["vocab_size=4096"]},
    "gpt-130m": {"batch_size": 2, "seq_len": 256, "overrides": ["vocab_size=32768", "num_layers=4"]},
    "minimind-26m": {"batch_size": 4, "seq_len": 256, "overrides": ["vocab_size=32768"]},
    "kk-350m": {"batch_size": 8, "seq_len": 4096, "overrides": ["vocab_size=32768"]},
}


def timed_steps(trainer: Trainer, sampler: RandomWindows, steps: int, warmup: int) -> float:
    """Tokens/s of this process over `steps` optimizer steps after `warmup` untimed ones."""
    for _ in range(warmup):
        trainer.train_step(sampler.next_step(trainer.accum))
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    start, tokens = time.perf_counter(), 0.0
    for _ in range(steps):
        tokens += trainer.train_step(sampler.next_step(trainer.accum))["tokens"]
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    return tokens / (time.perf_counter() - start)


def build(spec: dict, device: str | torch.device, parallelism: str = "none") -> tuple[Trainer, RandomWindows]:
    cfg = model_config_from_preset(spec["preset"], spec["overrides"])
    tcfg = TrainConfig(
        steps=10_000,
        batch_size=spec["batch_size"],
        seq_len=spec["seq_len"],
        lr=1e-4,
        warmup_steps=0,
        precision=spec.get("precision", "auto"),
    )
    torch.manual_seed(0)
    trainer = Trainer(Transformer(cfg), tcfg, device=device, parallelism=parallelism)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, 2_000_000).astype(np.uint32)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    return trainer, RandomWindows(tokens, tcfg.seq_len, tcfg.batch_size, seed=0, rank=rank, world_size=world)


def ray_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    torch.set_num_threads(config["threads"])
    parallelism = "ddp" if ctx.get_world_size() > 1 else "none"
    trainer, sampler = build(config["spec"], ray.train.torch.get_device(), parallelism=parallelism)
    tps = timed_steps(trainer, sampler, config["steps"], config["warmup"])  # every rank sees the global count
    if ctx.get_world_rank() == 0:
        Path(config["out"]).write_text(
            json.dumps(
                {
                    "tokens_per_s": tps,
                    "flops_per_token": trainer.flops_per_token,
                    "peak_flops": trainer.peak_flops,
                }
            )
        )


def run_ray(spec: dict, workers: int, steps: int, warmup: int, use_gpu: bool) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cores = os.cpu_count() or 1
    threads = max(1, cores // workers) if not use_gpu else 4
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        TorchTrainer(
            ray_worker,
            train_loop_config={
                "spec": spec,
                "steps": steps,
                "warmup": warmup,
                "out": str(out),
                "threads": threads,
            },
            scaling_config=ScalingConfig(
                num_workers=workers,
                use_gpu=use_gpu,
                resources_per_worker={"CPU": 0 if use_gpu else cores / workers},
            ),
            run_config=RunConfig(
                name=f"bench-{spec['preset']}-{workers}", storage_path=str(Path(tmp) / "storage")
            ),
        ).fit()
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--presets", default="tiny,gpt-130m")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--gpu", action="store_true", help="CUDA: one GPU per worker, bf16 autocast")
    parser.add_argument("--workers", default="1,2", help="Ray Train worker counts to compare")
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()

    import ray

    ray.init(include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    device = "cuda" if args.gpu else "cpu"
    rows = []
    for preset in args.presets.split(","):
        spec = {"preset": preset, **SHAPES[preset]}
        if args.gpu:
            spec["precision"] = "bf16"
        torch.set_num_threads(os.cpu_count() or 1)
        trainer, sampler = build(spec, device)
        plain = timed_steps(trainer, sampler, args.steps, args.warmup)
        flops, peak = trainer.flops_per_token, trainer.peak_flops
        del trainer
        rows.append((preset, "plain PyTorch loop", 1, plain, plain * flops, peak, None))
        for workers in [int(w) for w in args.workers.split(",")]:
            res = run_ray(spec, workers, args.steps, args.warmup, args.gpu)
            tps = res["tokens_per_s"]
            overhead = 1 - tps / plain if workers == 1 else None
            rows.append(
                (preset, f"Ray Train, {workers} worker(s)", workers, tps, tps * flops, peak, overhead)
            )
    ray.shutdown()

    header = "| preset | variant | workers | tokens/s | achieved TFLOP/s | MFU | Ray overhead vs plain |\n"
    header += "|---|---|---|---|---|---|---|\n"
    lines = []
    for preset, variant, workers, tps, achieved, peak, overhead in rows:
        mfu = f"{achieved / (workers * peak):.1%}" if peak else "n/a (CPU)"
        over = f"{overhead:+.1%}" if overhead is not None else ""
        lines.append(
            f"| {preset} | {variant} | {workers} | {tps:,.0f} | {achieved / 1e12:.3f} | {mfu} | {over} |"
        )
    table = header + "\n".join(lines)
    print(table)
    if not args.no_append:
        cpu = cpu_model()
        gpu = torch.cuda.get_device_name(0) if args.gpu else "none"
        section = (
            f"\n## Pretraining throughput — {dt.date.today().isoformat()}\n\n"
            f"Machine: {cpu}, {os.cpu_count()} cores, GPU {gpu}, torch {torch.__version__}.  \n"
            f"Command: `python {' '.join(sys.argv)}`  \n"
            f"Shapes: {json.dumps({p: SHAPES[p] for p in args.presets.split(',')})}\n\n{table}\n"
        )
        append_section(section)


if __name__ == "__main__":
    main()
