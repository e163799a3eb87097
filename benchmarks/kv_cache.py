"""KV-cache bytes per token and parameters: GQA vs MHA vs MLA at one model shape (default: the gpt-130m preset).

    .venv/bin/python benchmarks/kv_cache.py                 # gpt-130m, 32k vocabulary, bf16 cache
    .venv/bin/python benchmarks/kv_cache.py --preset mla-small

Everything is computed from ModelConfig (`kv_cache_bytes_per_token`, `attention_params`, `num_params`), the counts
tests/test_model.py checks against built models. Prints a markdown table (the one in docs/architecture.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from jobs.platform.configfile import model_config_from_preset  # noqa: E402
from llm_core.config import MLA_FIELDS, ModelConfig  # noqa: E402


def variants(base: ModelConfig) -> list[tuple[str, ModelConfig]]:
    """`base`'s width, depth, heads and MLP with four attentions: MHA, GQA, and MLA at two latent sizes."""
    hd, H = base.head_dim, base.num_heads
    common = {
        k: getattr(base, k) for k in type(base).model_fields if k != "attention" and k not in MLA_FIELDS
    }
    kv = base.num_kv_heads if base.num_kv_heads != H and not base.is_mla else max(1, H // 4)
    mla = {
        **common,
        "attention": "mla",
        "num_kv_heads": H,
        "norm_eps": 1e-6,
        "qk_nope_head_dim": hd,
        "v_head_dim": hd,
    }
    return [
        (f"MHA ({H} KV heads x {hd})", ModelConfig(**{**common, "num_kv_heads": H})),
        (f"GQA ({kv} KV heads x {hd})", ModelConfig(**{**common, "num_kv_heads": kv})),
        (
            "MLA (latent 512 + rotary 64; vLLM-servable)",
            ModelConfig(**mla, kv_lora_rank=512, qk_rope_head_dim=64),
        ),
        (
            f"MLA (latent {4 * hd} + rotary {hd // 2})",
            ModelConfig(**mla, kv_lora_rank=4 * hd, qk_rope_head_dim=hd // 2),
        ),
    ]


def table(base: ModelConfig, context: int) -> str:
    lines = [
        f"| attention | KV values/token/layer | KV bytes/token (bf16) | KV MiB at {context} tokens | "
        "attention params/layer | params (total) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, cfg in variants(base):
        per_token = cfg.kv_cache_bytes_per_token(2)
        lines.append(
            f"| {name} | {cfg.kv_cache_values_per_token() // cfg.num_layers:,} | {per_token:,} | "
            f"{per_token * context / 2**20:.1f} | {cfg.attention_params():,} | {cfg.num_params() / 1e6:.1f}M |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpt-130m")
    ap.add_argument("--vocab-size", type=int, default=32000)
    args = ap.parse_args(argv)
    base = model_config_from_preset(args.preset, [f"vocab_size={args.vocab_size}"])
    print(
        f"{args.preset}: dim {base.dim}, {base.num_layers} layers, {base.num_heads} heads, vocabulary "
        f"{args.vocab_size:,}\n"
    )
    print(table(base, base.max_seq_len))


if __name__ == "__main__":
    main()
