"""The preprocessing stages as functions on Arrow tables (one table = one batch of documents).

Each stage keeps every row: a document that fails a stage gets a `reason` and is skipped by the later stages,
so the driver can account for every input record. The Ray Data pipeline (`jobs.prep.pipeline`) chains these
with `map_batches`; nothing here imports Ray.

Columns after `read_docs`: doc_id, file_id, offset, src_lang, lang, text, n_bytes_in, reason, repaired, detail.
Added by the stages: n_fixes (normalize); detected, confidence (langid); pii_email/phone/iban (pii); split,
n_bytes, n_chars, exact_key, signature, snippet (signature). `tokenize_docs` turns kept rows into doc_id, lang, split,
n_bytes, n_tokens, tokens; `place_docs` and `write_shard_group` lay them out into shards.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from jobs.prep import clean, dedup, langid
from jobs.prep.config import PreprocessConfig
from jobs.prep.sources import Chunk, FileEntry, RawDoc, read_chunk
from llm_core.shards import ShardWriter
from llm_core.text import is_validation

SNIPPET_CHARS = 300


def _set(t: pa.Table, name: str, values, type_: pa.DataType | None = None) -> pa.Table:
    arr = values if isinstance(values, pa.Array | pa.ChunkedArray) else pa.array(values, type=type_)
    i = t.schema.get_field_index(name)
    return t.set_column(i, name, arr) if i >= 0 else t.append_column(name, arr)


def _todo(t: pa.Table) -> tuple[list[str], list[int]]:
    reasons = t.column("reason").to_pylist()
    return reasons, [i for i, r in enumerate(reasons) if not r]


# ---------------------------------------------------------------------------------------------- read


def docs_table(docs: list[RawDoc], files: dict[int, FileEntry]) -> pa.Table:
    langs = [files[d.file_id].language for d in docs]
    return pa.table(
        {
            "doc_id": pa.array([d.doc_id for d in docs], pa.int64()),
            "file_id": pa.array([d.file_id for d in docs], pa.int32()),
            "offset": pa.array([d.offset for d in docs], pa.int64()),
            "src_lang": pa.array(langs, pa.string()),
            "lang": pa.array(langs, pa.string()),
            "text": pa.array([d.text for d in docs], pa.large_string()),
            "n_bytes_in": pa.array([d.n_bytes_in for d in docs], pa.int64()),
            "reason": pa.array([d.reason for d in docs], pa.string()),
            "repaired": pa.array([d.repaired for d in docs], pa.string()),
            "detail": pa.array([d.detail[:200] for d in docs], pa.string()),
        }
    )


def read_docs(
    chunks: pa.Table, files: dict[int, FileEntry], cfg: PreprocessConfig, batch_size: int
) -> Iterator[pa.Table]:
    """Stage `read`: every record of the given chunks, `batch_size` rows per output table."""
    buf: list[RawDoc] = []
    for row in chunks.to_pylist():
        chunk = Chunk(row["ordinal"], row["file_id"], row["start"], row["end"])
        for doc in read_chunk(chunk, files[chunk.file_id], cfg.read):
            buf.append(doc)
            if len(buf) >= batch_size:
                yield docs_table(buf, files)
                buf = []
    if buf:
        yield docs_table(buf, files)


# ------------------------------------------------------------------------------------------ per-document


def normalize_docs(t: pa.Table, cfg: PreprocessConfig) -> pa.Table:
    """Stage `normalize`: NFC, invisible characters, whitespace, look-alike letters; empty text is dropped."""
    texts = t.column("text").to_pylist()
    reasons, todo = _todo(t)
    fixes = [0] * len(texts)
    for i in todo:
        texts[i], fixes[i] = clean.normalize_text(texts[i], cfg.normalize)
        if not texts[i]:
            reasons[i] = "empty"
    t = _set(t, "text", texts, pa.large_string())
    t = _set(t, "reason", reasons, pa.string())
    return _set(t, "n_fixes", fixes, pa.int32())


def langid_docs(t: pa.Table, cfg: PreprocessConfig) -> pa.Table:
    """Stage `langid`: detect, check the script, route or drop documents in another language."""
    texts = t.column("text").to_pylist()
    langs = t.column("lang").to_pylist()
    reasons, todo = _todo(t)
    detected = [""] * len(texts)
    confidence = [0.0] * len(texts)
    if cfg.langid.enabled:
        found = langid.detect_many([texts[i] for i in todo], cfg.langid)
        for i, (detected[i], confidence[i]) in zip(todo, found):
            langs[i], reasons[i] = langid.decide(
                langs[i], detected[i], confidence[i], texts[i], cfg.langid, cfg.languages
            )
    t = _set(t, "lang", langs, pa.string())
    t = _set(t, "reason", reasons, pa.string())
    t = _set(t, "detected", detected, pa.string())
    return _set(t, "confidence", confidence, pa.float32())


def quality_docs(t: pa.Table, cfg: PreprocessConfig) -> pa.Table:
    """Stage `quality`: heuristic filters (thresholds in `quality`), boilerplate lines removed."""
    if not cfg.quality.enabled:
        return t
    texts = t.column("text").to_pylist()
    reasons, todo = _todo(t)
    for i in todo:
        texts[i], reasons[i] = clean.quality_verdict(texts[i], cfg.quality)
    t = _set(t, "text", texts, pa.large_string())
    return _set(t, "reason", reasons, pa.string())


def pii_docs(t: pa.Table, cfg: PreprocessConfig) -> pa.Table:
    """Stage `pii`: e-mails, phone numbers and IBANs replaced by placeholders, counted."""
    texts = t.column("text").to_pylist()
    _, todo = _todo(t)
    counts = {k: [0] * len(texts) for k in ("email", "phone", "iban")}
    for i in todo:
        texts[i], c = clean.scrub_pii(texts[i], cfg.pii)
        for k, v in c.items():
            counts[k][i] = v
    t = _set(t, "text", texts, pa.large_string())
    for k, v in counts.items():
        t = _set(t, f"pii_{k}", v, pa.int32())
    return t


def signature_docs(t: pa.Table, cfg: PreprocessConfig) -> pa.Table:
    """Stage `signature`: split (by content hash), UTF-8 size, exact-duplicate key and MinHash signature."""
    texts = t.column("text").to_pylist()
    reasons, todo = _todo(t)
    n = len(texts)
    keys = np.zeros(n, dtype=np.uint64)
    nbytes = np.zeros(n, dtype=np.int64)
    splits = [""] * n
    words = [dedup.dedup_words(texts[i]) for i in todo]
    for i, w in zip(todo, words):
        keys[i] = dedup.exact_key(w)
        nbytes[i] = len(texts[i].encode("utf-8"))
        splits[i] = "val" if is_validation(texts[i], cfg.split.val_fraction) else "train"
    snippets = [(x or "")[:SNIPPET_CHARS] for x in texts]
    kept_text = [x if not r else "" for x, r in zip(texts, reasons)]
    t = _set(t, "text", kept_text, pa.large_string())
    t = _set(t, "split", splits, pa.string())
    t = _set(t, "n_bytes", nbytes)
    t = _set(t, "n_chars", [len(x) if not r else 0 for x, r in zip(texts, reasons)], pa.int64())
    t = _set(t, "exact_key", keys)
    t = _set(t, "snippet", snippets, pa.string())
    if cfg.dedup.near:
        flat, counts = dedup.batch_shingle_hashes(words, cfg.dedup.ngram, dedup.WordHashes())
        per_doc = np.zeros(n, dtype=np.int64)
        per_doc[todo] = counts
        sig = dedup.batch_minhash_signatures(flat, per_doc, cfg.dedup.num_perm, cfg.dedup.seed)
        t = _set(t, "signature", pa.FixedSizeListArray.from_arrays(pa.array(sig.ravel()), cfg.dedup.num_perm))
    return t


# ------------------------------------------------------------------------------------- tokens and shards


def tokenize_docs(t: pa.Table, tk, eos_id: int, drop_ids: np.ndarray, batch_size: int) -> pa.Table:
    """Stage `tokenize`: the kept documents (no reason, not in the sorted `drop_ids`) as token lists ending
    with eos. `tk` is a `tokenizers.Tokenizer`."""
    doc_ids = t.column("doc_id").to_numpy()
    reasons = np.asarray(t.column("reason").to_pylist(), dtype=object)
    keep = reasons == ""
    if len(drop_ids):
        pos = np.minimum(np.searchsorted(drop_ids, doc_ids), len(drop_ids) - 1)
        keep &= drop_ids[pos] != doc_ids
    t = t.filter(pa.array(keep))
    texts = t.column("text").to_pylist()
    pieces: list[np.ndarray] = []
    lengths = np.zeros(len(texts), dtype=np.int64)
    eos = np.array([eos_id], dtype=np.uint32)
    for s in range(0, len(texts), batch_size):
        for j, enc in enumerate(tk.encode_batch(texts[s : s + batch_size], add_special_tokens=False)):
            ids = np.asarray(enc.ids, dtype=np.uint32)
            pieces.append(ids)
            pieces.append(eos)
            lengths[s + j] = len(ids) + 1
    values = np.concatenate(pieces) if pieces else np.zeros(0, np.uint32)
    offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int64)
    tokens = pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values))
    return pa.table(
        {
            "doc_id": t.column("doc_id"),
            "lang": t.column("lang"),
            "split": t.column("split"),
            "n_bytes": t.column("n_bytes"),
            "n_tokens": pa.array(lengths),
            "tokens": tokens,
        }
    )


def place_docs(t: pa.Table, plan_ids: np.ndarray, plan_shard: np.ndarray, plan_pos: np.ndarray) -> pa.Table:
    """Stage `place`: one row per copy of each document in the shard plan (copies may be 0, 1 or more)."""
    doc_ids = t.column("doc_id").to_numpy()
    lo = np.searchsorted(plan_ids, doc_ids, side="left")
    hi = np.searchsorted(plan_ids, doc_ids, side="right")
    reps = hi - lo
    rows = np.repeat(np.arange(len(doc_ids)), reps)
    entries = (
        np.concatenate([np.arange(a, b) for a, b in zip(lo, hi)]) if len(rows) else np.zeros(0, np.int64)
    )
    sub = t.take(pa.array(rows, pa.int64()))
    return pa.table(
        {
            "shard": pa.array(plan_shard[entries], pa.int32()),
            "position": pa.array(plan_pos[entries], pa.int64()),
            "n_bytes": sub.column("n_bytes"),
            "tokens": sub.column("tokens"),
        }
    )


def write_shard_group(
    t: pa.Table, root: str, specs: list[tuple[str, str, int]], dtype: str, eos_id: int, vocab_size: int
) -> pa.Table:
    """Stage `write`: all rows of one shard, written in position order; returns its manifest entry."""
    t = t.sort_by("position")
    shard_ids = np.unique(t.column("shard").to_numpy())
    if len(shard_ids) != 1:
        raise RuntimeError(f"a shard group holds rows of shards {shard_ids.tolist()}")
    split, lang, index = specs[int(shard_ids[0])]
    tokens = t.column("tokens").combine_chunks()
    values = tokens.values.to_numpy()
    offsets = tokens.offsets.to_numpy()
    nbytes = t.column("n_bytes").to_numpy()
    w = ShardWriter(Path(root), split, lang, index, dtype=dtype, eos_id=eos_id, vocab_size=vocab_size)
    with w:
        for i in range(len(t)):
            w.add_tokens_with_eos(values[offsets[i] : offsets[i + 1]], int(nbytes[i]))
        info = w.close()
    return pa.table({k: [v] for k, v in info.to_dict().items()} | {"shard": [int(shard_ids[0])]})
