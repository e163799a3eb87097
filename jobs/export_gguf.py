"""Export a model to GGUF for llama.cpp, Ollama and LM Studio, with its tokenizer, chat template and a Modelfile.

    python -m jobs.export_gguf --model models:/tulpar-tiny@champion --out tulpar-tiny-q8_0.gguf --dtype q8_0
    ollama create tulpar-tiny -f tulpar-tiny-q8_0.Modelfile

`--model` takes what `jobs.eval` takes: `models:/<name>/<version>`, `models:/<name>@<alias>`, an HF-format directory
or an llm_core checkpoint directory. `--dtype` is f16 (default), bf16 or q8_0 (norms stay float32). Dense models
only (the `llama` GGUF architecture).

The export refuses a tokenizer that llama.cpp would split differently (its pre-tokenizer regex, normalization or
BPE options are not one llama.cpp knows), naming each difference; a tokenizer trained with
`pre_tokenizer: llama-bpe` passes. `--allow-tokenizer-mismatch` exports anyway and warns what will differ.
Prints what it wrote, then one JSON line (`gguf`, `modelfile`, `dtype`, `tokenizer_pre`,
`tokenizer_differences`, `bytes`). User errors print `error: ...` and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from llm_core.export_gguf import GGUF_DTYPES


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m jobs.export_gguf",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model", required=True, help="models:/name/N, models:/name@alias, HF dir or checkpoint dir"
    )
    p.add_argument(
        "--out", required=True, type=Path, help="the .gguf file to write (Modelfile goes beside it)"
    )
    p.add_argument("--dtype", choices=GGUF_DTYPES, default="f16", help="weight type of the matrices")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the model's own)")
    p.add_argument("--name", help="general.name in the GGUF (default: the model's name)")
    p.add_argument(
        "--allow-tokenizer-mismatch",
        action="store_true",
        help="export even if llama.cpp would tokenize differently (warns with the differences)",
    )
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    from jobs.evaluation.config import ModelSpec
    from jobs.evaluation.models import load_model
    from jobs.platform.runtime import Settings
    from jobs.publishing.gguf import write_gguf

    t0 = time.perf_counter()
    spec = ModelSpec(source=args.model, tokenizer=args.tokenizer, device="cpu", dtype="float32")
    loaded = load_model(spec, Settings.from_env())
    name = args.name or loaded.name or loaded.label
    result = write_gguf(
        loaded.model,
        loaded.tokenizer,
        args.out,
        dtype=args.dtype,
        name=name,
        allow_tokenizer_mismatch=args.allow_tokenizer_mismatch,
    )
    size = result.path.stat().st_size
    print(
        f"{loaded.label}: {loaded.model.num_params() / 1e6:.1f}M parameters -> {result.path} ({args.dtype}, "
        f"{size / 2**20:.1f} MiB, tokenizer.ggml.pre = {result.tokenizer_pre}) in {time.perf_counter() - t0:.1f} s"
    )
    print(f"Ollama: ollama create {name.replace('/', '-')} -f {result.modelfile}")
    return {
        "gguf": str(result.path),
        "modelfile": str(result.modelfile),
        "dtype": result.dtype,
        "tokenizer_pre": result.tokenizer_pre,
        "tokenizer_differences": result.tokenizer_differences,
        "bytes": size,
    }


def main(argv: list[str] | None = None) -> int:
    from jobs.platform.runtime import run_cli

    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    return run_cli(lambda: print(json.dumps(run(parse_args(argv)), ensure_ascii=False)))


if __name__ == "__main__":
    sys.exit(main())
