"""A straightforward single-process loop doing the same steps as the Ray pipeline, one document at a time.

It exists to check the pipeline (tests compare their shards byte for byte) and as the baseline of
benchmarks/preprocess.py. It uses the same per-document functions, but the textbook library calls where the
pipeline batches or vectorises: one `datasketch.MinHash` per document queried against and inserted into a
`datasketch.MinHashLSH` (the pipeline's bands and rows), candidates checked by true Jaccard similarity, one
`Tokenizer.encode` per document, shards written in the driver.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from jobs.prep import clean, dedup, langid, neardup, plan
from jobs.prep.blocks import shard_layout
from jobs.prep.config import PreprocessConfig
from jobs.prep.sources import discover, input_sha256, plan_chunks, read_chunk
from llm_core.config import config_to_dict
from llm_core.io import atomic_dir, atomic_write_json
from llm_core.shards import ShardWriter, build_manifest, dtype_name
from llm_core.text import is_validation
from llm_core.tokenizer import Tokenizer


@dataclass
class LoopResult:
    manifest: dict
    kept: dict[int, tuple[str, str, str]]  # doc_id -> (language, split, text) of documents past dedup
    copies: dict[int, int]  # doc_id -> copies written (0: left out by the mixture)
    reasons: dict[str, int]
    bytes_in: int
    documents_in: int
    timings: dict[str, float] = field(default_factory=dict)


def _identity(x):
    return x


def run_loop(
    cfg: PreprocessConfig,
    data_root: Path,
    tokenizer: Tokenizer,
    out_dir: Path,
    progress: Callable[[int], None] | None = None,
) -> LoopResult:
    from datasketch import MinHash, MinHashLSH

    t0 = time.perf_counter()
    files = discover(cfg, data_root)
    by_id = {f.file_id: f for f in files}
    chunks = plan_chunks(files, int(cfg.read.chunk_mb * 1024 * 1024))
    bands, rows = neardup.lsh_params(cfg.dedup)
    lsh = MinHashLSH(num_perm=cfg.dedup.num_perm, params=(bands, rows))
    shingle_sets: dict[int, np.ndarray] = {}
    seen_keys: set[int] = set()
    reasons: dict[str, int] = {}
    kept: dict[int, tuple[str, str, str]] = {}
    n_bytes: dict[int, int] = {}
    bytes_in = docs_in = 0

    def drop(reason: str) -> None:
        reasons[reason] = reasons.get(reason, 0) + 1

    for chunk in chunks:
        entry = by_id[chunk.file_id]
        for doc in read_chunk(chunk, entry, cfg.read):
            docs_in += 1
            bytes_in += doc.n_bytes_in
            if progress is not None:
                progress(doc.n_bytes_in)
            if doc.reason:
                drop(doc.reason)
                continue
            text, _ = clean.normalize_text(doc.text, cfg.normalize)
            if not text:
                drop("empty")
                continue
            lang = entry.language
            if cfg.langid.enabled:
                detected, conf = langid.detect(text, cfg.langid)
                lang, reason = langid.decide(lang, detected, conf, text, cfg.langid, cfg.languages)
                if reason:
                    drop(reason)
                    continue
            if cfg.quality.enabled:
                text, reason = clean.quality_verdict(text, cfg.quality)
                if reason:
                    drop(reason)
                    continue
            text, _ = clean.scrub_pii(text, cfg.pii)
            words = dedup.dedup_words(text)
            key = dedup.exact_key(words)
            if key:
                if cfg.dedup.exact and key in seen_keys:
                    drop("exact_duplicate")
                    continue
                seen_keys.add(key)
                if cfg.dedup.near:
                    m = MinHash(
                        cfg.dedup.num_perm, seed=cfg.dedup.seed, hashfunc=_identity, scheme="affine32"
                    )
                    shingles = dedup.shingle_hashes(words, cfg.dedup.ngram)
                    m.update_batch(shingles.tolist())
                    mine = np.unique(shingles)
                    dup = any(
                        neardup.jaccard(shingle_sets[k], mine) >= cfg.dedup.threshold for k in lsh.query(m)
                    )
                    if dup:
                        drop("near_duplicate")
                        continue
                    lsh.insert(doc.doc_id, m)
                    shingle_sets[doc.doc_id] = mine
            split = "val" if is_validation(text, cfg.split.val_fraction) else "train"
            kept[doc.doc_id] = (lang, split, text)
            n_bytes[doc.doc_id] = len(text.encode("utf-8"))
    t_clean = time.perf_counter()

    ids = np.array(sorted(kept), dtype=np.int64)
    tokens = {i: tokenizer.encode(kept[i][2]) + [tokenizer.eos_id] for i in ids.tolist()}
    t_tok = time.perf_counter()

    langs = np.array([kept[i][0] for i in ids.tolist()], dtype=object)
    splits = np.array([kept[i][1] for i in ids.tolist()], dtype=object)
    ntok = np.array([len(tokens[i]) for i in ids.tolist()], dtype=np.int64)
    train = splits == "train"
    mix = plan.plan_mixture(ids[train], langs[train], ntok[train], cfg.languages, cfg.mixture)
    copies = np.ones(len(ids), dtype=np.int64)
    copies[train] = mix.copies
    reasons["mixture_downsampled"] = int((copies == 0).sum())
    dtype = dtype_name(tokenizer.vocab_size)
    infos = []
    block = ids >> 32
    with atomic_dir(out_dir) as tmp:
        for o in np.unique(
            block
        ).tolist():  # the pipeline's layout: each block's shards per (split, language)
            m = (block == o) & (copies > 0)
            layout = shard_layout(
                ids[m],
                splits[m],
                langs[m],
                ntok[m],
                copies[m],
                cfg.languages,
                cfg.output.shard_max_tokens,
                cfg.mixture.seed,
            )
            for split, lang, part, doc_ids in layout:
                with ShardWriter(tmp, split, lang, o, part=part, dtype=dtype, eos_id=tokenizer.eos_id) as w:
                    for doc_id in doc_ids.tolist():
                        w.add_tokens_with_eos(np.asarray(tokens[doc_id], dtype=np.uint32), n_bytes[doc_id])
                    infos.append(w.close())
        manifest = build_manifest(
            name=cfg.name,
            created=datetime.now(UTC).isoformat(timespec="seconds"),
            config=config_to_dict(cfg),
            config_sha256=cfg.content_sha256(),
            input_sha256=input_sha256(files, cfg.read.input_hash),
            tokenizer={
                "path": "",
                "sha256": tokenizer.sha256,
                "vocab_size": tokenizer.vocab_size,
                "eos_id": tokenizer.eos_id,
            },
            languages=cfg.languages,
            shards=infos,
            mixture=mix.to_dict(cfg.languages),
        )
        atomic_write_json(tmp / "manifest.json", manifest)
    t_end = time.perf_counter()
    timings = {
        "clean_dedup": t_clean - t0,
        "tokenize": t_tok - t_clean,
        "write": t_end - t_tok,
        "total": t_end - t0,
    }
    return LoopResult(
        manifest, kept, dict(zip(ids.tolist(), copies.tolist())), reasons, bytes_in, docs_in, timings
    )
