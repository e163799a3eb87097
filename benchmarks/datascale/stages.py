"""Where the per-document preprocessing time goes, against the tokenizer-alone floor (issue 15).

One process, one thread (tokenizers' and numpy's thread pools are pinned to 1 before they are imported). The
documents are read as `jobs.preprocess` reads them (the config's sources, `read_chunk`), up to `--mb` MB of
input, in batches of `execution.batch_size` rows. Then, all in this run:

- tokenizer alone: `tokenizers.Tokenizer.encode_batch` on the raw document texts (`tokenizer.batch_size` per
  call), with the config's tokenizer (default configs/preprocess/kk-ru-en.yaml: our 32k BPE);
- each stage of `jobs.prep.stages` on the previous stage's output, timed separately: normalize, langid,
  quality, pii, signature (words + exact key + shingles + MinHash), tokenize (kept documents);
- the whole chain normalize -> ... -> tokenize again, batch by batch as a Ray worker runs it.

MB/s are input MB (decompressed bytes read) per CPU second of this process (`time.process_time`, fairer than
wall time on a shared machine; wall seconds are printed too). The tokenizer-alone figure is measured before and
after the stages and the mean is used, so that load drifting during the run shows up as their spread.

    python -m benchmarks.datascale.stages                      # whole shared corpus (~24 MB)
    python -m benchmarks.datascale.stages --mb 5 --no-append   # a quick look
    python -m benchmarks.datascale.stages --langid-accuracy    # also language-ID accuracy on FLORES-200

Results are printed and appended as a dated section to docs/benchmarks.md unless --no-append.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from datetime import datetime  # noqa: E402
from pathlib import Path  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from benchmarks.machine import append_section, cpu_model  # noqa: E402
from jobs.platform.configfile import load_config  # noqa: E402
from jobs.platform.runtime import Settings  # noqa: E402
from jobs.prep import stages  # noqa: E402
from jobs.prep.blocks import clean_batch, tokenize_kept  # noqa: E402  (the pipeline's steps)
from jobs.prep.config import PreprocessConfig  # noqa: E402
from jobs.prep.encoding import DocEncoder  # noqa: E402
from jobs.prep.sources import discover, plan_chunks, read_chunk  # noqa: E402

STAGES = ("normalize", "langid", "quality", "pii", "signature")
STAGE_FUNCS = {
    "normalize": stages.normalize_docs,
    "langid": stages.langid_docs,
    "quality": stages.quality_docs,
    "pii": stages.pii_docs,
    "signature": stages.signature_docs,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="benchmarks.datascale.stages",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", default="configs/preprocess/kk-ru-en.yaml", help="preprocess config to read")
    p.add_argument("--override", action="append", default=[], help="config override key=value (repeatable)")
    p.add_argument(
        "--tokenizer", default=None, help="tokenizer dir or name; default: the config's tokenizer.path"
    )
    p.add_argument("--mb", type=float, default=50.0, help="read at most this many MB of input (default 50)")
    p.add_argument(
        "--langid-accuracy", action="store_true", help="also run benchmarks.datascale.langid_accuracy"
    )
    p.add_argument(
        "--flores-dir", action="append", default=[], help="with --langid-accuracy: FLORES *.devtest folders"
    )
    p.add_argument("--no-append", action="store_true", help="do not append to docs/benchmarks.md")
    return p.parse_args(argv)


@dataclass
class Timing:
    cpu: float = 0.0
    wall: float = 0.0

    def add(self, cpu: float, wall: float) -> None:
        self.cpu += cpu
        self.wall += wall


class clock:
    """Adds the CPU and wall seconds of a `with` block to a Timing."""

    def __init__(self, into: Timing):
        self.into = into

    def __enter__(self):
        self.c0, self.w0 = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.into.add(time.process_time() - self.c0, time.perf_counter() - self.w0)


def read_batches(cfg: PreprocessConfig, data_root: Path, max_bytes: int) -> tuple[list[pa.Table], int]:
    """Documents as `jobs.preprocess` reads them, in batches of execution.batch_size, up to max_bytes of input."""
    files = discover(cfg, data_root)
    by_id = {f.file_id: f for f in files}
    chunks = plan_chunks(files, int(cfg.read.chunk_mb * 1024 * 1024))
    docs, batches, total = [], [], 0
    for chunk in chunks:
        for doc in read_chunk(chunk, by_id[chunk.file_id], cfg.read):
            if total >= max_bytes:
                break
            docs.append(doc)
            total += doc.n_bytes_in
            if len(docs) == cfg.execution.batch_size:
                batches.append(stages.docs_table(docs, by_id))
                docs = []
    if docs:
        batches.append(stages.docs_table(docs, by_id))
    return batches, total


def tokenize_alone(tk, batches: list[pa.Table], batch_size: int) -> Timing:
    t = Timing()
    for b in batches:
        texts = b.column("text").to_pylist()
        with clock(t):
            for s in range(0, len(texts), batch_size):
                tk.encode_batch(texts[s : s + batch_size], add_special_tokens=False)
    return t


def run(args: argparse.Namespace) -> str:
    from jobs.preprocess import resolve_tokenizer_path
    from llm_core.tokenizer import Tokenizer

    settings = Settings.from_env()
    cfg = load_config(PreprocessConfig, args.config, args.override)
    tok_path = resolve_tokenizer_path(args.tokenizer or cfg.tokenizer.path, settings)
    tokenizer = Tokenizer.from_dir(tok_path)
    tk = tokenizer.tk
    enc = DocEncoder(tk, cfg.tokenizer.encoder)  # what the clean pass encodes kept documents with
    eos_id = tokenizer.eos_id

    batches, n_bytes = read_batches(cfg, settings.data, int(args.mb * 1e6))
    n_docs = sum(len(b) for b in batches)
    mb = n_bytes / 1e6
    print(
        f"{n_docs} documents, {mb:.2f} MB of input, {len(batches)} batches; tokenizer {tok_path}", flush=True
    )

    # warm-up (not timed): lazily built tables, language models, regexes
    warm = batches[0].slice(0, 64)
    for name in STAGES:
        warm = STAGE_FUNCS[name](warm, cfg)
    tokenize_kept(warm, enc, eos_id, cfg.tokenizer.batch_size)
    tk.encode_batch(["warm up"], add_special_tokens=False)

    load0 = os.getloadavg()[0]
    tok_before = tokenize_alone(tk, batches, cfg.tokenizer.batch_size)
    print(f"tokenizer alone: {mb / tok_before.cpu:.3f} MB/s", flush=True)

    per_stage = {name: Timing() for name in (*STAGES, "tokenize")}
    kept = 0
    for b in batches:
        for name in STAGES:
            with clock(per_stage[name]):
                b = STAGE_FUNCS[name](b, cfg)
        with clock(per_stage["tokenize"]):
            out = tokenize_kept(b, enc, eos_id, cfg.tokenizer.batch_size)
        kept += int((np.asarray(out.column("n_tokens")) > 0).sum())
    for name, t in per_stage.items():
        print(f"{name:<10} {mb / t.cpu:8.3f} MB/s", flush=True)

    chain = Timing()
    for b in batches:
        with clock(chain):
            clean_batch(b, cfg, enc, eos_id)  # what a worker runs per batch: the stages on one DocBatch
    tok_after = tokenize_alone(tk, batches, cfg.tokenizer.batch_size)
    fast_alone = Timing()
    if enc.fast is not None:
        for b in batches:
            texts = b.column("text").to_pylist()
            with clock(fast_alone):
                enc.fast.encode_batch(texts)
    load1 = os.getloadavg()[0]

    tok_cpu = (tok_before.cpu + tok_after.cpu) / 2
    tok_rate = mb / tok_cpu
    stage_sum = sum(t.cpu for t in per_stage.values())
    rows = [
        f"| tokenizer alone (encode_batch, all documents) | {tok_rate:.3f} | - | {tok_cpu:.1f} | "
        f"{(tok_before.wall + tok_after.wall) / 2:.1f} | 1.00 |"
    ]
    if enc.fast is not None:
        rows.append(
            f"| fast encoder alone (`tokenizer.encoder: fast`, same ids) | {mb / fast_alone.cpu:.3f} | - | "
            f"{fast_alone.cpu:.1f} | {fast_alone.wall:.1f} | {(mb / fast_alone.cpu) / tok_rate:.2f} |"
        )
    for name, t in per_stage.items():
        rows.append(
            f"| {name} | {mb / t.cpu:.3f} | {100 * t.cpu / stage_sum:.1f}% | {t.cpu:.1f} | {t.wall:.1f} | "
            f"{(mb / t.cpu) / tok_rate:.2f} |"
        )
    rows.append(
        f"| sum of the stages | {mb / stage_sum:.3f} | 100% | {stage_sum:.1f} | "
        f"{sum(t.wall for t in per_stage.values()):.1f} | {(mb / stage_sum) / tok_rate:.2f} |"
    )
    rows.append(
        f"| **chain, batch by batch** | **{mb / chain.cpu:.3f}** | - | {chain.cpu:.1f} | {chain.wall:.1f} | "
        f"**{(mb / chain.cpu) / tok_rate:.2f}** |"
    )
    cmd = "python -m benchmarks.datascale.stages " + shlex.join(
        sys.argv[1:] if args.argv is None else args.argv
    )
    lang = cfg.langid
    section = "\n".join(
        [
            f"\n## Per-document stages vs tokenizer alone ({datetime.now():%Y-%m-%d %H:%M})\n",
            f"- command: `{cmd.strip()}` (config `{args.config}`"
            + (f", overrides {args.override}" if args.override else "")
            + f"; {n_docs} documents, {mb:.2f} MB of input; {kept} kept)",
            f"- tokenizer: `{tok_path}` (vocab {tk.get_vocab_size()}), encode_batch of {cfg.tokenizer.batch_size}; "
            f"the tokenize stage uses the {enc.name} encoder (`tokenizer.encoder: {cfg.tokenizer.encoder}`); "
            "tokenizer alone is HF tokenizers",
            f"- language ID: method `{getattr(lang, 'method', 'lingua')}`, "
            f"candidates {lang.candidates}, max_chars {lang.max_chars}",
            f"- machine: {cpu_model()}, {os.cpu_count()} CPUs visible, Python {platform.python_version()}; "
            f"one process, one thread; load average {load0:.1f} before / {load1:.1f} after (shared machine)",
            f"- tokenizer alone before the stages {mb / tok_before.cpu:.3f} MB/s, after {mb / tok_after.cpu:.3f} "
            "MB/s (the mean is the reference)",
            "- MB/s = input MB per CPU second of this process; ratio = MB/s / tokenizer-alone MB/s\n",
            "| stage | MB/s | share of the stages' time | CPU s | wall s | ratio to tokenizer alone |",
            "|---|---:|---:|---:|---:|---:|",
            *rows,
            "",
        ]
    )
    print(section, flush=True)
    return section


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.argv = argv
    section = run(args)
    if args.langid_accuracy:
        from benchmarks.datascale import langid_accuracy

        acc_argv = [f"--flores-dir={d}" for d in args.flores_dir]
        acc_args = langid_accuracy.parse_args(acc_argv)
        acc_args.argv = acc_argv
        section += langid_accuracy.run(acc_args)
    if not args.no_append:
        print(f"appended to {append_section(section)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
