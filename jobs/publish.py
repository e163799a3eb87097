"""Publish a model to the Hugging Face Hub with a generated model card.

    python -m jobs.publish --model models:/tulpar-tiny@champion --repo-id you/tulpar-tiny [--private]
    python -m jobs.publish --model models:/tulpar-tiny/3 --dry-run --out /tmp/tulpar-tiny-hub

`--model` takes what `jobs.eval` and `jobs.generate` take that has an HF export: `models:/<name>/<version>`,
`models:/<name>@<alias>` or an HF-format directory (a training checkpoint is refused: publish its registered
version). The uploaded folder holds the export's safetensors weights, config.json, generation_config.json,
tulpar_config.json and tokenizer files, README.md (the model card: jobs/publishing/card.py) and the card's loss
curves under assets/. `--dry-run --out DIR` writes exactly that folder and uploads nothing.

The token is read from HF_TOKEN, the Hub's address from HF_ENDPOINT (huggingface_hub's setting). Every file goes
in one commit; a failed upload leaves nothing committed and is resumed by re-running the same command. After a
successful upload of a registered version, the version is tagged tulpar.hub.repo_id and tulpar.hub.commit, so a
model trained from it names it as its card's base_model. User errors print `error: ...` and exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

LICENSES_HELP = "an SPDX-style id the Hub knows (apache-2.0, mit, cc-by-4.0, other, ...)"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m jobs.publish",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model", required=True, help="models:/name/N, models:/name@alias or an HF-format directory"
    )
    p.add_argument("--repo-id", help="owner/name on the Hub (required unless --dry-run)")
    p.add_argument(
        "--private", action="store_true", help="create the repository private (a new repository only)"
    )
    p.add_argument("--license", default="apache-2.0", help=f"the card's license: {LICENSES_HELP}")
    p.add_argument("--revision", help="branch to commit to (created if missing; default main)")
    p.add_argument("--commit-message", help="default: 'Publish <model uri> with jobs.publish'")
    p.add_argument("--dry-run", action="store_true", help="write the folder to --out and upload nothing")
    p.add_argument("--out", type=Path, help="with --dry-run: a new or empty directory for the folder")
    p.add_argument(
        "--gguf",
        action="append",
        choices=["f16", "bf16", "q8_0"],
        default=[],
        help="also upload the model as GGUF in this dtype (repeatable; jobs.export_gguf) with an Ollama Modelfile",
    )
    p.add_argument(
        "--allow-tokenizer-mismatch",
        action="store_true",
        help="with --gguf: export even when llama.cpp would tokenize differently (docs/gguf.md)",
    )
    args = p.parse_args(argv)
    if args.dry_run and args.out is None:
        raise ValueError(
            "--dry-run writes the folder that would be uploaded: pass --out DIR (a new or empty dir)"
        )
    if args.out is not None and not args.dry_run:
        raise ValueError("--out is for --dry-run: add --dry-run, or drop --out to upload")
    if not args.dry_run and not args.repo_id:
        raise ValueError(
            "pass --repo-id <owner>/<name> (the Hub repository to publish to), or --dry-run --out DIR"
        )
    return args


def resolve_export(reference: str, settings):
    """(ResolvedModel, its HF export directory): a registered version (downloaded once) or an HF directory."""
    from jobs.platform import registry

    resolved = registry.resolve_fetched(reference, settings)  # typed errors naming the reference and the fix
    if resolved.kind == "checkpoint":
        raise ValueError(
            f"model {reference!r} is a training checkpoint, which has no HF export to publish: publish the version "
            "its training job registered (models:/<name>/<version>, e.g. models:/<name>@pretrain-latest) or an HF "
            "export directory ($TULPAR_HOME/models/<name>/<version>)"
        )
    assert resolved.path is not None
    return resolved, resolved.path


def build_folder(args: argparse.Namespace, settings, out: Path, workdir: Path):
    """Write the upload folder into `out`; returns (the model's record, the files written)."""
    from jobs.publishing import card, export
    from jobs.publishing.record import read_record

    resolved, hf_dir = resolve_export(args.model, settings)
    files = export.export_files(hf_dir, args.model)  # before the card: a missing export is the first error
    if args.gguf:
        check_gguf_tokenizer(hf_dir, args.allow_tokenizer_mismatch)  # refused before anything is written
    record = read_record(settings, resolved, hf_dir, workdir)
    text = card.render(record, repo_id=args.repo_id, license=args.license)
    if args.gguf:
        text += gguf_card_section(record.name or hf_dir.name, args.gguf)
    export.write_folder(out, files, text, card.card_assets(record))
    if args.gguf:
        write_ggufs(hf_dir, out, record.name or hf_dir.name, args.gguf, args.allow_tokenizer_mismatch)
    return record, sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())


def gguf_name(name: str, dtype: str) -> str:
    return f"{name.replace('/', '-')}-{dtype}.gguf"


def check_gguf_tokenizer(hf_dir: Path, allow_mismatch: bool) -> None:
    from jobs.publishing.gguf import refuse_tokenizer_mismatch
    from llm_core.tokenizer import Tokenizer

    if not allow_mismatch:
        refuse_tokenizer_mismatch(Tokenizer.from_dir(hf_dir), "this model's tokenizer")


def gguf_card_section(name: str, dtypes: list[str]) -> str:
    files = ", ".join(f"`{gguf_name(name, d)}`" for d in dtypes)
    return (
        "\n## GGUF (llama.cpp, Ollama, LM Studio)\n\n"
        f"{files}, written by Tulpar's `jobs.export_gguf` (the `llama` architecture, this tokenizer and chat "
        "template inside), each with an Ollama Modelfile beside it: `ollama create <name> -f <file>.Modelfile`.\n"
    )


def write_ggufs(hf_dir: Path, out: Path, name: str, dtypes: list[str], allow_mismatch: bool) -> None:
    """The export as `<name>-<dtype>.gguf` (+ Modelfile) in `out` for each dtype, the model loaded once."""
    from jobs.publishing import gguf
    from llm_core.export_hf import load_hf
    from llm_core.tokenizer import Tokenizer

    model, tokenizer = load_hf(hf_dir).eval(), Tokenizer.from_dir(hf_dir)
    for dtype in dtypes:
        path = out / gguf_name(name, dtype)
        gguf.write_gguf(
            model, tokenizer, path, dtype=dtype, name=path.stem, allow_tokenizer_mismatch=allow_mismatch
        )


def tag_version(record, repo_id: str, commit_oid: str) -> None:
    """Record on the registered version where it was published (a later card's base_model)."""
    from mlflow import MlflowClient

    from jobs.publishing.record import HUB_COMMIT_TAG, HUB_REPO_TAG

    try:
        client = MlflowClient()
        client.set_model_version_tag(record.name, record.version, HUB_REPO_TAG, repo_id)
        client.set_model_version_tag(record.name, record.version, HUB_COMMIT_TAG, commit_oid)
    except (
        Exception
    ) as exc:  # fail closed: the upload landed but the registry did not record it; exit 2 says how
        raise ValueError(
            f"published {record.uri} to {repo_id} (commit {commit_oid}), but could not tag the version in the "
            f"registry ({type(exc).__name__}: {exc}): set tags {HUB_REPO_TAG}={repo_id} and "
            f"{HUB_COMMIT_TAG}={commit_oid} on {record.uri} by hand, or re-run once the tracking server answers"
        ) from None


def run(args: argparse.Namespace) -> None:
    import mlflow

    from jobs.platform.runtime import Settings
    from jobs.publishing import hub

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    settings = Settings.from_env()
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    mlflow.set_registry_uri(settings.mlflow_tracking_uri)
    token = None
    if not args.dry_run:  # flags and token are checked before the model is read and anything is sent
        hub.check_repo_id(args.repo_id)
        token = hub.token_from_env()
    with tempfile.TemporaryDirectory(prefix="tulpar-publish-") as tmp:
        out = args.out if args.dry_run else Path(tmp) / "upload"
        record, files = build_folder(args, settings, out, Path(tmp) / "artifacts")
        if args.dry_run:
            print(f"dry run: {record.uri} -> {out} (nothing uploaded)", flush=True)
            for f in files:
                print(f"  {f:<48} {(out / f).stat().st_size:>12,} bytes", flush=True)
            return
        message = args.commit_message or f"Publish {record.uri} with jobs.publish"
        print(
            f"uploading {record.uri} to {hub.endpoint()}/{args.repo_id} ({len(files)} files, one commit)",
            flush=True,
        )
        done = hub.upload(
            out,
            args.repo_id,
            token=token,
            private=args.private,
            revision=args.revision,
            commit_message=message,
        )
        shutil.rmtree(out, ignore_errors=True)
    if record.kind == "registered":
        tag_version(record, args.repo_id, done.commit_oid)
    print(
        f"published {record.uri} -> {done.repo_url} (commit {done.commit_oid}): {done.commit_url}", flush=True
    )


def main(argv: list[str] | None = None) -> int:
    from jobs.platform.runtime import run_cli

    logging.basicConfig(
        level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    return run_cli(lambda: run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
