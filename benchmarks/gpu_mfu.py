"""Training MFU on one GPU: llm_core's Trainer step in bf16 for the gpt-130m and kk-350m presets.

    python benchmarks/gpu_mfu.py [--presets gpt-130m,kk-350m] [--seq-len 2048] [--batch 16] [--steps 10]
                                 [--variants eager,compile,eager+ckpt] [--json OUT.jsonl] [--no-append]

Each (preset, variant) builds the model at the preset's shape with the 32k tokenizer's vocabulary (32,000) and
runs `Trainer.train_step` exactly as `jobs.pretrain` does (bf16 autocast, AdamW, grad clipping, LR schedule, the
loss read back every step), `--warmup` untimed steps (compilation happens there), then `--steps` timed ones:
tokens/s = batch x seq_len x steps / wall time (CUDA synchronized). MFU = tokens/s x
`ModelConfig.flops_per_token(seq_len)` (6 x matmul parameters + attention, the formula nanochat and PaLM use) /
the GPU's dense bf16 peak (`llm_core.trainer.device_peak_flops`: 989 TFLOP/s for an H100 SXM). The bf16 matmul
rate measured on this GPU (8192^3, mean of 10) is printed beside it, as the achievable ceiling. A variant that
runs out of memory is retried at half the batch. Appends a dated table to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from datetime import datetime
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from machine import append_section, cpu_model  # noqa: E402

from llm_core.config import ModelConfig  # noqa: E402
from llm_core.model import Transformer  # noqa: E402
from llm_core.trainer import TrainConfig, Trainer, TrainingError, device_peak_flops  # noqa: E402

VOCAB_32K = 32000  # configs/tokenizer/kk-ru-en-32k.yaml


def preset(name: str) -> ModelConfig:
    raw = yaml.safe_load((REPO / "configs" / "model" / f"{name}.yaml").read_text())
    return ModelConfig(**{**raw, "vocab_size": VOCAB_32K})


def matmul_tflops(n: int = 8192, repeats: int = 10) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - t) / 1e12


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(
    cfg: ModelConfig, variant: str, batch: int, seq_len: int, steps: int, warmup: int, device: str = "cuda"
) -> dict:
    torch.manual_seed(0)
    tcfg = TrainConfig(
        steps=warmup + steps + 1,
        batch_size=batch,
        seq_len=seq_len,
        lr=3e-4,
        warmup_steps=0,
        precision="bf16",
        compile="compile" in variant,
        activation_checkpointing="ckpt" in variant,
    )
    trainer = Trainer(Transformer(cfg), tcfg, device=device)
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, cfg.vocab_size, (4, batch, seq_len + 1), generator=g)

    def step(i: int) -> dict:
        tokens = data[i % len(data)]
        return trainer.train_step([(tokens[:, :-1], tokens[:, 1:])])

    t0 = time.perf_counter()
    for i in range(warmup):
        step(i)
    sync(device)
    warm_s = time.perf_counter() - t0
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(steps):
        last = step(i)
    sync(device)
    elapsed = time.perf_counter() - t0
    tokens_per_s = batch * seq_len * steps / elapsed
    flops = cfg.flops_per_token(seq_len)
    peak = device_peak_flops(torch.device(device)) or float("nan")
    return {
        "params_m": round(trainer.model.num_params() / 1e6, 1),
        "variant": variant,
        "batch": batch,
        "seq_len": seq_len,
        "tokens_per_s": tokens_per_s,
        "step_ms": 1000 * elapsed / steps,
        "tflops": tokens_per_s * flops / 1e12,
        "mfu": tokens_per_s * flops / peak,
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9
        if device.startswith("cuda")
        else float("nan"),
        "warmup_s": warm_s,
        "final_loss": last["loss"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="gpt-130m,kk-350m")
    p.add_argument("--variants", default="eager,compile,eager+ckpt")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=16, help="sequences per step (halved on out-of-memory)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", help="also append each result as a JSON line to this file")
    p.add_argument("--no-append", action="store_true")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("gpu_mfu.py needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = True
    name = torch.cuda.get_device_name()
    matmul = matmul_tflops()
    print(f"{name}: bf16 matmul {matmul:.0f} TFLOP/s measured", flush=True)
    rows = []
    for preset_name in args.presets.split(","):
        cfg = preset(preset_name)
        for variant in args.variants.split(","):
            batch = args.batch
            while True:
                try:
                    r = measure(cfg, variant, batch, args.seq_len, args.steps, args.warmup)
                    break
                except (TrainingError, torch.OutOfMemoryError) as e:
                    torch.cuda.empty_cache()
                    if batch == 1:
                        raise
                    print(f"{preset_name} {variant} batch {batch}: {e}; retrying at {batch // 2}", flush=True)
                    batch //= 2
            r["preset"] = preset_name
            rows.append(r)
            print(json.dumps(r), flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(r) + "\n")
            torch.cuda.empty_cache()
    lines = [
        f"\n## GPU training MFU, {datetime.now():%Y-%m-%d %H:%M}\n",
        f"Machine: {name} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB), host CPU "
        f"{cpu_model()}, torch {torch.__version__}. Command: `python benchmarks/gpu_mfu.py "
        f"{shlex.join(argv if argv is not None else sys.argv[1:])}`.",
        f"MFU against {device_peak_flops(torch.device('cuda')) / 1e12:.0f} TFLOP/s dense bf16 peak; "
        f"a plain 8192^3 bf16 matmul measured {matmul:.0f} TFLOP/s here. Vocabulary 32,000, bf16 autocast, "
        "AdamW, grad clipping; random tokens.\n",
        "| preset | params | variant | batch x seq | tokens/s | step ms | TFLOP/s | MFU | peak mem GB | warm-up s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['preset']} | {r['params_m']}M | {r['variant']} | {r['batch']} x {r['seq_len']} | "
            f"{r['tokens_per_s']:,.0f} | {r['step_ms']:.1f} | {r['tflops']:.0f} | {100 * r['mfu']:.1f}% | "
            f"{r['peak_memory_gb']:.1f} | {r['warmup_s']:.0f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_append:
        append_section(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
