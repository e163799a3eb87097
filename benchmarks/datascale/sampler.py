"""The pretraining sampler on a synthetic multi-billion-token dataset: first-batch latency, batch time, worker RSS.

    python benchmarks/datascale/sampler.py [--tokens 2147483648] [--shards 64] [--seq-len 1024] [--batch-size 8]
        [--batches 200] [--compare-tokens 201326592] [--dir DIR] [--keep]

Writes a synthetic dataset of `--tokens` random uint16 ids (a 32k vocabulary, like our production tokenizer) as
`--shards` train shards split kk/ru/en 40/30/30 plus one small val shard per language, with `ShardWriter` and
`build_manifest` in blocks of 4M tokens (each block one document ending with eos), so `TokenDataset.open` reads it
like a `jobs.preprocess` output: 2^31 tokens are 4 GiB on disk. Then, for each measurement, it evicts the dataset's
files from the OS page cache (posix_fadvise DONTNEED, per file: the reads start cold) and starts a fresh Python
process that does what a pretraining worker does (`PretrainWindowsTask.build`): imports torch and llm_core, records
its resident memory (the baseline), opens the dataset, builds `RandomWindows(tokens("train"), seq_len, batch_size)`
and draws batches. Reported per measurement:

- open + first batch: from `TokenDataset.open` to the first (batch_size, seq_len) batch, cold cache;
- N batches: the next `--batches` batches (random windows over the whole stream, mostly cold reads);
- peak RSS beyond baseline: the process's peak resident memory (VmHWM) at the end minus its value before opening
  the dataset; RssFile/RssAnon at the end say which kind of memory it is.

Readers: `stream` is `TokenDataset.tokens()` (a TokenStream over the shards). `concatenated` is what that method
did before (np.concatenate of every shard, memory-mapped, in manifest order) and holds the whole split in every
worker: it is measured only on the smaller `--compare-tokens` dataset (0 skips it), never on the large one, where
it would need the dataset's size in RAM per worker. The temporary datasets are deleted at the end unless `--keep`.
Prints a markdown table and returns its rows from `main(argv)`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

VOCAB_SIZE = 32_000
EOS_ID = 0
LANGUAGE_SHARES = {"kk": 0.4, "ru": 0.3, "en": 0.3}
BLOCK = 1 << 22  # tokens generated and written per call (8 MiB of uint16)
VAL_TOKENS = 1 << 20  # per language


def shards_per_language(num_shards: int) -> dict[str, int]:
    """Train shards per language by LANGUAGE_SHARES, at least one each, summing to num_shards."""
    langs = list(LANGUAGE_SHARES)
    if num_shards < len(langs):
        raise ValueError(f"--shards {num_shards} is too few: one per language at least ({len(langs)})")
    counts = {lang: max(1, int(num_shards * LANGUAGE_SHARES[lang])) for lang in langs}
    counts[langs[0]] += num_shards - sum(counts.values())
    return counts


def write_synthetic_dataset(root: Path, num_tokens: int, num_shards: int, seed: int = 0) -> dict:
    """Write a dataset of `num_tokens` random train tokens in `num_shards` equal shards (the last ones take the
    remainder) plus VAL_TOKENS per language of val; returns its manifest."""
    import numpy as np

    from llm_core.shards import ShardWriter, build_manifest

    if num_tokens < num_shards:
        raise ValueError(f"--tokens {num_tokens} must be at least --shards {num_shards}")
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    per_lang = shards_per_language(num_shards)
    base, extra = divmod(num_tokens, num_shards)
    sizes = [base + (1 if i >= num_shards - extra else 0) for i in range(num_shards)]
    jobs = [("train", lang, i) for lang, n in per_lang.items() for i in range(n)]
    jobs_sizes = list(zip(jobs, sizes, strict=True)) + [(("val", lang, 0), VAL_TOKENS) for lang in per_lang]
    infos = []
    for (split, lang, index), size in jobs_sizes:
        with ShardWriter(
            root, split, lang, index, dtype="uint16", eos_id=EOS_ID, vocab_size=VOCAB_SIZE
        ) as writer:
            for start in range(0, size, BLOCK):
                block = rng.integers(1, VOCAB_SIZE, min(BLOCK, size - start), dtype=np.uint16)
                block[-1] = EOS_ID
                writer.add_tokens_with_eos(block, num_bytes=4 * block.size)
            infos.append(writer.close())
    manifest = build_manifest(
        name=f"synthetic-{num_tokens}",
        created=time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
        config={"synthetic": True, "tokens": num_tokens, "shards": num_shards, "seed": seed},
        config_sha256="0" * 64,
        input_sha256="0" * 64,
        tokenizer={"path": "synthetic", "sha256": "0" * 64, "vocab_size": VOCAB_SIZE, "eos_id": EOS_ID},
        languages=list(per_lang),
        shards=infos,
        mixture={"target": LANGUAGE_SHARES},
    )
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    return manifest


def evict_from_page_cache(root: Path) -> None:
    """Drop this dataset's files (only them) from the OS page cache, so that reads start cold."""
    if not hasattr(os, "posix_fadvise"):
        return
    for path in root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


# ---------------------------------------------------------------------------------- the worker process


def proc_status_kib(*keys: str) -> dict[str, int]:
    """Fields of /proc/self/status in KiB (Linux)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in keys:
                out[name] = int(value.split()[0])
    return out


def measure(dataset: str, reader: str, seq_len: int, batch_size: int, batches: int) -> dict:
    """In this (fresh) process: what a pretraining worker does with the dataset, timed, with its memory."""
    import gc

    import numpy as np
    import torch  # noqa: F401 - part of the baseline, as in a training worker

    from llm_core.data import RandomWindows
    from llm_core.shards import TokenDataset

    gc.collect()
    before = proc_status_kib("VmHWM", "VmRSS")
    start = time.perf_counter()
    ds = TokenDataset.open(dataset)
    if reader == "stream":
        tokens = ds.tokens("train")
    elif reader == "concatenated":  # TokenDataset.tokens() before the TokenStream
        tokens = np.concatenate(
            [np.memmap(ds.root / s["path"], dtype=ds.dtype, mode="r") for s in ds.shards("train")]
        )
    else:
        raise ValueError(f"reader {reader!r} must be 'stream' or 'concatenated'")
    sampler = RandomWindows(tokens, seq_len, batch_size, seed=0)
    [(x, _)] = sampler.next_step()
    first_s = time.perf_counter() - start
    assert x.shape == (batch_size, seq_len)
    start = time.perf_counter()
    for _ in range(batches):
        sampler.next_step()
    batches_s = time.perf_counter() - start
    after = proc_status_kib("VmHWM", "VmRSS", "RssAnon", "RssFile")
    return {
        "reader": reader,
        "tokens": ds.num_tokens("train"),
        "shards": len(ds.shards("train")),
        "first_batch_s": first_s,
        "batches": batches,
        "batches_s": batches_s,
        "baseline_rss_mib": before["VmRSS"] / 1024,
        "peak_rss_beyond_baseline_mib": (after["VmHWM"] - before["VmHWM"]) / 1024,
        "rss_anon_mib": after["RssAnon"] / 1024,
        "rss_file_mib": after["RssFile"] / 1024,
    }


def measure_in_fresh_process(dataset: Path, reader: str, args: argparse.Namespace) -> dict:
    evict_from_page_cache(dataset)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--measure", str(dataset), "--reader", reader]
    cmd += [
        "--seq-len",
        str(args.seq_len),
        "--batch-size",
        str(args.batch_size),
        "--batches",
        str(args.batches),
    ]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"the measuring process failed ({out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------- report


HEADER = (
    "| reader | train tokens | shards | open + first batch (cold) | {batches} batches | per batch | peak RSS beyond "
    "baseline | RssAnon / RssFile at end |\n|---|---:|---:|---:|---:|---:|---:|---:|"
)


def table_row(r: dict) -> str:
    return (
        f"| {r['reader']} | {r['tokens']:,} ({r['tokens'] * 2 / 2**30:.2f} GiB) | {r['shards']} "
        f"| {r['first_batch_s'] * 1000:.1f} ms | {r['batches_s']:.2f} s "
        f"| {r['batches_s'] / max(r['batches'], 1) * 1000:.2f} ms "
        f"| {r['peak_rss_beyond_baseline_mib']:.1f} MiB | {r['rss_anon_mib']:.0f} / {r['rss_file_mib']:.0f} MiB |"
    )


def parse_count(text: str) -> int:
    """An integer count, also written like 2e9."""
    value = float(text)
    if value != int(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 0")
    return int(value)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=parse_count, default=1 << 31, help="train tokens (default 2^31)")
    parser.add_argument("--shards", type=int, default=64, help="train shards")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=200, help="batches timed after the first")
    parser.add_argument(
        "--compare-tokens",
        type=parse_count,
        default=3 << 26,
        help="a smaller dataset on which both readers are measured (default 3 x 2^26 = 201M tokens; 0: skip)",
    )
    parser.add_argument("--dir", type=Path, help="where to write the datasets (default: a new temporary dir)")
    parser.add_argument("--keep", action="store_true", help="keep the datasets")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: the worker process
    parser.add_argument("--reader", default="stream", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.measure:
        print(json.dumps(measure(args.measure, args.reader, args.seq_len, args.batch_size, args.batches)))
        return []

    work = args.dir or Path(tempfile.mkdtemp(prefix="tulpar-datascale-sampler-"))
    rows: list[dict] = []
    try:
        plan = [(args.tokens, ["stream"])]
        if args.compare_tokens:
            plan.insert(0, (args.compare_tokens, ["stream", "concatenated"]))
        for num_tokens, readers in plan:
            root = work / f"synthetic-{num_tokens}"
            start = time.perf_counter()
            write_synthetic_dataset(root, num_tokens, args.shards)
            print(
                f"wrote {num_tokens:,} tokens in {args.shards} shards to {root} in "
                f"{time.perf_counter() - start:.1f} s",
                file=sys.stderr,
                flush=True,
            )
            for reader in readers:
                rows.append(measure_in_fresh_process(root, reader, args))
                print(table_row(rows[-1]), file=sys.stderr, flush=True)
            if not args.keep:
                shutil.rmtree(root)
    finally:
        if not args.keep and args.dir is None:
            shutil.rmtree(work, ignore_errors=True)

    print(
        f"seq_len {args.seq_len}, batch {args.batch_size}; baseline: a fresh Python with torch and llm_core imported "
        f"({rows[0]['baseline_rss_mib']:.0f} MiB RSS)"
    )
    print(HEADER.format(batches=args.batches))
    for r in rows:
        print(table_row(r))
    if args.tokens and args.compare_tokens and args.tokens > args.compare_tokens:
        print(
            f"| concatenated | {args.tokens:,} | {args.shards} | not run: it would hold "
            f"{args.tokens * 2 / 2**30:.1f} GiB of tokens in every worker | | | | |"
        )
    return rows


if __name__ == "__main__":
    main()
