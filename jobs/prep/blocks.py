"""The block-level work of preprocessing, one input chunk at a time, committed to the run's work store.

`jobs.preprocess` runs each pass as Ray Data streaming execution over chunk descriptors; every function here
handles ONE block (chunk ordinal `o`, documents `o << 32 | index`), reads and writes only its own files, and
returns a small summary, so neither the driver nor a worker holds anything that grows with the corpus:

  clean/<o>.parquet     pass `clean`: read -> normalize -> langid -> quality -> pii -> signature -> tokenize.
                        One row per input record (dropped ones too, with their reason), tokens of kept ones,
                        the MinHash signature, a snippet for the report. The text itself is not kept.
  dedup/duplicates.parquet   `jobs.prep.neardup`: (doc_id, duplicate_of, reason) of every duplicate.
  (account)             per block: report counts before the mixture and the token histogram the mixture needs.
  dataset/shards/...    pass `write`: the block's kept documents (times their copies) as shards per
  dataset/documents/<o>.parquet   (split, language), and one decision row per input record;
  write/<o>.json        written last: the block's shard entries and report counts. Its presence = block done.

A re-run with the same config, inputs, tokenizer and code finds the committed files and skips those blocks; every
block's output depends only on its own input and on the run-wide decisions (duplicates, mixture rule), so a
resumed run writes byte-identical shards.
"""

from __future__ import annotations

import json
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs.prep import plan, stages
from jobs.prep.config import PreprocessConfig
from jobs.prep.sources import Chunk, FileEntry
from jobs.prep.store import Store
from llm_core.shards import SPLITS, ShardWriter

CLEAN = "clean/{:06d}.parquet"
DUPLICATES = "dedup/duplicates.parquet"
DEDUP_INFO = "dedup/info.json"  # written last: dedup done
WRITTEN = "write/{:06d}.json"
DATASET = "dataset"
DOCUMENTS = "documents/{:06d}.parquet"

# per-record columns the report and the later passes read from clean/<o>.parquet
META = [
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
    "n_fixes",
    "pii_email",
    "pii_phone",
    "pii_iban",
    "split",
    "n_tokens",
]
GROUP_KEYS = ["src_lang", "lang", "reason", "repaired", "file_id", "split"]
GROUP_SUMS = [
    "docs",
    "n_bytes_in",
    "n_bytes",
    "n_tokens",
    "tokens_written",
    "pii_email",
    "pii_phone",
    "pii_iban",
    "n_fixes",
]
EXAMPLE_COLUMNS = ["doc_id", "file_id", "offset", "src_lang", "reason", "detail", "snippet", "duplicate_of"]


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MB (a Ray worker process runs many blocks)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


FILE_RECORD = 0xFFFFFFFF  # index of the record jobs.prep.sources adds for a problem that ends a file


def block_range(ordinal: int) -> tuple[int, int]:
    return ordinal << 32, (ordinal + 1) << 32


# -------------------------------------------------------------------------------------------- clean pass


def tokenize_kept(
    t: pa.Table | stages.DocBatch, tk, eos_id: int, batch_size: int
) -> pa.Table | stages.DocBatch:
    """Tokens (ending with eos) of the rows without a drop reason; empty lists for the others. `tk` is a
    `jobs.prep.encoding.DocEncoder` (encode_batch: texts -> id lists). Adds columns n_tokens and tokens to a
    DocBatch (returned), or returns the new table."""
    if isinstance(t, pa.Table):
        return tokenize_kept(stages.DocBatch(t), tk, eos_id, batch_size).table()
    reasons = t.get("reason")
    todo = [i for i, r in enumerate(reasons) if not r]
    texts = t.get("text")
    lengths = np.zeros(len(reasons), dtype=np.int64)
    pieces: list[np.ndarray] = []
    eos = np.array([eos_id], dtype=np.uint32)
    for s in range(0, len(todo), batch_size):
        part = todo[s : s + batch_size]
        for i, ids in zip(part, tk.encode_batch([texts[i] for i in part])):
            pieces.append(np.asarray(ids, dtype=np.uint32))
            pieces.append(eos)
            lengths[i] = len(ids) + 1
    values = np.concatenate(pieces) if pieces else np.zeros(0, np.uint32)
    offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int64)
    t.set("n_tokens", pa.array(lengths))
    t.set("tokens", pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values)))
    return t


def clean_batch(t: pa.Table, cfg: PreprocessConfig, tk, eos_id: int) -> pa.Table:
    """The per-document stages and tokenization of one batch read (`stages.read_chunk_docs`), on one DocBatch:
    the table clean_chunk writes (without the text)."""
    b = stages.DocBatch(t)
    for fn in (
        stages.normalize_docs,
        stages.langid_docs,
        stages.quality_docs,
        stages.pii_docs,
        stages.signature_docs,
    ):
        fn(b, cfg)
    return tokenize_kept(b, tk, eos_id, cfg.tokenizer.batch_size).table(drop=("text",))


def clean_chunk(
    chunk: Chunk, files: dict[int, FileEntry], cfg: PreprocessConfig, tk, eos_id: int, store: Store
) -> dict[str, Any]:
    """Pass `clean` for one chunk, streamed `execution.batch_size` records at a time into clean/<o>.parquet."""
    rel = CLEAN.format(chunk.ordinal)
    t0 = time.perf_counter()
    if store.exists(rel):
        return {"ordinal": chunk.ordinal, "skipped": True, **_clean_summary(store, rel)}
    docs = records = bytes_in = 0
    with store.writing(rel) as tmp:
        writer = None
        for t in stages.read_chunk_docs(chunk, files, cfg, cfg.execution.batch_size):
            t = clean_batch(t, cfg, tk, eos_id)
            docs += t.num_rows
            records += int(
                pc.sum(pc.not_equal(pc.bit_wise_and(t.column("doc_id"), FILE_RECORD), FILE_RECORD)).as_py()
            )
            bytes_in += int(pc.sum(t.column("n_bytes_in")).as_py() or 0)
            if writer is None:
                writer = pq.ParquetWriter(tmp, t.schema, compression="zstd")
            writer.write_table(t)
        if writer is not None:
            writer.close()
        else:
            tmp.write_bytes(b"")  # a chunk without records: an empty marker
    return {
        "ordinal": chunk.ordinal,
        "skipped": False,
        "documents": docs,
        "records": records,
        "bytes_in": bytes_in,
        "seconds": time.perf_counter() - t0,
        "peak_rss_mb": peak_rss_mb(),
    }


def _clean_summary(store: Store, rel: str) -> dict[str, Any]:
    t = read_clean(store, 0, ["doc_id", "n_bytes_in"], rel=rel)
    index = pc.bit_wise_and(t.column("doc_id"), FILE_RECORD)
    return {
        "documents": t.num_rows,
        "records": int(pc.sum(pc.not_equal(index, FILE_RECORD)).as_py() or 0),
        "bytes_in": int(pc.sum(t.column("n_bytes_in")).as_py() or 0),
        "seconds": 0.0,
        "peak_rss_mb": peak_rss_mb(),
    }


def read_clean(store: Store, ordinal: int, columns: list[str], rel: str | None = None) -> pa.Table:
    """Columns of one block's clean file (an empty table for a chunk that had no records)."""
    rel = rel or CLEAN.format(ordinal)
    if store.size(rel) == 0:
        return pa.table({c: pa.array([], type=_EMPTY_TYPES.get(c, pa.string())) for c in columns})
    return store.read_table(rel, columns=columns)  # only these columns' pages are read


_EMPTY_TYPES = {
    "doc_id": pa.int64(),
    "file_id": pa.int32(),
    "offset": pa.int64(),
    "n_bytes_in": pa.int64(),
    "n_bytes": pa.int64(),
    "n_fixes": pa.int32(),
    "pii_email": pa.int32(),
    "pii_phone": pa.int32(),
    "pii_iban": pa.int32(),
    "n_tokens": pa.int64(),
    "exact_key": pa.uint64(),
    "tokens": pa.large_list(pa.uint32()),
}


# ------------------------------------------------------------------------------------------- decisions


def block_duplicates(store: Store, ordinal: int) -> pd.DataFrame:
    """(doc_id -> duplicate_of, reason) of the duplicates in one block (row-group pruned read)."""
    if not store.exists(DUPLICATES):
        return pd.DataFrame({"doc_id": [], "duplicate_of": [], "reason": []})
    lo, hi = block_range(ordinal)
    t = store.read_table(DUPLICATES, filters=[("doc_id", ">=", lo), ("doc_id", "<", hi)])
    return t.to_pandas()


def decided(store: Store, ordinal: int, columns: list[str]) -> pd.DataFrame:
    """A block's records with their reasons after dedup (`duplicate_of` = -1 when not a duplicate)."""
    meta = read_clean(store, ordinal, columns).to_pandas()
    meta["duplicate_of"] = np.int64(-1)
    dups = block_duplicates(store, ordinal)
    if len(dups):
        pos = meta["doc_id"].searchsorted(dups["doc_id"].to_numpy())
        meta.loc[meta.index[pos], "reason"] = dups["reason"].to_numpy()
        meta.loc[meta.index[pos], "duplicate_of"] = dups["duplicate_of"].to_numpy()
    return meta


def group_counts(d: pd.DataFrame) -> pd.DataFrame:
    """Report counts of some records, summed by GROUP_KEYS (the report never sees single documents)."""
    d = d.assign(docs=1)
    if "tokens_written" not in d:
        d["tokens_written"] = 0
    cols = {c: d[c].astype(np.int64) for c in GROUP_SUMS}
    g = pd.DataFrame({**{k: d[k] for k in GROUP_KEYS}, **cols})
    return g.groupby(GROUP_KEYS, as_index=False, sort=True).sum()


def merge_groups(frames: list[pd.DataFrame]) -> pd.DataFrame:
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame({**{k: [] for k in GROUP_KEYS}, **{c: [] for c in GROUP_SUMS}})
    return pd.concat(frames).groupby(GROUP_KEYS, as_index=False, sort=True).sum()


def account_block(ordinal: int, store: Store, languages: list[str], seed: int) -> dict[str, Any]:
    """Counts before the mixture (for error messages) and, per language, the train tokens kept and their
    order-key histogram (for the mixture's cut)."""
    d = decided(store, ordinal, META)
    kept = d[(d["reason"] == "") & (d["split"] == "train")]
    keys = plan.order_key(kept["doc_id"].to_numpy(np.int64), seed)
    hist = {}
    for lang in languages:
        m = (kept["lang"] == lang).to_numpy()
        hist[lang] = plan.token_histogram(keys[m], kept["n_tokens"].to_numpy(np.int64)[m])
    return {"ordinal": ordinal, "groups": group_counts(d), "histograms": hist, "peak_rss_mb": peak_rss_mb()}


def bucket_docs(ordinal: int, store: Store, wanted: dict[str, int], seed: int) -> dict[str, pd.DataFrame]:
    """The kept train documents (id, tokens) of each language that fall in that language's cut bucket."""
    d = decided(store, ordinal, ["doc_id", "lang", "reason", "split", "n_tokens"])
    kept = d[(d["reason"] == "") & (d["split"] == "train")]
    keys = plan.order_key(kept["doc_id"].to_numpy(np.int64), seed)
    buckets = plan.key_bucket(keys)
    out = {}
    for lang, b in wanted.items():
        m = (kept["lang"] == lang).to_numpy() & (buckets == b)
        out[lang] = pd.DataFrame(
            {
                "doc_id": kept["doc_id"].to_numpy()[m],
                "n_tokens": kept["n_tokens"].to_numpy()[m],
            }
        )
    return out


# ------------------------------------------------------------------------------------------- write pass


def shard_layout(
    ids: np.ndarray,
    splits: np.ndarray,
    langs: np.ndarray,
    ntok: np.ndarray,
    copies: np.ndarray,
    languages: list[str],
    shard_max_tokens: int,
    seed: int,
) -> list[tuple[str, str, int, np.ndarray]]:
    """One block's shards: (split, language, part, doc ids in write order), cut at shard_max_tokens."""
    sp = plan.plan_shards(ids, splits, langs, ntok, copies, languages, shard_max_tokens, seed)
    out = []
    part_of: dict[tuple[str, str], int] = {}
    for s, (split, lang, _) in enumerate(sp.shards):
        sel = np.flatnonzero(sp.shard == s)
        sel = sel[np.argsort(sp.position[sel])]
        part = part_of.get((split, lang), 0)
        part_of[(split, lang)] = part + 1
        out.append((split, lang, part, sp.doc_id[sel]))
    return out


def write_block(
    ordinal: int,
    store: Store,
    cfg: PreprocessConfig,
    rules: dict[str, dict] | None,
    records: dict[int, tuple[str, int]],
    dtype: str,
    eos_id: int,
    vocab_size: int,
) -> dict[str, Any]:
    """Pass `write` for one block: shards, per-record decisions, then write/<o>.json (the commit)."""
    done = WRITTEN.format(ordinal)
    if store.exists(done):
        return {"ordinal": ordinal, "skipped": True, **json.loads(store.read_bytes(done))}
    t0 = time.perf_counter()
    d = decided(store, ordinal, [*META, "snippet"])
    tok_t = read_clean(store, ordinal, ["doc_id", "tokens"])
    kept = (d["reason"] == "").to_numpy()
    ids = d["doc_id"].to_numpy(np.int64)
    copies = kept.astype(np.int64)
    train = kept & (d["split"] == "train").to_numpy()
    if rules is not None:
        keys = plan.order_key(ids, cfg.mixture.seed)
        for lang, r in rules.items():
            m = train & (d["lang"] == lang).to_numpy()
            copies[m] = plan.CopyRule(**r).copies(ids[m], keys[m])
    down = train & (copies == 0)
    d.loc[down, "reason"] = "mixture_downsampled"
    d["copies"] = copies
    d["tokens_written"] = copies * d["n_tokens"].to_numpy(np.int64)
    shards = []
    layout = shard_layout(
        ids[copies > 0],
        d["split"].to_numpy()[copies > 0],
        d["lang"].to_numpy()[copies > 0],
        d["n_tokens"].to_numpy(np.int64)[copies > 0],
        copies[copies > 0],
        cfg.languages,
        cfg.output.shard_max_tokens,
        cfg.mixture.seed,
    )
    tokens = tok_t.column("tokens").combine_chunks()
    values, offsets = tokens.values.to_numpy(), tokens.offsets.to_numpy()
    row_of = pd.Series(np.arange(len(ids)), index=ids)
    nbytes = d["n_bytes"].to_numpy(np.int64)
    with tempfile.TemporaryDirectory(prefix="tulpar-shards-") as tmp:
        for split, lang, part, doc_ids in layout:
            w = ShardWriter(
                tmp, split, lang, ordinal, part=part, dtype=dtype, eos_id=eos_id, vocab_size=vocab_size
            )
            with w:
                for r in row_of.loc[doc_ids].to_numpy():
                    w.add_tokens_with_eos(values[offsets[r] : offsets[r + 1]], int(nbytes[r]))
                info = w.close()
            for rel in (info.path, info.docs_path):
                store.upload(Path(tmp) / rel, f"{DATASET}/{rel}")
            shards.append(info.to_dict())
    store.write_table(f"{DATASET}/{DOCUMENTS.format(ordinal)}", documents_table(d, records))
    dropped = d[d["reason"] != ""]
    examples = dropped.groupby("reason", sort=False).head(cfg.output.examples_per_reason)
    summary = {
        "shards": sorted(shards, key=lambda s: (SPLITS.index(s["split"]), s["language"], s["path"])),
        "groups": group_counts(d).to_dict(orient="list"),
        "examples": examples.assign(file_id=examples["file_id"].astype(int))[EXAMPLE_COLUMNS].to_dict(
            orient="list"
        ),
    }
    store.write_bytes(done, json.dumps(summary, ensure_ascii=False).encode("utf-8"))
    return {
        "ordinal": ordinal,
        "skipped": False,
        "seconds": time.perf_counter() - t0,
        "peak_rss_mb": peak_rss_mb(),
        **summary,
    }


def documents_table(d: pd.DataFrame, records: dict[int, tuple[str, int]]) -> pa.Table:
    """One decision row per input record: where it came from (file, record index, byte offset), its final
    reason, which record it duplicates, its copies — the audit trail of `documents/*.parquet`."""

    def where(doc_ids: np.ndarray) -> tuple[list, list]:
        files, recs = [], []
        for x in doc_ids.tolist():
            if x < 0:
                files.append(None)
                recs.append(None)
                continue
            uri, base = records[x >> 32]
            files.append(uri)
            index = x & 0xFFFFFFFF  # 0xFFFFFFFF: the record that stands for a file's unread rest (no index)
            recs.append(None if index == FILE_RECORD else base + index)
        return files, recs

    file, record = where(d["doc_id"].to_numpy(np.int64))
    dup_file, dup_record = where(d["duplicate_of"].to_numpy(np.int64))
    return pa.table(
        {
            "doc_id": pa.array(d["doc_id"].to_numpy(np.int64)),
            "file": pa.array(file, pa.string()),
            "record": pa.array(record, pa.int64()),
            "offset": pa.array(d["offset"].to_numpy(np.int64)),
            "source_language": pa.array(d["src_lang"].tolist(), pa.string()),
            "language": pa.array(d["lang"].tolist(), pa.string()),
            "split": pa.array(d["split"].tolist(), pa.string()),
            "reason": pa.array(d["reason"].tolist(), pa.string()),
            "duplicate_of": pa.array(d["duplicate_of"].to_numpy(np.int64)),
            "duplicate_of_file": pa.array(dup_file, pa.string()),
            "duplicate_of_record": pa.array(dup_record, pa.int64()),
            "copies": pa.array(d["copies"].to_numpy(np.int64)),
            "n_bytes_in": pa.array(d["n_bytes_in"].to_numpy(np.int64)),
            "n_tokens": pa.array(d["n_tokens"].to_numpy(np.int64)),
        }
    )
