"""Exact and near-duplicate detection over the whole corpus.

Per document (in the workers, vectorised over a batch):
- `dedup_words`: the case-folded word sequence (punctuation and spacing ignored);
- `exact_key`: a 64-bit hash of those words: equal keys = exact duplicates;
- `shingle_hashes`: 32-bit hashes of word n-grams (a shorter document is one shingle);
- `minhash_signatures`: datasketch-compatible MinHash signatures of many documents at once. They equal
  `datasketch.MinHash(num_perm, seed, hashfunc=identity).update_batch(shingle_hashes)` (the "affine32" scheme:
  MurmurHash3's fmix32, then h -> a*h + b mod 2^32, then the minimum), computed as one numpy pass per batch
  instead of one per document. tests/test_prep_units.py checks the equality.

Over the corpus, `jobs.prep.neardup` runs exact and LSH dedup as distributed stages (bands and rows chosen by
datasketch for the Jaccard threshold: `lsh_params`).
"""

from __future__ import annotations

import hashlib
import re
import zlib
from dataclasses import dataclass
from functools import lru_cache
from itertools import chain

import numpy as np

_WORDS = re.compile(r"\w+")
_M32 = np.uint32(0xFFFFFFFF)
_EMPTY_KEY = 0


def dedup_words(text: str) -> list[str]:
    return _WORDS.findall(text.casefold())


def exact_key(words: list[str]) -> int:
    """64-bit key of the word sequence (0 is reserved for "no words")."""
    if not words:
        return _EMPTY_KEY
    digest = hashlib.blake2b(" ".join(words).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") or 1


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finaliser (an avalanching bijection), element-wise on uint32."""
    h = h.astype(np.uint32, copy=True)
    h ^= h >> np.uint32(16)
    h *= np.uint32(0x85EBCA6B)
    h ^= h >> np.uint32(13)
    h *= np.uint32(0xC2B2AE35)
    h ^= h >> np.uint32(16)
    return h


_MULT = np.array([0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D, 0x27D4EB2F, 0x165667B1] * 4, dtype=np.uint32)


class WordHashes(dict):
    """word -> CRC-32 of its UTF-8 bytes, computed on first lookup; shared by the documents of a batch."""

    def __missing__(self, word: str) -> int:
        h = self[word] = zlib.crc32(word.encode("utf-8"))
        return h


def shingle_hashes(words: list[str], n: int, cache: WordHashes | None = None) -> np.ndarray:
    """uint32 hashes of the word n-grams of one document (one shingle of all words when fewer than n)."""
    flat, _ = batch_shingle_hashes([words], n, cache)
    return flat


def batch_shingle_hashes(
    word_lists: list[list[str]], n: int, cache: WordHashes | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(all shingle hashes, one document after the other; shingles per document): `shingle_hashes` of every
    document, computed as a few numpy passes over the whole batch instead of a loop per document."""
    if not 1 <= n <= len(_MULT):
        raise ValueError(f"dedup.ngram {n} must be between 1 and {len(_MULT)}")
    get = (cache if cache is not None else WordHashes()).__getitem__
    n_words = np.fromiter(map(len, word_lists), dtype=np.int64, count=len(word_lists))
    all_words = list(chain.from_iterable(word_lists))
    wh = _fmix32(np.fromiter(map(get, all_words), dtype=np.uint32, count=len(all_words)))
    k = np.minimum(n_words, n)  # words per shingle: n, or all of a shorter document's
    per_doc = np.where(n_words > 0, n_words - k + 1, 0)
    total = int(per_doc.sum())
    if not total:
        return np.zeros(0, dtype=np.uint32), per_doc
    word_start = np.cumsum(n_words) - n_words
    shingle_start = np.cumsum(per_doc) - per_doc
    first = np.repeat(word_start - shingle_start, per_doc) + np.arange(total)  # first word of each shingle
    k_of = np.repeat(k, per_doc).astype(np.uint32)
    short = bool((k_of < n).any())
    last = len(wh) - 1
    acc = np.zeros(total, dtype=np.uint32)
    for i in range(n):  # position-dependent multipliers: "a b" and "b a" differ
        step = acc + wh[np.minimum(first + i, last)] * _MULT[i]
        step = (step << np.uint32(5)) | (step >> np.uint32(27))
        acc = np.where(k_of > i, step, acc) if short else step
    return _fmix32(acc ^ k_of), per_doc


@lru_cache(maxsize=8)
def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """datasketch's (a, b) permutation parameters for the affine32 scheme."""
    from datasketch import MinHash

    a, b = MinHash(num_perm=num_perm, seed=seed, scheme="affine32").permutations
    return np.asarray(a, dtype=np.uint32), np.asarray(b, dtype=np.uint32)


def minhash_signatures(
    shingles: list[np.ndarray], num_perm: int, seed: int, chunk: int = 16384
) -> np.ndarray:
    """(len(shingles), num_perm) uint32 signatures; a document without shingles gets all 0xFFFFFFFF."""
    lengths = np.fromiter(map(len, shingles), dtype=np.int64, count=len(shingles))
    flat = np.concatenate(shingles) if len(shingles) else np.zeros(0, np.uint32)
    return batch_minhash_signatures(flat.astype(np.uint32, copy=False), lengths, num_perm, seed, chunk)


def batch_minhash_signatures(
    flat: np.ndarray, lengths: np.ndarray, num_perm: int, seed: int, chunk: int = 16384
) -> np.ndarray:
    """`minhash_signatures` of documents given as one array of shingle hashes and the count per document (what
    `batch_shingle_hashes` returns), about `chunk` shingles x num_perm at a time."""
    a, b = permutations(num_perm, seed)
    # permutations x shingles (not the transpose): numpy's inner loops then run along the long shingle axis, and
    # the per-document minimum reduces contiguous rows (~7x faster than shingles x permutations)
    a, b = a[:, None], b[:, None]
    n = len(lengths)
    out = np.full((n, num_perm), 0xFFFFFFFF, dtype=np.uint32)
    offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int64)
    hv = _fmix32(flat)
    i = 0
    while i < n:
        if lengths[i] == 0:
            i += 1
            continue
        if lengths[i] >= chunk:  # one big document, in slices
            doc = hv[offsets[i] : offsets[i + 1]]
            for s in range(0, len(doc), chunk):
                part = np.multiply(a, doc[None, s : s + chunk])
                part += b
                out[i] = np.minimum(out[i], part.min(axis=1))
            i += 1
            continue
        j = max(i + 1, int(np.searchsorted(offsets, offsets[i] + chunk, side="right")) - 1)
        idx = np.arange(i, j)[lengths[i:j] > 0]
        part = np.multiply(a, hv[None, offsets[i] : offsets[j]])
        part += b
        out[idx] = np.minimum.reduceat(part, offsets[idx] - offsets[i], axis=1).T
        i = j
    return out


@lru_cache(maxsize=16)
def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band) datasketch's MinHashLSH picks for this threshold (equal FP/FN weights)."""
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    return int(lsh.b), int(lsh.r)


# ---------------------------------------------- the sequential in-memory reference (benchmarks, tests)


@dataclass
class DedupResult:
    reason: np.ndarray  # object array: "", "exact_duplicate", "near_duplicate" (aligned with the input)
    duplicate_of: np.ndarray  # int64 index of the kept document it duplicates, -1 if kept
    bands: int
    rows: int
    candidates: int  # documents that shared at least one LSH bucket


def find_duplicates(
    eligible: np.ndarray,
    keys: np.ndarray,
    signatures: np.ndarray | None,
    *,
    threshold: float,
    exact: bool = True,
    near: bool = True,
    progress: bool = False,
) -> DedupResult:
    """Duplicate decisions for documents given in input order (row i precedes row i+1), all in memory: the
    sequential pass earlier releases ran on the driver, kept as the reference `benchmarks/datascale/planted.py`
    compares with (jobs.prep.neardup runs dedup at scale).

    eligible: bool, documents still kept by earlier stages; keys: uint64 exact keys (0 = no words, never a
    duplicate); signatures: (n, num_perm) uint32 MinHash signatures."""
    n = len(keys)
    reason = np.full(n, "", dtype=object)
    dup_of = np.full(n, -1, dtype=np.int64)
    alive = eligible.copy()
    if exact and n:
        idx = np.flatnonzero(alive & (keys != _EMPTY_KEY))
        _, first, inverse = np.unique(keys[idx], return_index=True, return_inverse=True)
        keeper = idx[first][inverse]
        dups = idx[keeper != idx]
        reason[dups] = "exact_duplicate"
        dup_of[dups] = keeper[keeper != idx]
        alive[dups] = False
    bands = rows = n_cand = 0
    if near and signatures is not None and n:
        num_perm = signatures.shape[1]
        bands, rows = lsh_params(threshold, num_perm)
        idx = np.flatnonzero(alive & (keys != _EMPTY_KEY))
        if len(idx) > 1:
            sig = signatures[idx]
            bucket_ids = []
            multi = np.zeros(len(idx), dtype=bool)
            for j in range(bands):
                band = np.ascontiguousarray(sig[:, j * rows : (j + 1) * rows]).view(
                    np.dtype((np.void, rows * 4))
                )[:, 0]
                _, inv, counts = np.unique(band, return_inverse=True, return_counts=True)
                bucket_ids.append(inv)
                multi |= counts[inv] > 1
            cand = np.flatnonzero(multi)
            n_cand = len(cand)
            kept_in: list[dict[int, list[int]]] = [{} for _ in range(bands)]
            iterator = cand
            if progress and n_cand > 10_000:
                from tqdm import tqdm

                iterator = tqdm(cand, desc="near-dedup", unit="doc", mininterval=2.0)
            for i in iterator:
                match = -1
                for j in range(bands):
                    for k in kept_in[j].get(int(bucket_ids[j][i]), ()):
                        if np.count_nonzero(sig[i] == sig[k]) >= threshold * num_perm:
                            match = k
                            break
                    if match >= 0:
                        break
                if match >= 0:
                    reason[idx[i]] = "near_duplicate"
                    dup_of[idx[i]] = idx[match]
                else:
                    for j in range(bands):
                        kept_in[j].setdefault(int(bucket_ids[j][i]), []).append(int(i))
    return DedupResult(reason, dup_of, bands, rows, n_cand)
