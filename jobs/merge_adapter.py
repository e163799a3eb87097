"""Merge a LoRA adapter into its base model and export the result, in one command.

    python -m jobs.merge_adapter --adapter models:/tulpar-tiny-lora/2 --out /tmp/merged
    python -m jobs.merge_adapter --adapter runs:/<run id>/adapter --base models:/tulpar-tiny@pretrain-latest --out DIR
    python -m jobs.merge_adapter --adapter ./my-peft-adapter --base ./base-hf-dir --out DIR

`--adapter` is a PEFT LoRA adapter: a directory (adapter_config.json + adapter_model.safetensors), an MLflow
artifact URI (`runs:/<run>/adapter`, what `jobs.sft` with `lora:` logs), or a registered version that carries one
(the `tulpar.adapter_uri` tag SFT-with-LoRA versions get). The base is `--base`, else the version's
`tulpar.parent_model_uri`, else the adapter's own `base_model_name_or_path`. The merged model is written as an
HF-format directory with the base's tokenizer (`llm_core.export_hf`), loadable by transformers, vLLM and every
Tulpar stage; `--gguf FILE` also writes it as GGUF (`llm_core.export_gguf`, with its tokenizer check). User errors
print `error: ...` and exit 2.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m jobs.merge_adapter",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--adapter", required=True, help="PEFT adapter dir, runs:/<run>/adapter or models:/name/N")
    p.add_argument("--base", help="base model (models:/..., HF dir); default: from the adapter's lineage")
    p.add_argument("--out", required=True, type=Path, help="directory for the merged HF-format model")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument(
        "--gguf", type=Path, help="also write the merged model as this GGUF file (jobs.export_gguf)"
    )
    p.add_argument("--gguf-dtype", choices=["f16", "bf16", "q8_0"], default="f16")
    p.add_argument(
        "--allow-tokenizer-mismatch",
        action="store_true",
        help="GGUF: export even when llama.cpp would tokenize differently (see docs/gguf.md)",
    )
    return p.parse_args(argv)


def fetch_adapter(source: str, settings) -> tuple[Path, str | None]:
    """(local PEFT adapter directory, the base its lineage names or None)."""
    import mlflow

    from jobs.platform import registry

    base: str | None = None
    artifact = source
    if registry.is_registered(source):
        version = registry.resolve(source, settings)  # typed errors for a missing version, alias or registry
        artifact = version.tags.get("tulpar.adapter_uri") or ""
        if not artifact:
            raise ValueError(
                f"{source} ({version.uri}) has no tulpar.adapter_uri tag, so it carries no LoRA adapter (its "
                "weights are already a full model): pass the adapter itself (runs:/<run>/adapter or a directory)"
            )
        base = version.tags.get("tulpar.parent_model_uri")
    if artifact.startswith("runs:/"):
        mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
        dst = settings.home / "cache" / "adapters" / hashlib.sha256(artifact.encode()).hexdigest()[:16]
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact, dst_path=str(dst)))
        except Exception as exc:  # a missing run or artifact: MLflow raises several types
            raise ValueError(
                f"adapter {artifact} cannot be downloaded ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}): "
                "check the run id and the artifact path (SFT with lora logs `adapter`)"
            ) from None
    else:
        local = Path(artifact).expanduser()
    if not (local / "adapter_config.json").is_file():
        raise ValueError(
            f"adapter {source!r} ({local}) has no adapter_config.json: pass a PEFT LoRA adapter directory, "
            "runs:/<run>/adapter, or a registered version trained with lora"
        )
    if base is None:
        base = json.loads((local / "adapter_config.json").read_text(encoding="utf-8")).get(
            "base_model_name_or_path"
        )
    return local, base


def merge(args: argparse.Namespace) -> Path:
    from jobs.platform import registry
    from jobs.platform.runtime import Settings
    from jobs.publishing.gguf import refuse_tokenizer_mismatch, write_gguf
    from llm_core.export_hf import export_hf, load_hf
    from llm_core.lora import load_peft_adapter, strip_lora
    from llm_core.tokenizer import Tokenizer

    settings = Settings.from_env()
    adapter_dir, lineage_base = fetch_adapter(args.adapter, settings)
    base_ref = args.base or lineage_base
    if not base_ref:
        raise ValueError(f"adapter {args.adapter!r} names no base model: pass --base <models:/... or HF dir>")
    base = registry.hf_model(base_ref, settings)
    assert base.path is not None
    model = load_hf(base.path)
    load_peft_adapter(model, adapter_dir)  # strict: shapes, ranks and tensor names must match the base
    strip_lora(model)
    tokenizer = Tokenizer.from_dir(base.path)
    if args.gguf is not None and not args.allow_tokenizer_mismatch:  # refused before anything is written
        refuse_tokenizer_mismatch(tokenizer, f"{base.uri}'s tokenizer")
    out = export_hf(model.eval(), args.out, tokenizer=tokenizer, dtype=args.dtype)
    print(
        f"merged {args.adapter} into {base.uri}: {model.num_params() / 1e6:.2f}M parameters -> {out}",
        file=sys.stderr,
    )
    if args.gguf is not None:
        result = write_gguf(
            model,
            tokenizer,
            args.gguf,
            dtype=args.gguf_dtype,
            name=args.out.name,
            allow_tokenizer_mismatch=args.allow_tokenizer_mismatch,
        )
        print(
            f"GGUF ({args.gguf_dtype}): {result.path}, Ollama Modelfile: {result.modelfile}", file=sys.stderr
        )
    return out


def main(argv: list[str] | None = None) -> int:
    from jobs.platform.runtime import run_cli

    return run_cli(lambda: merge(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
