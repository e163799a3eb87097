"""Corpus preprocessing: `python -m jobs.preprocess --config configs/preprocess/<name>.yaml [key=value ...]`.

Raw kk/ru/en text (txt/jsonl/parquet, gzip/zstd, local or s3://) becomes training-ready token shards plus a
report, as a chain of named Ray Data stages. It runs on a local Ray (started here when RAY_ADDRESS is unset)
or on a Ray cluster unchanged:

  pass 1 (streaming):  read -> normalize -> langid -> quality -> pii -> signature        (materialized)
  driver:              exact + MinHash-LSH near dedup over the whole corpus, tokenizer (given or trained)
  pass 2:              tokenize (kept documents, batched)                                  (materialized)
  driver:              mixture (copies per train document), shard plan
  pass 3:              place -> groupby(shard) -> write                         -> manifest.json, report.{md,json}

Output: `$TULPAR_STORAGE/datasets/<name>/` (or output.dir), written atomically: a killed run leaves the previous
dataset (or nothing), never a half-written manifest. Re-running with the same config content, inputs and
tokenizer reuses the existing output; anything else writes a new one. Format: llm_core/shards.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
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

from jobs.platform import tracking
from jobs.platform.cache import cache_key
from jobs.platform.raycluster import init_ray
from jobs.platform.results import DatasetOutputs, ResultError, parse_result
from jobs.platform.runtime import JobResult, Settings, main_entry
from jobs.prep import dedup, langid, plan, report, stages
from jobs.prep.config import PreprocessConfig
from jobs.prep.sources import FileEntry, discover, filesystem, input_sha256, is_uri, join_uri, plan_chunks
from jobs.reporting.plots import plot_documents_by_reason
from llm_core.config import config_to_dict
from llm_core.data import DataError
from llm_core.io import atomic_dir, atomic_write_text
from llm_core.shards import MANIFEST, build_manifest, dtype_name, validate_manifest
from llm_core.tokenizer import Tokenizer

log = logging.getLogger("tulpar.preprocess")

# Everything about a document the driver needs (no text): accounting, dedup, examples.
META_COLUMNS = [
    "doc_id",
    "file_id",
    "offset",
    "src_lang",
    "lang",
    "reason",
    "repaired",
    "detail",
    "n_bytes_in",
    "n_bytes",
    "n_chars",
    "n_fixes",
    "pii_email",
    "pii_phone",
    "pii_iban",
    "split",
    "exact_key",
    "snippet",
]


# ------------------------------------------------------------------------------------------------ Ray


def start_ray_data(cfg: PreprocessConfig, settings: Settings) -> None:
    """Join Ray (a local Ray limited to execution.local_num_cpus / object_store_mb, workers' output not
    forwarded), then set Ray Data's progress bars and CPU limit."""
    from ray.data import DataContext, ExecutionResources

    store = cfg.execution.object_store_mb * 1024 * 1024 if cfg.execution.object_store_mb else None
    init_ray(
        settings,
        forward_settings=False,
        log_to_driver=False,
        num_cpus=cfg.execution.local_num_cpus,
        object_store_memory=store,
    )
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


def _resolve(x: Any) -> Any:
    """ObjectRefs are passed wrapped in a list so Ray Data hands them over untouched; fetch them here."""
    import ray

    return ray.get(x[0]) if isinstance(x, list) and x and isinstance(x[0], ray.ObjectRef) else x


_TOKENIZERS: dict[str, Any] = {}


def read(chunks: pa.Table, files: dict[int, FileEntry], cfg: PreprocessConfig):
    yield from stages.read_docs(chunks, files, cfg, cfg.execution.batch_size)


def tokenize(
    t: pa.Table, tokenizer_json: list, sha: str, eos_id: int, drop_ids: list, batch_size: int
) -> pa.Table:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one CPU per task: no hidden thread pool
    tk = _TOKENIZERS.get(sha)
    if tk is None:
        from tokenizers import Tokenizer as HFTokenizer

        tk = _TOKENIZERS[sha] = HFTokenizer.from_str(_resolve(tokenizer_json))
    return stages.tokenize_docs(t, tk, eos_id, _resolve(drop_ids), batch_size)


def place(block: pa.Table, plan_arrays: tuple, n_shards: int) -> tuple[pa.Table, ...]:
    """Ray task `place`: the copies of one tokenized block's documents, split by destination shard."""
    ids, shard, pos = plan_arrays
    t = stages.place_docs(block, ids, shard, pos)
    t = t.take(pa.array(np.argsort(t.column("shard").to_numpy(), kind="stable")))
    bounds = np.searchsorted(t.column("shard").to_numpy(), np.arange(n_shards + 1))
    parts = tuple(t.slice(int(a), int(b - a)) for a, b in zip(bounds[:-1], bounds[1:]))
    return parts if n_shards > 1 else parts[0]


def write(root: str, specs: list, dtype: str, eos_id: int, vocab_size: int, *parts: pa.Table) -> dict:
    """Ray task `write`: one shard from its pieces (all blocks), in plan order; returns its manifest entry."""
    t = pa.concat_tables(parts)
    if not is_uri(root):
        return stages.write_shard_group(t, root, specs, dtype, eos_id, vocab_size).to_pylist()[0]
    with tempfile.TemporaryDirectory(prefix="tulpar-shard-") as tmp:  # write locally, then upload
        row = stages.write_shard_group(t, tmp, specs, dtype, eos_id, vocab_size).to_pylist()[0]
        for rel in (row["path"], row["docs_path"]):
            _upload(Path(tmp) / rel, join_uri(root, rel))
    return row


def write_shards(
    tok_ds,
    shard_plan: plan.ShardPlan,
    root: str,
    tok: Tokenizer,
    dtype: str,
    limit: int | None,
    progress: bool = True,
):
    """Pass 3 as a map/reduce of Ray tasks over the materialized token blocks: `place` splits every block by
    destination shard, `write` gathers one shard's pieces and writes it. (Ray Data's groupby does the same
    shuffle but costs 6-10 s of fixed overhead on a 2-core machine; here objects = blocks x shards.)"""
    import ray

    n = len(shard_plan.shards)
    plan_ref = ray.put((shard_plan.doc_id, shard_plan.shard, shard_plan.position))
    place_task = ray.remote(num_cpus=1)(place).options(num_returns=n, name="place")
    write_task = ray.remote(num_cpus=1)(write).options(name="write")
    blocks = tok_ds.to_arrow_refs()
    pieces = _bounded([lambda b=b: place_task.remote(b, plan_ref, n) for b in blocks], limit)
    pieces = [p if isinstance(p, list | tuple) else [p] for p in pieces]
    rows = _bounded(
        [
            lambda s=s: write_task.remote(
                root, shard_plan.shards, dtype, tok.eos_id, tok.vocab_size, *[p[s] for p in pieces]
            )
            for s in range(n)
        ],
        limit,
    )
    return _wait_all(rows, BlockProgress(n, "pass 3 write", "shard", enabled=progress))


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


def _wait_all(refs: list, progress: BlockProgress) -> list:
    """ray.get(refs), moving `progress` as each one finishes."""
    import ray

    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        progress.advance(len(done))
    progress.close()
    return ray.get(refs)


def _bounded(submits: list, limit: int | None) -> list:
    """Submit Ray tasks with at most `limit` unfinished at a time (None: all at once); returns their refs."""
    import ray

    out, pending = [], []
    for submit in submits:
        if limit is not None and len(pending) >= limit:
            _, pending = ray.wait(pending, num_returns=1)
        ref = submit()
        out.append(ref)
        first = ref[0] if isinstance(ref, list | tuple) else ref
        pending.append(first)
    return out


def _upload(local: Path, uri: str) -> None:
    fs, path = filesystem(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with open(local, "rb") as src, fs.open_output_stream(path) as dst:
        shutil.copyfileobj(src, dst, 1 << 22)


def select_rows(t: pa.Table, ids: list) -> pa.Table:
    wanted = _resolve(ids)
    doc_ids = t.column("doc_id").to_numpy()
    return t.filter(pa.array(np.isin(doc_ids, wanted))).select(["doc_id", "lang", "text"])


def _collect(ds, columns: list[str]) -> pa.Table:
    import ray

    tables = [t for t in ray.get(ds.select_columns(columns).to_arrow_refs()) if t.num_rows]
    if not tables:
        return pa.table({c: [] for c in columns})
    return pa.concat_tables(tables).sort_by("doc_id")


def run_pass1(cfg: PreprocessConfig, files: list[FileEntry], chunks: list) -> Any:
    """read -> normalize -> langid -> quality -> pii -> signature, materialized in the object store."""
    import ray

    kw = dict(batch_format="pyarrow", compute=_compute(cfg), zero_copy_batch=True)
    by_id = {f.file_id: f for f in files}
    ds = ray.data.from_items([asdict(c) for c in chunks], override_num_blocks=len(chunks))
    ds = ds.map_batches(read, batch_size=1, fn_kwargs={"files": by_id, "cfg": cfg}, **kw)
    for fn in (
        stages.normalize_docs,
        stages.langid_docs,
        stages.quality_docs,
        stages.pii_docs,
        stages.signature_docs,
    ):
        ds = ds.map_batches(fn, batch_size=cfg.execution.batch_size, fn_kwargs={"cfg": cfg}, **kw)
    return ds.materialize()


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


def _summary(meta: pd.DataFrame) -> str:
    parts = []
    for lang, d in meta.groupby("src_lang"):
        drops = d[d["reason"] != ""]["reason"].value_counts()
        why = ", ".join(f"{r} {n}" for r, n in drops.head(4).items())
        parts.append(f"{lang}: {len(d)} in, {int((d['reason'] == '').sum())} kept ({why or 'no drops'})")
    return "; ".join(parts) or "no documents were read"


def _not_enough(train_tokens: int, cfg: PreprocessConfig, meta: pd.DataFrame) -> DataError:
    return DataError(
        f"not enough tokens for one training batch: {train_tokens} train tokens remain after preprocessing, "
        f"output.min_train_tokens is {cfg.output.min_train_tokens}. Per source language: {_summary(meta)}. "
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


def deduplicate(meta_t: pa.Table, cfg: PreprocessConfig) -> tuple[pd.DataFrame, np.ndarray, dict[str, Any]]:
    """Driver stage `dedup`: (per-document metadata with dedup reasons, sorted ids to drop, summary)."""
    sigs = None
    if cfg.dedup.near and meta_t.num_rows:
        sigs = meta_t.column("signature").combine_chunks().values.to_numpy().reshape(-1, cfg.dedup.num_perm)
    meta = meta_t.drop_columns(["signature"] if cfg.dedup.near else []).to_pandas()
    meta["exact_key"] = meta["exact_key"].astype(np.uint64)
    res = dedup.find_duplicates(
        (meta["reason"] == "").to_numpy(),
        meta["exact_key"].to_numpy(np.uint64),
        sigs,
        threshold=cfg.dedup.threshold,
        exact=cfg.dedup.exact,
        near=cfg.dedup.near,
        progress=cfg.execution.progress_bars,
    )
    is_dup = res.reason != ""
    meta.loc[is_dup, "reason"] = res.reason[is_dup]
    ids = meta["doc_id"].to_numpy()
    meta["dup_of"] = np.where(res.duplicate_of >= 0, ids[np.maximum(res.duplicate_of, 0)], -1)
    info = {
        "exact_duplicates": int((res.reason == "exact_duplicate").sum()),
        "near_duplicates": int((res.reason == "near_duplicate").sum()),
        "lsh_bands": res.bands,
        "lsh_rows": res.rows,
        "lsh_candidates": res.candidates,
        "threshold": cfg.dedup.threshold,
    }
    log.info("dedup: %s", info)
    return meta, np.sort(ids[is_dup]), info


def run_pass2(mat, cfg: PreprocessConfig, tok: Tokenizer, drop_ids: np.ndarray):
    """Stage `tokenize` over the kept documents, materialized; plus (doc_id, lang, split, n_tokens)."""
    import ray

    tok_ds = mat.map_batches(
        tokenize,
        batch_format="pyarrow",
        batch_size=cfg.execution.batch_size,
        compute=_compute(cfg),
        fn_kwargs={
            "tokenizer_json": [ray.put(tok.tk.to_str())],
            "sha": tok.sha256,
            "eos_id": tok.eos_id,
            "drop_ids": [ray.put(drop_ids)],
            "batch_size": cfg.tokenizer.batch_size,
        },
    ).materialize()
    return tok_ds, _collect(tok_ds, ["doc_id", "lang", "split", "n_tokens"]).to_pandas()


def plan_layout(
    meta: pd.DataFrame, kept: pd.DataFrame, cfg: PreprocessConfig
) -> tuple[pd.DataFrame, plan.MixturePlan, plan.ShardPlan]:
    """Driver stages `mixture` and shard plan; marks left-out train documents `mixture_downsampled` and fails
    clearly when too few train tokens remain."""
    meta = meta.merge(kept[["doc_id", "n_tokens"]], on="doc_id", how="left")
    meta["n_tokens"] = meta["n_tokens"].fillna(0).astype(np.int64)
    train = kept[kept["split"] == "train"]
    if int(train["n_tokens"].sum()) < cfg.output.min_train_tokens:
        raise _not_enough(int(train["n_tokens"].sum()), cfg, meta)
    mix = plan.plan_mixture(
        train["doc_id"].to_numpy(),
        train["lang"].to_numpy(),
        train["n_tokens"].to_numpy(),
        cfg.languages,
        cfg.mixture,
    )
    copies = pd.Series(1, index=kept["doc_id"].to_numpy(), dtype=np.int64)
    copies.loc[train["doc_id"].to_numpy()] = mix.copies
    meta["copies"] = meta["doc_id"].map(copies).fillna(0).astype(np.int64)
    meta.loc[meta["doc_id"].isin(train["doc_id"][mix.copies == 0]), "reason"] = "mixture_downsampled"
    train_tokens = int((mix.copies * train["n_tokens"].to_numpy()).sum())
    if train_tokens < cfg.output.min_train_tokens:
        raise _not_enough(train_tokens, cfg, meta)
    shard_plan = plan.plan_shards(
        kept["doc_id"].to_numpy(),
        kept["split"].to_numpy(),
        kept["lang"].to_numpy(),
        kept["n_tokens"].to_numpy(),
        copies.loc[kept["doc_id"].to_numpy()].to_numpy(),
        cfg.languages,
        cfg.output.shard_max_tokens,
        cfg.mixture.seed,
    )
    return meta, mix, shard_plan


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

    tags = {"tulpar.dataset_name": cfg.name, "tulpar.input_sha256": ip.input_sha256}
    run_name = f"{cfg.name}-{ip.content_sha256[:8]}"
    with tracking.start_run(settings, "preprocess", cfg, run_name=run_name, tags=tags) as run:
        start_ray_data(cfg, settings)
        log.info(
            "pass 1: %d files in %d chunks -> read/normalize/langid/quality/pii/signature",
            len(ip.files),
            len(ip.chunks),
        )
        t0 = time.perf_counter()
        mat = run_pass1(cfg, ip.files, ip.chunks)
        meta_t = _collect(mat, META_COLUMNS + (["signature"] if cfg.dedup.near else []))
        t0 = lap("pass1_clean", t0)
        meta, drop_ids, dedup_info = deduplicate(meta_t, cfg)
        t0 = lap("dedup", t0)
        tok, tok_path = ip.tokenizer, ip.tokenizer_path
        log.info("pass 2: tokenize %d kept documents", int((meta["reason"] == "").sum()))
        tok_ds, kept = run_pass2(mat, cfg, tok, drop_ids)
        del mat
        t0 = lap("pass2_tokenize", t0)
        meta, mix, shard_plan = plan_layout(meta, kept, cfg)
        log.info("pass 3: write %d shards to %s", len(shard_plan.shards), out.location)
        with out.writing() as (root, write_file):
            dtype = dtype_name(tok.vocab_size)
            infos = write_shards(
                tok_ds,
                shard_plan,
                root,
                tok,
                dtype,
                cfg.execution.num_workers,
                progress=cfg.execution.progress_bars,
            )
            if len(infos) != len(shard_plan.shards):
                raise RuntimeError(f"wrote {len(infos)} shards, planned {len(shard_plan.shards)}")
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
                shards=[{k: v for k, v in r.items() if k != "shard"} for r in infos],
                mixture=mix.to_dict(cfg.languages),
            )
            lap("pass3_write", t0)
            timings["total"] = time.perf_counter() - t_start
            rep = report.build_report(
                name=cfg.name,
                files=ip.files,
                docs=meta,
                languages=cfg.languages,
                manifest=manifest,
                mixture=manifest["mixture"],
                dedup_info=dedup_info,
                timings=timings,
                examples_per_reason=cfg.output.examples_per_reason,
                example_chars=cfg.output.example_chars,
            )
            texts = {
                "report.json": json.dumps(rep, ensure_ascii=False, indent=2) + "\n",
                "report.md": report.report_markdown(rep),
                MANIFEST: json.dumps(manifest, ensure_ascii=False, indent=2) + "\n",
            }
            for name, text in texts.items():  # manifest.json last
                write_file(name, text)
        del tok_ds
        metrics, manifest_sha = log_to_mlflow(rep, manifest, texts, tok, timings)
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
    result = JobResult(
        "preprocess", outputs=outputs, metrics=metrics, mlflow_run_id=run_id, cache_key=preprocess_key(ip)
    )
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
