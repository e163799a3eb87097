"""The preprocessing stages as functions on one batch of documents: a `DocBatch` (what `clean_chunk` chains them
on: columns stay Python lists between stages, one Arrow table at the end) or an Arrow table.

Each stage keeps every row: a document that fails a stage gets a `reason` and is skipped by the later stages,
so the driver can account for every input record. `jobs.prep.blocks.clean_chunk` chains them over one input
chunk, batch by batch; nothing here imports Ray.

Columns after `read_chunk_docs`: doc_id, file_id, offset, src_lang, lang, text, n_bytes_in, reason, repaired,
detail. Added by the stages: n_fixes (normalize); detected, confidence (langid); pii_email/phone/iban (pii);
split, n_bytes, n_chars, exact_key, signature, snippet (signature); `blocks.tokenize_kept` adds n_tokens, tokens.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

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


class DocBatch:
    """One batch of documents on its way through the stages: the Arrow table read, plus the columns the stages
    set since, kept as Python lists / numpy / Arrow arrays and turned into the table once, by `table()`. A chain
    of stages thus converts the text column to Python once, not once per stage and back again."""

    def __init__(self, table: pa.Table):
        self._table = table
        self._python: dict[str, list] = {}  # columns of the table read into Python
        self._new: dict[str, tuple[object, pa.DataType | None]] = {}  # set by stages, in first-set order

    def get(self, name: str) -> list:
        """The column as a Python list (a copy the caller may change)."""
        if name in self._new:
            values = self._new[name][0]
            if isinstance(values, pa.Array | pa.ChunkedArray | np.ndarray):
                return values.tolist() if isinstance(values, np.ndarray) else values.to_pylist()
            return list(values)
        if name not in self._python:
            self._python[name] = self._table.column(name).to_pylist()
        return list(self._python[name])

    def set(self, name: str, values, type_: pa.DataType | None = None) -> None:
        self._new[name] = (values, type_)

    def table(self, drop: tuple[str, ...] = ()) -> pa.Table:
        """The table with every column set so far (a new column goes after the existing ones, in the order it
        was first set), without the columns in `drop`."""
        t = self._table
        for name, (values, type_) in self._new.items():
            if name not in drop:
                t = _set(t, name, values, type_)
        return t.drop_columns([d for d in drop if d in t.column_names])


def batch_stage(fn: Callable[[DocBatch, PreprocessConfig], None]):
    """A stage written on a DocBatch, callable on an Arrow table too (it returns the new table then)."""

    @functools.wraps(fn)
    def run(t, cfg):
        if isinstance(t, DocBatch):
            fn(t, cfg)
            return t
        b = DocBatch(t)
        fn(b, cfg)
        return b.table()

    return run


def _todo(b: DocBatch) -> tuple[list[str], list[int]]:
    reasons = b.get("reason")
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


@batch_stage
def normalize_docs(t: DocBatch, cfg: PreprocessConfig) -> None:
    """Stage `normalize`: NFC, invisible characters, whitespace, look-alike letters; empty text is dropped."""
    texts = t.get("text")
    reasons, todo = _todo(t)
    fixes = [0] * len(texts)
    for i in todo:
        texts[i], fixes[i] = clean.normalize_text(texts[i], cfg.normalize)
        if not texts[i]:
            reasons[i] = "empty"
    t.set("text", texts, pa.large_string())
    t.set("reason", reasons, pa.string())
    t.set("n_fixes", fixes, pa.int32())


@batch_stage
def langid_docs(t: DocBatch, cfg: PreprocessConfig) -> None:
    """Stage `langid`: detect, check the script, route or drop documents in another language."""
    texts = t.get("text")
    langs = t.get("lang")
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
    t.set("lang", langs, pa.string())
    t.set("reason", reasons, pa.string())
    t.set("detected", detected, pa.string())
    t.set("confidence", confidence, pa.float32())


@batch_stage
def quality_docs(t: DocBatch, cfg: PreprocessConfig) -> None:
    """Stage `quality`: heuristic filters (thresholds in `quality`), boilerplate lines removed."""
    if not cfg.quality.enabled:
        return
    texts = t.get("text")
    reasons, todo = _todo(t)
    for i, verdict in zip(todo, clean.quality_verdicts([texts[i] for i in todo], cfg.quality)):
        texts[i], reasons[i] = verdict
    t.set("text", texts, pa.large_string())
    t.set("reason", reasons, pa.string())


@batch_stage
def pii_docs(t: DocBatch, cfg: PreprocessConfig) -> None:
    """Stage `pii`: e-mails, phone numbers and IBANs replaced by placeholders, counted."""
    texts = t.get("text")
    _, todo = _todo(t)
    counts = {k: [0] * len(texts) for k in ("email", "phone", "iban")}
    for i in todo:
        texts[i], c = clean.scrub_pii(texts[i], cfg.pii)
        for k, v in c.items():
            counts[k][i] = v
    t.set("text", texts, pa.large_string())
    for k, v in counts.items():
        t.set(f"pii_{k}", v, pa.int32())


_WORD_HASHES = dedup.WordHashes()
WORD_HASHES_MAX = 200_000  # words remembered per process (~30 MB); beyond that the cache starts again


def _word_hashes() -> dedup.WordHashes:
    """The process's word -> CRC-32 cache, shared by its batches (words repeat across batches far more than
    within one); emptied when it reaches WORD_HASHES_MAX words, so memory stays bounded."""
    if len(_WORD_HASHES) >= WORD_HASHES_MAX:
        _WORD_HASHES.clear()
    return _WORD_HASHES


@batch_stage
def signature_docs(t: DocBatch, cfg: PreprocessConfig) -> None:
    """Stage `signature`: split (by content hash), UTF-8 size, exact-duplicate key, MinHash signature and the
    shingle hashes themselves (dedup verifies candidate pairs by their true Jaccard similarity)."""
    texts = t.get("text")
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
    t.set("text", kept_text, pa.large_string())
    t.set("split", splits, pa.string())
    t.set("n_bytes", nbytes)
    t.set("n_chars", [len(x) if not r else 0 for x, r in zip(texts, reasons)], pa.int64())
    t.set("exact_key", keys)
    t.set("snippet", snippets, pa.string())
    if cfg.dedup.near:
        flat, counts = dedup.batch_shingle_hashes(words, cfg.dedup.ngram, _word_hashes())
        per_doc = np.zeros(n, dtype=np.int64)
        per_doc[todo] = counts
        sig = dedup.batch_minhash_signatures(flat, per_doc, cfg.dedup.num_perm, cfg.dedup.seed)
        t.set("signature", pa.FixedSizeListArray.from_arrays(pa.array(sig.ravel()), cfg.dedup.num_perm))
        offsets = pa.array(np.concatenate(([0], np.cumsum(per_doc))).astype(np.int64))  # rows in table order
        t.set("shingles", pa.LargeListArray.from_arrays(offsets, pa.array(flat, pa.uint32())))
