"""The preprocessing stages as functions on Arrow tables (one table = one batch of documents).

Each stage keeps every row: a document that fails a stage gets a `reason` and is skipped by the later stages,
so the driver can account for every input record. `jobs.prep.blocks.clean_chunk` chains them over one input
chunk, batch by batch; nothing here imports Ray.

Columns after `read_chunk_docs`: doc_id, file_id, offset, src_lang, lang, text, n_bytes_in, reason, repaired,
detail. Added by the stages: n_fixes (normalize); detected, confidence (langid); pii_email/phone/iban (pii);
split, n_bytes, n_chars, exact_key, signature, snippet (signature); `blocks.tokenize_kept` adds n_tokens, tokens.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa

from jobs.prep import clean, dedup, langid
from jobs.prep.charstats import batch_counts
from jobs.prep.config import PreprocessConfig
from jobs.prep.sources import Chunk, FileEntry, RawDoc, read_chunk
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


def read_chunk_docs(
    chunk: Chunk, files: dict[int, FileEntry], cfg: PreprocessConfig, batch_size: int
) -> Iterator[pa.Table]:
    """Stage `read` for one chunk: its records, `batch_size` rows per table (none for an empty chunk)."""
    buf: list[RawDoc] = []
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
    changed = False
    for i in todo:
        new, fixes[i] = clean.normalize_text(texts[i], cfg.normalize)
        changed |= new != texts[i]
        texts[i] = new
        if not new:
            reasons[i] = "empty"
    if changed:
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
        docs = [texts[i] for i in todo]
        # letters and scripts of the whole batch at once
        counts = batch_counts(docs, head=2 * cfg.langid.max_chars, words=False)
        found = langid.detect_many(docs, cfg.langid, head_letters=counts.head_letters)
        for j, (i, (detected[i], confidence[i])) in enumerate(zip(todo, found)):
            langs[i], reasons[i] = langid.decide(
                langs[i],
                detected[i],
                confidence[i],
                texts[i],
                cfg.langid,
                cfg.languages,
                counts.script_shares(j),
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
    changed = False
    for i, (new, reason) in zip(todo, clean.quality_verdicts([texts[i] for i in todo], cfg.quality)):
        changed |= new != texts[i]
        texts[i], reasons[i] = new, reason
    if changed:  # boilerplate lines removed somewhere
        t = _set(t, "text", texts, pa.large_string())
    return _set(t, "reason", reasons, pa.string())


def pii_docs(t: pa.Table, cfg: PreprocessConfig) -> pa.Table:
    """Stage `pii`: e-mails, phone numbers and IBANs replaced by placeholders, counted."""
    texts = t.column("text").to_pylist()
    _, todo = _todo(t)
    counts = {k: [0] * len(texts) for k in ("email", "phone", "iban")}
    changed = False
    for i in todo:
        texts[i], c = clean.scrub_pii(texts[i], cfg.pii)
        for k, v in c.items():
            counts[k][i] = v
            changed |= v > 0
    if changed:  # something was replaced
        t = _set(t, "text", texts, pa.large_string())
    for k, v in counts.items():
        t = _set(t, f"pii_{k}", v, pa.int32())
    return t


_WORD_HASHES = dedup.WordHashes()
WORD_HASHES_MAX = 200_000  # words remembered per process (~30 MB); beyond that the cache starts again


def _word_hashes() -> dedup.WordHashes:
    """The process's word -> CRC-32 cache, shared by its batches (words repeat across batches far more than
    within one); emptied when it reaches WORD_HASHES_MAX words, so memory stays bounded."""
    if len(_WORD_HASHES) >= WORD_HASHES_MAX:
        _WORD_HASHES.clear()
    return _WORD_HASHES


def signature_docs(t: pa.Table, cfg: PreprocessConfig) -> pa.Table:
    """Stage `signature`: split (by content hash), UTF-8 size, exact-duplicate key, MinHash signature and the
    shingle hashes themselves (dedup verifies candidate pairs by their true Jaccard similarity)."""
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
        flat, counts = dedup.batch_shingle_hashes(words, cfg.dedup.ngram, _word_hashes())
        per_doc = np.zeros(n, dtype=np.int64)
        per_doc[todo] = counts
        sig = dedup.batch_minhash_signatures(flat, per_doc, cfg.dedup.num_perm, cfg.dedup.seed)
        t = _set(t, "signature", pa.FixedSizeListArray.from_arrays(pa.array(sig.ravel()), cfg.dedup.num_perm))
        offsets = pa.array(np.concatenate(([0], np.cumsum(per_doc))).astype(np.int64))  # rows in table order
        t = _set(t, "shingles", pa.LargeListArray.from_arrays(offsets, pa.array(flat, pa.uint32())))
    return t
