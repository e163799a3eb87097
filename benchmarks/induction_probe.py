"""Does a preset learn to copy by content (an induction head) from a budget of CPU steps? Issue 18's passkey question.

    .venv/bin/python benchmarks/induction_probe.py --preset tiny --steps 800 --seq-len 128
    .venv/bin/python benchmarks/induction_probe.py --preset tiny --steps 400 --seq-len 64 --fixed-distance 32

Trains a fresh model of the preset (vocabulary `--vocab-size`) on windows of uniformly random tokens in which a
span of 16 .. seq_len/3 tokens is written a second time further on. With a random distance (the default), only
retrieval by content predicts the copy: find the earlier occurrence of the current token and read what followed
it, which is what passkey retrieval needs. With `--fixed-distance D` the span is always copied exactly D tokens
later, which a model can also learn by position alone (attend D-1 tokens back), without retrieval. Every
`--every` steps it prints the loss and the greedy accuracy on the copied tokens (2..span) of the current batch;
chance is 1/vocab. Nothing else in the windows is predictable: the loss of a model that does not copy stays at
ln(vocab).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from jobs.platform.configfile import model_config_from_preset  # noqa: E402
from llm_core.model import Transformer  # noqa: E402
from llm_core.optim import build_optimizer, build_scheduler  # noqa: E402


def batch(rng: np.random.Generator, size: int, seq_len: int, vocab: int, fixed: int | None):
    """(tokens (size, seq_len + 1), mask (size, seq_len) of the targets that are copies)."""
    x = rng.integers(0, vocab, (size, seq_len + 1))
    mask = np.zeros((size, seq_len), dtype=bool)
    for b in range(size):
        if fixed is not None:
            m = fixed
            d = fixed
        else:
            m = int(rng.integers(16, seq_len // 3))
            d = int(rng.integers(m, seq_len + 1 - m))
        a = int(rng.integers(0, seq_len + 2 - m - d))
        x[b, a + d : a + d + m] = x[b, a : a + m]
        mask[b, a + d : a + d + m - 1] = (
            True  # targets at positions a+d .. a+d+m-2 are the copy's tokens 2..m
        )
    return torch.from_numpy(x), torch.from_numpy(mask)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--fixed-distance", type=int, default=None, help="copy exactly this far (and this long)")
    p.add_argument("--every", type=int, default=100)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.fixed_distance is not None and 2 * args.fixed_distance > args.seq_len + 1:
        p.error(f"--fixed-distance {args.fixed_distance}: a span and its copy need 2 x D <= seq_len + 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = model_config_from_preset(args.preset, [f"vocab_size={args.vocab_size}"])
    model = Transformer(cfg).train()
    opt = build_optimizer(model, args.lr, 0.1, (0.9, 0.95))
    sched = build_scheduler(
        opt,
        total_steps=args.steps,
        warmup_steps=50,
        schedule="cosine",
        min_lr_ratio=0.1,
        decay_fraction=0.2,
    )
    rng = np.random.default_rng(args.seed)
    kind = f"fixed distance {args.fixed_distance}" if args.fixed_distance else "random distance"
    print(
        f"{args.preset}: {cfg.num_params() / 1e6:.2f}M params, windows of {args.seq_len} random tokens with a "
        f"repeated span ({kind}); chance {1 / args.vocab_size:.4f}, loss without copying ln V = "
        f"{math.log(args.vocab_size):.3f}",
        flush=True,
    )
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        x, mask = batch(rng, args.batch, args.seq_len, args.vocab_size, args.fixed_distance)
        out = model(x[:, :-1], x[:, 1:])
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % args.every == 0 or step == args.steps:
            with torch.no_grad():
                pred = model(x[:, :-1]).logits.argmax(-1)
            acc = (pred == x[:, 1:])[mask].float().mean().item()
            print(
                f"step {step}: loss {out.loss.item():.3f}, copy accuracy {acc:.3f} "
                f"({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
