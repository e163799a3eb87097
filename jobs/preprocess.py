"""Corpus preprocessing: `python -m jobs.preprocess --config configs/preprocess/<name>.yaml [key=value ...]`.

Raw kk/ru/en text (txt/jsonl/parquet, gzip/zstd, local or s3://) becomes training-ready token shards plus a
report. Every pass is Ray Data streaming execution over blocks (one input chunk each, `read.chunk_mb`), on a
local Ray (started here when RAY_ADDRESS is unset) or on a Ray cluster unchanged; each block commits its output
to the run's work store (jobs/prep/blocks.py), so driver and worker memory do not grow with the corpus and a
killed run resumes where it stopped:

  clean     read -> normalize -> langid -> quality -> pii -> signature -> tokenize      clean/<block>.parquet
  dedup     exact keys + MinHash LSH bands -> hash-partitioned groupby -> verified
            edges -> connected components (jobs/prep/neardup.py)                       dedup/duplicates.parquet
  account   per-block counts and per-language token histograms -> the mixture's copy rule (driver: sums only)
  write     kept documents x copies -> shards per (split, language); one decision row
            per input record                                                 dataset/shards, dataset/documents
  publish   manifest.json (last), report.{md,json}; the dataset replaces the previous one in one step

Output: `$TULPAR_STORAGE/datasets/<name>/` (or output.dir); the work store sits beside it
(`.<name>.work-<key>`) until the run succeeds. Re-running with the same config content, inputs, tokenizer and
code reuses the finished dataset, or resumes the unfinished run; anything else is a new run. Format:
llm_core/shards.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs

from jobs.platform import tracking
from jobs.platform.cache import cache_key
from jobs.platform.raycluster import init_ray
from jobs.platform.results import DatasetOutputs, ResultError, parse_result
from jobs.platform.runtime import JobResult, Settings, main_entry
from jobs.prep import blocks, langid, neardup, plan, report
from jobs.prep.config import PreprocessConfig
from jobs.prep.encoding import DocEncoder
from jobs.prep.sources import (
    Chunk,
    FileEntry,
    discover,
    filesystem,
    input_sha256,
    is_uri,
    join_uri,
    plan_chunks,
)
from jobs.prep.store import Store
from jobs.reporting.plots import plot_documents_by_reason
from llm_core.config import config_to_dict
from llm_core.data import DataError
from llm_core.io import atomic_dir, atomic_write_text, replace_dir
from llm_core.shards import MANIFEST, build_manifest, dtype_name, validate_manifest
from llm_core.tokenizer import Tokenizer

log = logging.getLogger("tulpar.preprocess")

# ------------------------------------------------------------------------------------------------ Ray


def start_ray_data(cfg: PreprocessConfig, settings: Settings) -> None:
    """Join Ray (a local Ray limited to execution.local_num_cpus / object_store_mb, workers' output not
    forwarded), then set Ray Data's progress bars and CPU limit.

    On a cluster (RAY_ADDRESS) the workers get the driver's TULPAR_*/MLFLOW_*/AWS_* environment, as training's do:
    they read and write s3:// sources, work store and dataset with the driver's endpoint and credentials. A local
    Ray's workers inherit the driver's environment already, and keep the prestarted workers a runtime_env would
    replace."""
    from ray.data import DataContext, ExecutionResources

    store = cfg.execution.object_store_mb * 1024 * 1024 if cfg.execution.object_store_mb else None
    init_ray(
        settings,
        forward_settings=settings.ray_address is not None,
        log_to_driver=False,
        num_cpus=cfg.execution.local_num_cpus,
        object_store_memory=store,
    )
    # each pass is one Ray Data execution: its "Starting execution ..." INFO lines would repeat per pass; our
    # own progress line per pass says the same (Ray Data warnings still show)
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    ctx = DataContext.get_current()
    # passes 1-2: Ray Data's own progress (bars with ETA on a terminal, else a progress summary logged every
    # RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL seconds); pass 3's Ray tasks: BlockProgress
    ctx.enable_progress_bars = cfg.execution.progress_bars
    ctx.enable_operator_progress_bars = cfg.execution.progress_bars
    ctx.execution_options.resource_limits = ExecutionResources(cpu=cfg.execution.num_workers)
    ctx.execution_options.verbose_progress = False


def _compute(cfg: PreprocessConfig):
    from ray.data import TaskPoolStrategy

    return TaskPoolStrategy(size=cfg.execution.num_workers) if cfg.execution.num_workers else None


_TOKENIZERS: dict[tuple[str, str], Any] = {}


def _tokenizer(tokenizer_json: list, sha: str, encoder: str):
    """The worker process's document encoder (`jobs.prep.encoding.DocEncoder` over the tokenizer; the JSON comes as
    an ObjectRef wrapped in a list, so that Ray Data hands it over untouched)."""
    import ray

    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one CPU per task: no hidden thread pool
    tk = _TOKENIZERS.get((sha, encoder))
    if tk is None:
        from tokenizers import Tokenizer as HFTokenizer

        hf = HFTokenizer.from_str(ray.get(tokenizer_json[0]))
        tk = _TOKENIZERS[(sha, encoder)] = DocEncoder(hf, encoder)
    return tk


def _rows(ordinals) -> list[dict]:
    return [{"ordinal": int(o)} for o in ordinals]


def clean_task(
    batch: pa.Table, files: dict, cfg: PreprocessConfig, tokenizer: list, sha: str, eos: int, root: str
):
    """Ray Data map: pass `clean` of the chunks in the batch (one, with batch_size=1)."""
    out = []
    for row in batch.to_pylist():
        chunk = Chunk(row["ordinal"], row["file_id"], row["start"], row["end"])
        out.append(
            blocks.clean_chunk(
                chunk, files, cfg, _tokenizer(tokenizer, sha, cfg.tokenizer.encoder), eos, Store(root)
            )
        )
    return pa.table({"summary": [json.dumps(x) for x in out]})


def account_task(batch: pa.Table, root: str, languages: list[str], seed: int):
    out = []
    for o in batch.column("ordinal").to_pylist():
        a = blocks.account_block(o, Store(root), languages, seed)
        out.append(
            json.dumps(
                {
                    "groups": a["groups"].to_dict(orient="list"),
                    "histograms": {k: v.tolist() for k, v in a["histograms"].items()},
                    "peak_rss_mb": a["peak_rss_mb"],
                }
            )
        )
    return pa.table({"summary": out})


def bucket_task(batch: pa.Table, root: str, wanted: dict[str, int], seed: int):
    out = []
    for o in batch.column("ordinal").to_pylist():
        got = blocks.bucket_docs(o, Store(root), wanted, seed)
        out.append(json.dumps({k: {c: v[c].tolist() for c in v} for k, v in got.items()}))
    return pa.table({"summary": out})


def write_task(batch: pa.Table, root: str, cfg: PreprocessConfig, rules, records, dtype, eos, vocab):
    out = []
    for o in batch.column("ordinal").to_pylist():
        out.append(json.dumps(blocks.write_block(o, Store(root), cfg, rules, records, dtype, eos, vocab)))
    return pa.table({"summary": out})


WORKER_PEAK_RSS_MB: dict[str, float] = {}  # pass -> the largest peak RSS a block's worker process reported


def block_pass(items: list[dict], fn, kwargs: dict, cfg: PreprocessConfig, desc: str):
    """Ray Data streaming map of `fn` over block descriptors (one per task); yields each block's summary as it
    finishes, moving a progress line, and keeps the workers' peak RSS. Nothing is materialized."""
    import ray

    if not items:
        return
    progress = BlockProgress(len(items), desc, "block", enabled=cfg.execution.progress_bars)
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(fn, batch_size=1, batch_format="pyarrow", compute=_compute(cfg), fn_kwargs=kwargs)
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for text in batch.column("summary").to_pylist():
            progress.advance()
            summary = json.loads(text)
            peak = max(WORKER_PEAK_RSS_MB.get(desc, 0.0), summary.get("peak_rss_mb", 0.0))
            WORKER_PEAK_RSS_MB[desc] = round(peak, 1)
            yield summary
    progress.close()


class BlockProgress:
    """Progress over a known number of blocks or tasks: a tqdm bar with ETA on stderr when it is a terminal,
    else a plain log line (the same text: count, percentage, elapsed<remaining, rate) at most every
    `every_s` seconds and at the end, so that captured logs stay readable."""

    def __init__(
        self,
        total: int,
        desc: str,
        unit: str,
        *,
        enabled: bool = True,
        every_s: float = 10.0,
        clock=time.monotonic,
    ):
        from tqdm.auto import tqdm

        self.total, self.desc, self.unit, self.every_s, self.clock = total, desc, unit, every_s, clock
        self.n, self.t0 = 0, clock()
        self.last_line = self.t0
        self.enabled = enabled
        on_terminal = enabled and sys.stderr.isatty()
        self.bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr) if on_terminal else None

    def advance(self, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = self.clock()
        if self.enabled and (self.n >= self.total or now - self.last_line >= self.every_s):
            self.last_line = now
            log.info("%s", self.line(now))

    def line(self, now: float) -> str:
        from tqdm import tqdm

        return tqdm.format_meter(self.n, self.total, now - self.t0, prefix=self.desc, unit=self.unit, ncols=0)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ------------------------------------------------------------------------------------------ tokenizer


def resolve_tokenizer_path(raw: str, settings: Settings) -> Path:
    p = Path(raw).expanduser()
    tried = [p, settings.home / "tokenizers" / raw, settings.data / "tokenizers" / raw]
    for c in tried:
        if (c / "tokenizer.json").is_file() or (c.is_file() and c.suffix == ".json"):
            return c.resolve()
    raise ValueError(
        f"tokenizer.path {raw!r} not found (tried {', '.join(str(t) for t in tried)}): pass a directory with "
        "tokenizer.json (train one with `make tokenizer CONFIG=<name>`; a recipe passes the tokenizer stage's output)"
    )


# --------------------------------------------------------------------------------------------- output


class Output:
    """The dataset directory: a local path (written through an atomic temporary directory) or a URI (shards
    uploaded first, manifest last, after the old manifest is removed)."""

    def __init__(self, location: str):
        self.location = location
        self.remote = is_uri(location)

    def read_json(self, name: str) -> dict | None:
        try:
            if not self.remote:
                p = Path(self.location) / name
                return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else None
            fs, path = filesystem(join_uri(self.location, name))
            with fs.open_input_stream(path) as f:
                return json.loads(f.read().decode("utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            return None

    @contextlib.contextmanager
    def writing(self):
        """Yield (where shards go, function(name, text) to write a file); publish on success."""
        if not self.remote:
            with atomic_dir(self.location) as tmp:
                yield str(tmp), lambda name, text: atomic_write_text(tmp / name, text)
            return
        fs, path = filesystem(join_uri(self.location, MANIFEST))
        with contextlib.suppress(FileNotFoundError, OSError):
            fs.delete_file(path)
        pending: dict[str, str] = {}
        yield self.location, pending.__setitem__
        for name in sorted(pending, key=lambda n: n == MANIFEST):  # manifest.json last
            self.write_text(name, pending[name])

    def publish(self, work: Store, texts: dict[str, str]) -> None:
        """Make the work store's `dataset/` (shards, documents) plus `texts` the dataset, in one step locally
        (rename); on an object store the objects are copied, the old manifest removed first and the new one
        written last. The work store is removed afterwards."""
        if not self.remote:
            staged = work.local_path(blocks.DATASET)
            staged.mkdir(parents=True, exist_ok=True)
            for name, text in texts.items():  # manifest.json last
                atomic_write_text(staged / name, text)
            replace_dir(staged, Path(self.location))
            work.remove()
            return
        fs, base = filesystem(self.location)
        with contextlib.suppress(FileNotFoundError, OSError):
            fs.delete_file(f"{base}/{MANIFEST}")
        _, src_base = filesystem(work.uri(blocks.DATASET))  # the same object store as the output
        for info in fs.get_file_info(pafs.FileSelector(src_base, recursive=True)):
            if info.type == pafs.FileType.File:
                rel = info.path[len(src_base.rstrip("/")) + 1 :]
                fs.create_dir(f"{base}/{rel}".rsplit("/", 1)[0], recursive=True)
                fs.copy_file(info.path, f"{base}/{rel}")
        for name in sorted(texts, key=lambda n: n == MANIFEST):  # manifest.json last
            self.write_text(name, texts[name])
        work.remove()

    def write_text(self, name: str, text: str) -> None:
        if not self.remote:
            atomic_write_text(Path(self.location) / name, text)
            return
        fs, path = filesystem(join_uri(self.location, name))
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(path) as f:
            f.write(text.encode("utf-8"))


def output_location(cfg: PreprocessConfig, settings: Settings) -> str:
    if cfg.output.dir:
        return cfg.output.dir if is_uri(cfg.output.dir) else str(Path(cfg.output.dir).expanduser().resolve())
    return join_uri(settings.storage, f"datasets/{cfg.name}")


# ------------------------------------------------------------------------------------------------ main


def _summary(groups: pd.DataFrame) -> str:
    """Per source language: documents in, kept, and the main drop reasons (from aggregated counts)."""
    parts = []
    for lang, d in groups.groupby("src_lang"):
        drops = d[d["reason"] != ""].groupby("reason")["docs"].sum().sort_values(ascending=False)
        why = ", ".join(f"{r} {int(n)}" for r, n in drops.head(4).items())
        kept = int(d[d["reason"] == ""]["docs"].sum())
        parts.append(f"{lang}: {int(d['docs'].sum())} in, {kept} kept ({why or 'no drops'})")
    return "; ".join(parts) or "no documents were read"


def _not_enough(train_tokens: int, cfg: PreprocessConfig, groups: pd.DataFrame) -> DataError:
    return DataError(
        f"not enough tokens for one training batch: {train_tokens} train tokens remain after preprocessing, "
        f"output.min_train_tokens is {cfg.output.min_train_tokens}. Per source language: {_summary(groups)}. "
        "Add text, fix the sources, or relax the filters named above"
    )


@dataclass
class InputPlan:
    """What the driver knows before any Ray work: files, chunks and the three hashes of the cache key."""

    files: list[FileEntry]
    chunks: list
    tokenizer_path: Path
    tokenizer: Tokenizer
    content_sha256: str
    input_sha256: str


def plan_inputs(cfg: PreprocessConfig, settings: Settings) -> InputPlan:
    """Stage `plan`: expand and sniff the sources, cut chunks, hash config, inputs and the tokenizer."""
    if cfg.langid.enabled:
        langid.check_candidates(cfg.langid)
    data_root = settings.data
    if not any(is_uri(s.path) or os.path.isabs(s.path) for s in cfg.sources):
        data_root = settings.require_data()
    files = discover(cfg, data_root)
    for f in files:
        if f.status != "ok":
            log.warning("skipping %s: %s (%s)", f.uri, f.status, f.detail)
    tok_path = resolve_tokenizer_path(cfg.tokenizer.path, settings)
    tok = Tokenizer.from_dir(tok_path)
    # fails here, before any work, when tokenizer.encoder=fast cannot encode this tokenizer
    log.info("encoding documents with the %s encoder", DocEncoder(tok.tk, cfg.tokenizer.encoder).name)
    return InputPlan(
        files,
        plan_chunks(files, int(cfg.read.chunk_mb * 1024 * 1024)),
        tok_path,
        tok,
        cfg.content_sha256(),
        input_sha256(files, cfg.read.input_hash),
    )


def reuse_existing(cfg: PreprocessConfig, out: Output, ip: InputPlan) -> JobResult | None:
    """The stored result when the dataset dir already holds this config, these inputs and this tokenizer."""
    previous = out.read_json(MANIFEST)
    if not cfg.output.reuse or previous is None:
        return None
    same = (
        previous.get("config_sha256") == ip.content_sha256
        and previous.get("input_sha256") == ip.input_sha256
        and previous.get("tokenizer", {}).get("sha256") == ip.tokenizer.sha256
    )
    raw = out.read_json("result.json")
    if not (same and raw and raw.get("status") == "ok" and raw.get("cache_key") == preprocess_key(ip)):
        return None  # another config, input, tokenizer or code version: redo the work
    try:
        validate_manifest(previous, out.location)
        stored = parse_result("preprocess", raw)
    except (DataError, ResultError):
        return None
    log.info("reusing %s: same config, inputs, tokenizer and code", out.location)
    return JobResult(
        "preprocess",
        outputs=stored.outputs,
        metrics=stored.metrics,
        mlflow_run_id=stored.mlflow_run_id,
        cache_key=stored.cache_key,
        reused=True,
    )


def preprocess_key(ip: InputPlan) -> str:
    """The job's identity of a dataset: config, input files, tokenizer and code (jobs.platform.cache)."""
    return cache_key(
        "preprocess",
        {"config": ip.content_sha256, "inputs": ip.input_sha256, "tokenizer": ip.tokenizer.sha256},
    )


def work_location(location: str, key: str) -> str:
    """Where a run commits its blocks: beside the output, named by the run's cache key (config, inputs,
    tokenizer, code), so only an identical run resumes from it."""
    if is_uri(location):
        return f"{location.rstrip('/')}.work-{key[:16]}"
    p = Path(location)
    return str(p.parent / f".{p.name}.work-{key[:16]}")


def run_clean(cfg: PreprocessConfig, ip: InputPlan, work: Store) -> list[dict]:
    """Pass `clean` over every chunk; chunks committed by an earlier run are skipped."""
    import ray

    done = {int(n.split(".")[0]) for n in work.list("clean") if n.endswith(".parquet")}
    if done:
        log.info(
            "pass clean: %d of %d blocks were committed by an earlier run: skipped", len(done), len(ip.chunks)
        )
    kwargs = {
        "files": {f.file_id: f for f in ip.files},
        "cfg": cfg,
        "tokenizer": [ray.put(ip.tokenizer.tk.to_str())],
        "sha": ip.tokenizer.sha256,
        "eos": ip.tokenizer.eos_id,
        "root": work.root,
    }
    items = [asdict(c) for c in ip.chunks]
    out = list(block_pass(items, clean_task, kwargs, cfg, "pass clean"))
    return sorted(out, key=lambda x: x["ordinal"])


def run_dedup(cfg: PreprocessConfig, work: Store, summaries: list[dict]) -> dict[str, Any]:
    """Exact and near-duplicate removal as distributed stages (jobs.prep.neardup); skipped when committed."""
    import ray

    if work.exists(blocks.DEDUP_INFO):
        return json.loads(work.read_bytes(blocks.DEDUP_INFO))
    bands, rows = neardup.lsh_params(cfg.dedup)
    info: dict[str, Any] = {"threshold": cfg.dedup.threshold, "lsh_bands": bands, "lsh_rows": rows}
    if not (cfg.dedup.exact or cfg.dedup.near):
        work.write_table(blocks.DUPLICATES, neardup.empty_duplicates())
    else:
        docs = sum(x["documents"] for x in summaries)
        keys_per_doc = int(cfg.dedup.exact) + (bands if cfg.dedup.near else 0)
        workers = cfg.execution.num_workers or max(1, int(ray.available_resources().get("CPU", 1)))
        partitions = int(min(4096, max(workers, docs * keys_per_doc // 2_000_000)))
        ds = ray.data.from_items(
            _rows(x["ordinal"] for x in summaries), override_num_blocks=max(1, len(summaries))
        )
        ds = ds.map_batches(
            neardup.emit_keys,
            batch_size=1,
            batch_format="pyarrow",
            compute=_compute(cfg),
            fn_kwargs={
                "root": work.root,
                "cfg": cfg.dedup,
                "bands": bands,
                "rows": rows,
                "partitions": partitions,
            },
        )
        edges = ds.groupby("part", num_partitions=partitions).map_groups(
            neardup.bucket_edges, batch_format="pyarrow"
        )
        refs = edges.to_arrow_refs()
        task = ray.remote(num_cpus=1)(neardup.cluster).options(name="dedup cluster")
        info |= ray.get(task.remote(work.root, cfg.dedup, *refs))
        log.info("dedup: %d documents' keys shuffled into %d partitions", docs, partitions)
    work.write_bytes(blocks.DEDUP_INFO, json.dumps(info).encode())
    log.info("dedup: %s", info)
    return info


def plan_mixture(
    cfg: PreprocessConfig, work: Store, ordinals: list[int]
) -> tuple[pd.DataFrame, dict | None, dict]:
    """Stage `mixture` from per-block aggregates: (report counts before the mixture, copy rule per language or
    None, the manifest's mixture section). Fails clearly when too few train tokens remain."""
    langs = cfg.languages
    kwargs = {"root": work.root, "languages": langs, "seed": cfg.mixture.seed}
    frames, hist = [], {lang: np.zeros(1 << plan.HISTOGRAM_BITS, np.int64) for lang in langs}
    for a in block_pass(_rows(ordinals), account_task, kwargs, cfg, "pass account"):
        frames.append(pd.DataFrame(a["groups"]))
        if len(frames) >= 64:
            frames = [blocks.merge_groups(frames)]
        for lang in langs:
            hist[lang] += np.asarray(a["histograms"][lang], np.int64)
    groups = blocks.merge_groups(frames)
    available = {lang: int(hist[lang].sum()) for lang in langs}
    if sum(available.values()) < cfg.output.min_train_tokens:
        raise _not_enough(sum(available.values()), cfg, groups)
    if cfg.mixture.target is None:
        mix = plan.MixturePlan(
            np.zeros(0, np.int64),
            None,
            available,
            dict(available),
            dict(available),
            dict.fromkeys(langs, 1.0),
            sum(available.values()),
        )
        return groups, None, mix.to_dict(langs)
    planned, epochs, total = plan.mixture_targets(available, langs, cfg.mixture)
    cuts, wanted = {}, {}
    for lang in langs:
        full = int(math.floor(epochs[lang] + 1e-12))
        rest = planned[lang] - full * available[lang]
        cuts[lang] = (full, rest)
        if rest > 0:
            wanted[lang], _ = plan.cut_bucket(hist[lang], rest)
    found = {lang: [] for lang in wanted}
    if wanted:
        kwargs = {"root": work.root, "wanted": wanted, "seed": cfg.mixture.seed}
        for got in block_pass(_rows(ordinals), bucket_task, kwargs, cfg, "pass mixture cut"):
            for lang, cols in got.items():
                found[lang].append(pd.DataFrame(cols))
    rules, achieved = {}, {}
    for lang in langs:
        full, rest = cuts[lang]
        if lang not in wanted:
            rule = plan.CopyRule(full, 0, -1)
            achieved[lang] = full * available[lang]
        else:
            b = pd.concat(found[lang]) if found[lang] else pd.DataFrame({"doc_id": [], "n_tokens": []})
            ids = b["doc_id"].to_numpy(np.int64)
            keys = plan.order_key(ids, cfg.mixture.seed)  # not the JSON-carried keys: > 2**53 loses precision
            toks = b["n_tokens"].to_numpy(np.int64)
            before = plan.cut_bucket(hist[lang], rest)[1]
            rule = plan.copy_rule(full, rest, wanted[lang], before, ids, keys, toks)
            picked = rule.copies(ids, keys) - full
            achieved[lang] = full * available[lang] + before + int((picked * toks).sum())
        rules[lang] = asdict(rule)
    train_tokens = sum(achieved.values())
    if train_tokens < cfg.output.min_train_tokens:
        raise _not_enough(train_tokens, cfg, groups)
    mix = plan.MixturePlan(
        np.zeros(0, np.int64), dict(cfg.mixture.target), available, planned, achieved, epochs, total
    )
    return groups, rules, mix.to_dict(langs)


def record_bases(ip: InputPlan, summaries: list[dict]) -> dict[int, tuple[str, int]]:
    """Per chunk: (its file's uri, records of that file in earlier chunks) = where record indexes start (the
    record standing for a file problem is not one of the file's records)."""
    by_file = {f.file_id: f.uri for f in ip.files}
    seen: dict[int, int] = {}
    out = {}
    docs = {x["ordinal"]: x["records"] for x in summaries}
    for c in ip.chunks:
        base = seen.get(c.file_id, 0)
        out[c.ordinal] = (by_file[c.file_id], base)
        seen[c.file_id] = base + docs.get(c.ordinal, 0)
    return out


def run_write(
    cfg, ip: InputPlan, work: Store, rules, records
) -> tuple[list[dict], pd.DataFrame, pd.DataFrame, int]:
    """Pass `write`: shards and decisions per block; (shard entries, report counts, examples of dropped
    records, blocks an earlier run had committed)."""
    tok = ip.tokenizer
    kwargs = {
        "root": work.root,
        "cfg": cfg,
        "rules": rules,
        "records": records,
        "dtype": dtype_name(tok.vocab_size),
        "eos": tok.eos_id,
        "vocab": tok.vocab_size,
    }
    done = {int(n.split(".")[0]) for n in work.list("write") if n.endswith(".json")}
    if done:
        log.info(
            "pass write: %d of %d blocks were committed by an earlier run: skipped", len(done), len(ip.chunks)
        )
    shards, frames, examples, skipped = [], [], pd.DataFrame(columns=blocks.EXAMPLE_COLUMNS), 0
    for w in block_pass(_rows(c.ordinal for c in ip.chunks), write_task, kwargs, cfg, "pass write"):
        shards += w["shards"]
        skipped += int(w["skipped"])
        frames.append(pd.DataFrame(w["groups"]))
        if len(frames) >= 64:
            frames = [blocks.merge_groups(frames)]
        ex = (
            pd.concat([examples, pd.DataFrame(w["examples"])])
            if len(examples)
            else pd.DataFrame(w["examples"])
        )
        examples = ex.sort_values("doc_id").groupby("reason", sort=False).head(cfg.output.examples_per_reason)
    return shards, blocks.merge_groups(frames), examples, skipped


def report_examples(examples: pd.DataFrame, work: Store, ip: InputPlan, chars: int) -> dict[str, list[dict]]:
    """The report's examples of dropped text; a duplicate's example quotes the record it duplicates (read
    back from that record's clean block)."""
    where = {f.file_id: f.uri for f in ip.files}
    originals: dict[int, dict] = {}
    wanted = sorted({int(x) for x in examples.get("duplicate_of", []) if int(x) >= 0})
    for o in sorted({x >> 32 for x in wanted}):
        t = blocks.read_clean(work, o, ["doc_id", "file_id", "offset", "snippet"]).to_pandas()
        for r in t[t["doc_id"].isin(wanted)].itertuples():
            originals[int(r.doc_id)] = {
                "file": where.get(int(r.file_id), "?"),
                "offset": int(r.offset),
                "text": str(r.snippet)[:chars],
            }
    out: dict[str, list[dict]] = {}
    for r in examples.sort_values("doc_id").itertuples():
        ex = {
            "file": where.get(int(r.file_id), "?"),
            "offset": int(r.offset),
            "language": r.src_lang,
            "text": str(r.snippet)[:chars],
        }
        if r.detail:
            ex["detail"] = r.detail
        if int(r.duplicate_of) in originals:
            ex["duplicate_of"] = originals[int(r.duplicate_of)]
        out.setdefault(r.reason, []).append(ex)
    return dict(sorted(out.items(), key=lambda kv: report.REASON_ORDER[kv[0]]))


def log_to_mlflow(
    rep: dict, manifest: dict, texts: dict[str, str], tok: Tokenizer, timings: dict
) -> tuple[dict, str]:
    """Tags, metrics and artifacts of the active run; returns (metrics, manifest sha256)."""
    import mlflow

    manifest_sha = hashlib.sha256(texts[MANIFEST].encode("utf-8")).hexdigest()
    mlflow.set_tags({"tulpar.dataset_manifest_sha256": manifest_sha, "tulpar.tokenizer_sha256": tok.sha256})
    metrics = _metrics(rep, manifest, timings)
    tracking.log_metrics(metrics)
    for name, text in texts.items():
        tracking.log_text(text, f"report/{name}")
    with tempfile.TemporaryDirectory() as tmp:
        tracking.log_figure_file(
            plot_documents_by_reason(rep, report.present_reasons(rep), Path(tmp) / "documents_by_reason.png")
        )
    return metrics, manifest_sha


def main(cfg: PreprocessConfig, settings: Settings) -> JobResult:
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    WORKER_PEAK_RSS_MB.clear()
    out = Output(output_location(cfg, settings))
    ip = plan_inputs(cfg, settings)
    timings["plan"] = time.perf_counter() - t_start
    reused = None if settings.rerun else reuse_existing(cfg, out, ip)
    if reused is not None:
        return reused
    if not ip.chunks:
        raise DataError(
            f"not enough tokens for one training batch: none of the {len(ip.files)} input files is readable "
            f"({'; '.join(f'{f.uri}: {f.status}' for f in ip.files[:5])}): fix the source paths in the config"
        )

    def lap(name: str, t0: float) -> float:
        timings[name] = time.perf_counter() - t0
        return time.perf_counter()

    key = preprocess_key(ip)
    work = Store(work_location(out.location, key))
    tags = {"tulpar.dataset_name": cfg.name, "tulpar.input_sha256": ip.input_sha256}
    run_name = f"{cfg.name}-{ip.content_sha256[:8]}"
    with tracking.start_run(settings, "preprocess", cfg, run_name=run_name, tags=tags) as run:
        start_ray_data(cfg, settings)
        log.info("pass clean: %d files in %d blocks -> %s", len(ip.files), len(ip.chunks), work.root)
        t0 = time.perf_counter()
        summaries = run_clean(cfg, ip, work)
        resumed = {"clean": sum(x["skipped"] for x in summaries)}
        t0 = lap("clean", t0)
        dedup_info = run_dedup(cfg, work, summaries)
        if "cluster_peak_rss_mb" in dedup_info:
            WORKER_PEAK_RSS_MB["dedup cluster"] = dedup_info.pop("cluster_peak_rss_mb")
        t0 = lap("dedup", t0)
        ordinals = [x["ordinal"] for x in summaries]
        try:
            _, rules, mixture = plan_mixture(cfg, work, ordinals)
        except DataError:
            work.remove()  # a user error: nothing to resume; the fixed config is another run anyway
            raise
        t0 = lap("mixture", t0)
        shards, groups, examples, resumed["write"] = run_write(
            cfg, ip, work, rules, record_bases(ip, summaries)
        )
        lap("write", t0)
        tok, tok_path = ip.tokenizer, ip.tokenizer_path
        manifest = build_manifest(
            name=cfg.name,
            created=datetime.now(UTC).isoformat(timespec="seconds"),
            config=config_to_dict(cfg),
            config_sha256=ip.content_sha256,
            input_sha256=ip.input_sha256,
            tokenizer={
                "path": str(tok_path),
                "sha256": tok.sha256,
                "vocab_size": tok.vocab_size,
                "eos_id": tok.eos_id,
            },
            languages=cfg.languages,
            shards=shards,
            mixture=mixture,
        )
        timings["total"] = time.perf_counter() - t_start
        rep = report.build_report(
            name=cfg.name,
            files=ip.files,
            groups=groups,
            examples=report_examples(examples, work, ip, cfg.output.example_chars),
            languages=cfg.languages,
            manifest=manifest,
            mixture=manifest["mixture"],
            dedup_info=dedup_info,
            timings=timings,
        )
        rep["blocks"] = {"total": len(ip.chunks), "resumed": resumed}
        rep["memory"] = {
            "driver_peak_rss_mb": round(blocks.peak_rss_mb(), 1),
            "worker_peak_rss_mb": dict(WORKER_PEAK_RSS_MB),
        }
        texts = {
            "report.json": json.dumps(rep, ensure_ascii=False, indent=2) + "\n",
            "report.md": report.report_markdown(rep),
            MANIFEST: json.dumps(manifest, ensure_ascii=False, indent=2) + "\n",
        }
        out.publish(work, texts)
        metrics, manifest_sha = log_to_mlflow(rep, manifest, texts, tok, timings)
        metrics |= {f"blocks_resumed/{k}": v for k, v in resumed.items()}
        metrics["driver_peak_rss_mb"] = rep["memory"]["driver_peak_rss_mb"]
        metrics["worker_peak_rss_mb"] = max(WORKER_PEAK_RSS_MB.values(), default=0.0)
        run_id = run.info.run_id

    outputs = DatasetOutputs(
        dataset_dir=out.location,
        manifest=join_uri(out.location, MANIFEST),
        report=join_uri(out.location, "report.md"),
        tokenizer_dir=str(tok_path),
        tokenizer_sha256=tok.sha256,
        vocab_size=tok.vocab_size,
        manifest_sha256=manifest_sha,
    )
    result = JobResult("preprocess", outputs=outputs, metrics=metrics, mlflow_run_id=run_id, cache_key=key)
    if out.remote:  # run_job writes result.json only into local directories
        out.write_text("result.json", json.dumps(result.to_dict(), ensure_ascii=False, indent=2) + "\n")
    else:
        result.output_dir = Path(out.location)
    return result


def _metrics(rep: dict, manifest: dict, timings: dict[str, float]) -> dict[str, float]:
    m: dict[str, float] = {
        "documents_in": rep["totals"]["documents_in"],
        "documents_kept": rep["totals"]["documents_kept"],
        "files_skipped": rep["totals"]["files_skipped"],
        "mb_in": rep["totals"]["bytes_in"] / 1e6,
        "wall_s": timings.get("total", 0.0),
    }
    if timings.get("total"):
        m["mb_per_s"] = m["mb_in"] / timings["total"]
    for lang, e in rep["languages"].items():
        m[f"documents_in/{lang}"] = e["in"]["documents"]
        m[f"documents_kept/{lang}"] = e["kept"]["documents"]
        m[f"documents_dropped/{lang}"] = e["dropped_total"]["documents"]
    for split, per in manifest["counts"].items():
        for lang, c in per.items():
            m[f"tokens_{split}/{lang}"] = c["tokens"]
    for lang, share in manifest["mixture"]["achieved"].items():
        m[f"mixture_achieved/{lang}"] = share
    return m


if __name__ == "__main__":
    main_entry("preprocess", PreprocessConfig, main)
