"""Does distributed dedup keep the same documents as the sequential pass it replaced?

Runs the single-process reference loop (jobs/prep/reference.py: exact keys, then a `datasketch.MinHashLSH`
queried and filled one kept document at a time) on a preprocessing config, and compares the documents it keeps
with those a finished `jobs.preprocess` dataset of the same config kept (its `documents/*.parquet`). Every
difference is listed with both texts' locations and the reason, so it can be explained.

    python benchmarks/data_scale.py dedup-diff --config configs/preprocess/kk-ru-en.yaml \
        --dataset $TULPAR_HOME/datasets/kk-ru-en [--override tokenizer.path=tiny]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pyarrow.parquet as pq

from jobs.platform.configfile import load_config
from jobs.platform.runtime import Settings
from jobs.prep.config import PreprocessConfig
from jobs.prep.reference import run_loop
from jobs.preprocess import resolve_tokenizer_path
from llm_core.tokenizer import Tokenizer


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--dataset", required=True, help="the jobs.preprocess output of the same config")
    p.add_argument("--override", action="append", default=[])
    args = p.parse_args(argv)
    settings = Settings.from_env()
    cfg = load_config(PreprocessConfig, args.config, args.override)
    tok = Tokenizer.from_dir(resolve_tokenizer_path(cfg.tokenizer.path, settings))
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        ref = run_loop(cfg, settings.require_data(), tok, Path(tmp) / "ds")
    docs = pq.read_table(Path(args.dataset) / "documents").to_pandas()
    pipeline_kept = set(docs.loc[docs["reason"].isin(["", "mixture_downsampled"]), "doc_id"].tolist())
    loop_kept = set(ref.kept)
    by_id = docs.set_index("doc_id")
    only_loop = sorted(loop_kept - pipeline_kept)
    only_pipeline = sorted(pipeline_kept - loop_kept)
    print(
        f"documents in: {len(docs):,}; kept by the sequential loop: {len(loop_kept):,}; "
        f"kept by the distributed pipeline: {len(pipeline_kept):,}"
    )
    print(f"kept only by the loop: {len(only_loop)}; kept only by the pipeline: {len(only_pipeline)}")
    for x in only_loop + only_pipeline:
        r = by_id.loc[x]
        print(
            f"  {r['file']}#{r['record']}: pipeline says {r['reason'] or 'kept'}"
            + (
                f" (duplicate of {r['duplicate_of_file']}#{r['duplicate_of_record']})"
                if r["duplicate_of"] >= 0
                else ""
            )
        )
    return {
        "documents": len(docs),
        "loop_kept": len(loop_kept),
        "pipeline_kept": len(pipeline_kept),
        "only_loop": only_loop,
        "only_pipeline": only_pipeline,
    }


if __name__ == "__main__":
    main()
