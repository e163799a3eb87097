"""A multi-GB kk/ru/en corpus for the data-at-scale benchmark, with exact and near-duplicates planted at known rates.

New documents are recombined from the sentences of the shared corpora ($TULPAR_DATA/corpus/{kk,ru,en}): 3-40
sentences (log-normal, median 10) drawn uniformly from one language's pool of distinct sentences, joined by a
space or, at about one boundary in four, a newline. Per language file a small share of documents is mixed (the
file's language plus sentences of another) or entirely in another language (mislabelled). Then a share of
document slots becomes copies of an earlier original document of the same language, in the same file or in one of
the previous files (so copy and original are often in different files, and the copy always comes after the
original in input order):

- exact: the whole document, possibly with its case, punctuation or spacing changed so that the lower-case word
  sequence (`jobs.prep.dedup.dedup_words`) is unchanged;
- near: a copy with words replaced, inserted or deleted until the true Jaccard similarity of the word n-gram
  shingles (`dedup_words` + `dedup.ngram`-word shingles, one shingle for shorter documents, as in
  `jobs.prep.dedup.shingle_hashes`) reaches a target drawn uniformly from `--near-jaccard`.

Output (`--out DIR`): `<lang>/part-NNNNN.jsonl.zst` (records `{"id", "lang", "text"}`) or `.parquet` (columns
id, lang, text), `planted.parquet` (copy_file, copy_record, original_file, original_record, kind, jaccard,
target_jaccard, edits; files relative to DIR, records 0-based), `corpus.json` (parameters, files, counts) and
`sources.yaml` (the `sources:` of a jobs.preprocess config reading this corpus). The same arguments give the same
bytes, whatever `--workers`.

    python -m benchmarks.datascale.corpus --out /tmp/corpus-4g --size-gb 4 --seed 0
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from jobs.prep.dedup import dedup_words

LANGUAGES = ("kk", "ru", "en")
FORMATS = ("jsonl.zst", "parquet")
# A copy's original is drawn from its own file or the previous WINDOW files of its language (bounds memory).
WINDOW = 8
REPO_ROOT = Path(__file__).resolve().parents[2]
_SENT_SPLIT = re.compile(r"(?<=[.!?…])\s+")
_WORD_SPLIT = re.compile(r"(\w+)")
_WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class GenConfig:
    out: str
    size_gb: float = 0.5
    seed: int = 0
    format: str = "jsonl.zst"
    shard_mb: float = 64.0  # uncompressed text per file
    shares: dict[str, float] = field(default_factory=lambda: {"kk": 0.4, "ru": 0.3, "en": 0.3})
    exact_rate: float = 0.05
    near_rate: float = 0.05
    near_jaccard: tuple[float, float] = (0.7, 0.95)
    ngram: int = 5
    mixed_rate: float = 0.02
    other_rate: float = 0.01
    median_sentences: float = 10.0
    min_sentences: int = 3
    max_sentences: int = 40
    newline_rate: float = 0.25
    workers: int = 1

    def check(self) -> None:
        if self.size_gb <= 0:
            raise ValueError(f"--size-gb must be > 0, got {self.size_gb}")
        if self.format not in FORMATS:
            raise ValueError(f"--format must be one of {FORMATS}, got {self.format!r}")
        if self.shard_mb <= 0:
            raise ValueError(f"--shard-mb must be > 0, got {self.shard_mb}")
        unknown = set(self.shares) - set(LANGUAGES)
        if unknown or not self.shares or any(v <= 0 for v in self.shares.values()):
            raise ValueError(
                f"--shares takes positive shares of {LANGUAGES}, e.g. kk=0.4,ru=0.3,en=0.3; got {self.shares}"
            )
        if not (self.exact_rate >= 0 and self.near_rate >= 0 and self.exact_rate + self.near_rate < 1):
            raise ValueError(
                f"--exact-rate and --near-rate must be >= 0 with a sum below 1, got {self.exact_rate}, {self.near_rate}"
            )
        lo, hi = self.near_jaccard
        if not 0 < lo <= hi < 1:
            raise ValueError(f"--near-jaccard must be LO:HI with 0 < LO <= HI < 1, got {lo}:{hi}")
        if not (self.mixed_rate >= 0 and self.other_rate >= 0 and self.mixed_rate + self.other_rate < 1):
            raise ValueError(
                f"--mixed-rate + --other-rate must be below 1, got {self.mixed_rate}, {self.other_rate}"
            )
        if len(self.shares) < 2 and (self.mixed_rate or self.other_rate):
            raise ValueError(
                "mixed/other documents need two languages: add one to --shares or set the rates to 0"
            )
        if not 1 <= self.min_sentences <= self.max_sentences:
            raise ValueError(
                f"need 1 <= --min-sentences <= --max-sentences, got {self.min_sentences}, {self.max_sentences}"
            )
        if self.ngram < 1:
            raise ValueError(f"--ngram must be >= 1, got {self.ngram}")


# ---------------------------------------------------------------------------------------------------------------
# Sentence pools


@dataclass
class Pools:
    """Every distinct sentence of every language, as raw UTF-8 and as JSON-escaped UTF-8, in one table."""

    raw: list[bytes]
    escaped: list[bytes]
    nbytes: np.ndarray  # raw length per sentence
    ranges: dict[str, tuple[int, int]]  # language -> [lo, hi) in the table
    words: dict[str, list[str]]  # language -> distinct words (for near-duplicate edits)


def _paragraphs(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    if path.name.endswith(".jsonl"):
        out: list[str] = []
        for line in text.splitlines():
            if line.strip():
                out.extend(json.loads(line)["text"].split("\n"))
        return out
    lines = text.split("\n")
    if text.count("\n\n") > len(lines) // 20:  # hard-wrapped text: blank-line separated paragraphs
        return [" ".join(block.split()) for block in text.split("\n\n")]
    return lines


def split_sentences(paragraph: str) -> list[str]:
    return [s for s in (" ".join(p.split()) for p in _SENT_SPLIT.split(paragraph)) if s]


def language_sentences(corpus_dir: Path) -> list[str]:
    """Distinct sentences (3+ words, at most 1000 characters) of one language directory, in file order."""
    if not corpus_dir.is_dir():
        raise ValueError(f"no corpus directory {corpus_dir}: set TULPAR_DATA to the shared data directory")
    seen: dict[str, None] = {}
    for path in sorted(corpus_dir.iterdir()):
        if path.suffix not in (".txt", ".jsonl"):
            continue
        for para in _paragraphs(path):
            for s in split_sentences(para):
                if len(s) <= 1000 and len(_WORD.findall(s)) >= 3:
                    seen.setdefault(s, None)
    if not seen:
        raise ValueError(f"no sentences found under {corpus_dir}")
    return list(seen)


def load_pools(data_root: Path, languages: tuple[str, ...]) -> Pools:
    raw: list[bytes] = []
    escaped: list[bytes] = []
    ranges: dict[str, tuple[int, int]] = {}
    words: dict[str, list[str]] = {}
    for lang in languages:
        sents = language_sentences(data_root / "corpus" / lang)
        lo = len(raw)
        raw.extend(s.encode("utf-8") for s in sents)
        escaped.extend(json.dumps(s, ensure_ascii=False)[1:-1].encode("utf-8") for s in sents)
        ranges[lang] = (lo, len(raw))
        vocab = sorted({w for s in sents for w in _WORD.findall(s) if not w.isdigit()})
        words[lang] = vocab
    nbytes = np.fromiter((len(b) for b in raw), dtype=np.int64, count=len(raw))
    return Pools(raw, escaped, nbytes, ranges, words)


# ---------------------------------------------------------------------------------------------------------------
# Planning: which sentences each document has, which slots are copies of what (numpy, no text)


@dataclass(frozen=True)
class Shard:
    index: int  # global file order: the languages in --shares order, then part number
    lang: str
    part: int  # index among this language's files
    target_bytes: int

    def rel_path(self, fmt: str) -> str:
        return f"{self.lang}/part-{self.part:05d}.{fmt}"


def shard_layout(cfg: GenConfig) -> list[Shard]:
    total = cfg.size_gb * 1e9
    shard_bytes = cfg.shard_mb * 1e6
    shards: list[Shard] = []
    norm = sum(cfg.shares.values())
    for lang, share in cfg.shares.items():
        lang_bytes = total * share / norm
        n = max(1, round(lang_bytes / shard_bytes))
        for part in range(n):
            shards.append(Shard(len(shards), lang, part, int(lang_bytes / n)))
    return shards


KIND_FRESH, KIND_EXACT, KIND_NEAR = 0, 1, 2
KIND_NAMES = {KIND_EXACT: "exact", KIND_NEAR: "near"}


@dataclass
class BasePlan:
    """A file's documents before copies are resolved: sentence ids, separators, composition and slot kinds."""

    starts: np.ndarray  # (n + 1,) offsets into ids
    ids: np.ndarray  # global sentence ids
    newline: (
        np.ndarray
    )  # bool per sentence: a newline (not a space) before it (ignored for a document's first)
    comp: list[str]  # true language label per document: "kk", "kk+ru" (mixed), "ru" in a kk file (other)
    kind: np.ndarray  # KIND_* per document
    target: np.ndarray  # near-duplicate target Jaccard (nan otherwise)

    @property
    def n(self) -> int:
        return len(self.starts) - 1


def _rng(cfg: GenConfig, *key: int) -> np.random.Generator:
    return np.random.default_rng([cfg.seed, *key])


def base_plan(cfg: GenConfig, pools: Pools, shard: Shard) -> BasePlan:
    rng = _rng(cfg, shard.index, 0)
    langs = list(cfg.shares)
    others = [x for x in langs if x != shard.lang]
    mu = math.log(cfg.median_sentences)
    counts_l, ids_l, nl_l, comp_l = [], [], [], []
    total = 0
    while total < shard.target_bytes:
        b = 4096
        counts = np.clip(np.rint(rng.lognormal(mu, 0.7, b)), cfg.min_sentences, cfg.max_sentences).astype(
            np.int64
        )
        u = rng.random(b)
        comp = np.where(u < cfg.mixed_rate, 1, np.where(u < cfg.mixed_rate + cfg.other_rate, 2, 0))
        second = rng.integers(0, max(1, len(others)), b)
        doc_of = np.repeat(np.arange(b), counts)
        # language of each sentence: the file's; another for "other" documents; 40% another for mixed ones
        use_other = (comp[doc_of] == 2) | ((comp[doc_of] == 1) & (rng.random(len(doc_of)) < 0.4))
        lo = np.empty(len(doc_of), dtype=np.int64)
        size = np.empty(len(doc_of), dtype=np.int64)
        own_lo, own_hi = pools.ranges[shard.lang]
        lo[:], size[:] = own_lo, own_hi - own_lo
        for k, other in enumerate(others):
            sel = use_other & (second[doc_of] == k)
            o_lo, o_hi = pools.ranges[other]
            lo[sel], size[sel] = o_lo, o_hi - o_lo
        ids = lo + (rng.random(len(doc_of)) * size).astype(np.int64)
        newline = rng.random(len(doc_of)) < cfg.newline_rate
        doc_bytes = np.add.reduceat(pools.nbytes[ids] + 1, np.concatenate(([0], np.cumsum(counts)[:-1])))
        cum = total + np.cumsum(doc_bytes)
        keep = int(np.searchsorted(cum, shard.target_bytes) + 1) if cum[-1] >= shard.target_bytes else b
        keep = min(keep, b)
        n_sent = int(counts[:keep].sum())
        counts_l.append(counts[:keep])
        ids_l.append(ids[:n_sent].astype(np.int32))
        nl_l.append(newline[:n_sent])
        for d in range(keep):
            c = int(comp[d])
            o = others[int(second[d])] if others else shard.lang
            comp_l.append(shard.lang if c == 0 else (f"{shard.lang}+{o}" if c == 1 else o))
        total = int(cum[keep - 1])
    counts = np.concatenate(counts_l)
    n = len(counts)
    u = rng.random(n)
    kind = np.where(
        u < cfg.exact_rate, KIND_EXACT, np.where(u < cfg.exact_rate + cfg.near_rate, KIND_NEAR, KIND_FRESH)
    )
    lo_j, hi_j = cfg.near_jaccard
    target = np.where(kind == KIND_NEAR, lo_j + (hi_j - lo_j) * rng.random(n), np.nan)
    starts = np.concatenate(([0], np.cumsum(counts)))
    return BasePlan(starts, np.concatenate(ids_l), np.concatenate(nl_l), comp_l, kind.astype(np.int8), target)


def resolve_sources(
    cfg: GenConfig, shards: list[Shard], shard: Shard, plan_of
) -> tuple[np.ndarray, np.ndarray]:
    """(source shard index, source record) per document of `shard`; -1 for originals. A copy whose draw finds no
    earlier original becomes an original itself."""
    plan = plan_of(shard.index)
    rng = _rng(cfg, shard.index, 1)
    src_shard = np.full(plan.n, -1, dtype=np.int64)
    src_rec = np.full(plan.n, -1, dtype=np.int64)
    copies = np.flatnonzero(plan.kind != KIND_FRESH)
    if not len(copies):
        return src_shard, src_rec
    first_part = max(0, shard.part - WINDOW)
    parts = rng.integers(first_part, shard.part + 1, len(copies))
    pick = rng.random(len(copies))
    base_index = shard.index - shard.part  # global index of this language's part 0
    fresh_cache: dict[int, np.ndarray] = {}
    for c, part, p in zip(copies.tolist(), parts.tolist(), pick.tolist(), strict=True):
        g = base_index + part
        if g not in fresh_cache:
            fresh_cache[g] = np.flatnonzero(plan_of(g).kind == KIND_FRESH)
        fresh = fresh_cache[g]
        if g == shard.index:
            fresh = fresh[: np.searchsorted(fresh, c)]  # earlier records of the same file
        if not len(fresh):
            continue
        src_shard[c] = g
        src_rec[c] = fresh[int(p * len(fresh))]
    return src_shard, src_rec


# ---------------------------------------------------------------------------------------------------------------
# Text: originals from the pools; exact and near variants with the true Jaccard


def shingle_set(words: list[str], n: int) -> set[tuple[str, ...]]:
    """The word n-grams of a document as dedup sees them (one shingle of all words when fewer than n)."""
    if not words:
        return set()
    if len(words) < n:
        return {tuple(words)}
    return set(zip(*(words[i:] for i in range(n)), strict=False))


def jaccard(a: set, b: set) -> float:
    if not a and not b:
        return 1.0
    inter = len(a & b)
    return inter / (len(a) + len(b) - inter)


def exact_variant(text: str, rnd: random.Random) -> tuple[str, str]:
    """A copy whose case-folded word sequence equals the text's, and what was changed ("" for none)."""
    ops = [op for op in ("case", "punct", "space") if rnd.random() < 0.5]
    out = text
    for op in ops:
        if op == "case":
            how = rnd.randrange(3)
            out = (
                out.lower()
                if how == 0
                else out.upper()
                if how == 1
                else _WORD.sub(lambda m: m.group(0).upper() if rnd.random() < 0.3 else m.group(0), out)
            )
        elif op == "punct":  # drop or change punctuation that stands before a space (words stay apart)
            out = re.sub(r"[,;:](?=\s)", lambda m: "" if rnd.random() < 0.7 else m.group(0), out)
            out = re.sub(r"\.(?=\s)", lambda m: "!" if rnd.random() < 0.2 else m.group(0), out)
        else:
            out = re.sub(r" ", lambda m: "  " if rnd.random() < 0.2 else " ", out)
            out = re.sub(r"\n", lambda m: " " if rnd.random() < 0.5 else "\n\n", out)
    if out != text and dedup_words(out) != dedup_words(text):  # e.g. a letter whose case mapping adds letters
        return text, ""
    return out, "+".join(ops)


def _render(prefix: str, pairs: list[list[str]]) -> str:
    return prefix + "".join(w + s for w, s in pairs)


def near_variant(
    text: str, target: float, ngram: int, vocab: list[str], rnd: random.Random
) -> tuple[str, float, int]:
    """(copy, true Jaccard, edits): the text with the fewest edits from a random edit sequence (replace, insert,
    delete words) whose shingle Jaccard is closest to `target` (at least one edit)."""
    toks = _WORD_SPLIT.split(text)
    prefix = toks[0]
    pairs0 = [[toks[i], toks[i + 1]] for i in range(1, len(toks) - 1, 2)]
    n = len(pairs0)
    if n == 0:
        return text, 1.0, 0
    edits = [(rnd.random(), rnd.random(), vocab[rnd.randrange(len(vocab))]) for _ in range(n)]
    base = shingle_set(dedup_words(text), ngram)

    def apply(m: int) -> tuple[str, float]:
        pairs = [p[:] for p in pairs0]
        for op, pos, word in edits[:m]:
            i = min(int(pos * len(pairs)), len(pairs) - 1)
            if op < 0.5 or len(pairs) < 2:
                pairs[i][0] = word
            elif op < 0.75:
                pairs.insert(i + 1, [word, " "])
            else:
                del pairs[i]
        out = _render(prefix, pairs)
        return out, jaccard(base, shingle_set(dedup_words(out), ngram))

    done: dict[int, tuple[str, float]] = {}

    def at(m: int) -> tuple[str, float]:
        if m not in done:
            done[m] = apply(m)
        return done[m]

    # The fewest edits m with J(m) <= target (J falls with m): gallop from the estimate for edits that each remove
    # `ngram` shingles from both sides, J = (S - n m) / (S + n m), then bisect the bracket (lo: J > target or 0).
    guess = round(len(base) * (1 - target) / (ngram * (1 + target)))
    m0 = min(n, max(1, guess))
    step = 1
    if at(m0)[1] <= target:
        hi = m0
        while True:
            lo = max(0, hi - step)
            if lo == 0 or at(lo)[1] > target:
                break
            hi, step = lo, step * 2
    else:
        lo = m0
        while True:
            hi = min(n, lo + step)
            if hi == n or at(hi)[1] <= target:
                break
            lo, step = hi, step * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if at(mid)[1] <= target:
            hi = mid
        else:
            lo = mid
    best, m = at(hi), hi
    if lo >= 1 and abs(at(lo)[1] - target) < abs(best[1] - target):
        best, m = at(lo), lo
    if abs(best[1] - target) > 0.02 and base:
        # one edit inside a short document removes up to n shingles: words appended at the end add one each
        k = max(1, round(len(base) * (1 / target - 1)))
        out = text + " " + " ".join(vocab[rnd.randrange(len(vocab))] for _ in range(k))
        appended = (out, jaccard(base, shingle_set(dedup_words(out), ngram)))
        if abs(appended[1] - target) < abs(best[1] - target):
            best, m = appended, k
    return best[0], best[1], m


@dataclass
class ShardOutput:
    rel_path: str
    docs: int
    uncompressed_bytes: int
    file_bytes: int
    comp_counts: dict[str, int]
    planted: dict[str, list]


_POOLS: Pools | None = None
_CFG: GenConfig | None = None
_SHARDS: list[Shard] = []


@lru_cache(maxsize=WINDOW + 2)
def _plan(index: int) -> BasePlan:
    assert _CFG is not None and _POOLS is not None
    return base_plan(_CFG, _POOLS, _SHARDS[index])


def doc_bytes(pools: Pools, plan: BasePlan, r: int, table: list[bytes], newline: bytes) -> bytes:
    a, b = int(plan.starts[r]), int(plan.starts[r + 1])
    ids = plan.ids[a:b].tolist()
    nl = plan.newline[a:b].tolist()
    parts = [table[ids[0]]]
    parts.extend((newline if nl[k] else b" ") + table[ids[k]] for k in range(1, len(ids)))
    return b"".join(parts)


def _write_shard(index: int) -> ShardOutput:
    cfg, pools, shard = _CFG, _POOLS, _SHARDS[index]
    assert cfg is not None and pools is not None
    plan = _plan(index)
    src_shard, src_rec = resolve_sources(cfg, _SHARDS, shard, _plan)
    rel = shard.rel_path(cfg.format)
    planted: dict[str, list] = {
        k: []
        for k in (
            "copy_record",
            "original_file",
            "original_record",
            "kind",
            "jaccard",
            "target_jaccard",
            "edits",
            "change",
        )
    }
    texts_json: list[bytes] = []
    texts_raw: list[bytes] = []
    langs: list[str] = []
    jsonl = cfg.format == "jsonl.zst"
    for r in range(plan.n):
        g = int(src_shard[r])
        if g < 0:
            langs.append(plan.comp[r])
            if jsonl:
                texts_json.append(doc_bytes(pools, plan, r, pools.escaped, b"\\n"))
            else:
                texts_raw.append(doc_bytes(pools, plan, r, pools.raw, b"\n"))
            continue
        src_plan = _plan(g)
        o = int(src_rec[r])
        original = doc_bytes(pools, src_plan, o, pools.raw, b"\n").decode("utf-8")
        langs.append(src_plan.comp[o])
        rnd = random.Random((cfg.seed * 1_000_003 + index) * 100_000_007 + r)
        if plan.kind[r] == KIND_EXACT:
            copy, change = exact_variant(original, rnd)
            jac, edits, target = 1.0, 0, float("nan")
        else:
            target = float(plan.target[r])
            vocab = pools.words[src_plan.comp[o].split("+")[0]]
            copy, jac, edits = near_variant(original, target, cfg.ngram, vocab, rnd)
            change = "edit"
        if jsonl:
            texts_json.append(json.dumps(copy, ensure_ascii=False)[1:-1].encode("utf-8"))
        else:
            texts_raw.append(copy.encode("utf-8"))
        planted["copy_record"].append(r)
        planted["original_file"].append(_SHARDS[g].rel_path(cfg.format))
        planted["original_record"].append(o)
        planted["kind"].append(KIND_NAMES[int(plan.kind[r])])
        planted["jaccard"].append(jac)
        planted["target_jaccard"].append(target)
        planted["edits"].append(edits)
        planted["change"].append(change)
    path = Path(cfg.out) / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    stem = rel.split(".", 1)[0]
    if jsonl:
        uncompressed_bytes = _write_jsonl_zst(tmp, stem, langs, texts_json)
    else:
        uncompressed_bytes = _write_parquet(tmp, stem, langs, texts_raw)
    os.replace(tmp, path)
    comp_counts: dict[str, int] = {}
    for c in langs:
        comp_counts[c] = comp_counts.get(c, 0) + 1
    return ShardOutput(rel, plan.n, uncompressed_bytes, path.stat().st_size, comp_counts, planted)


def _write_jsonl_zst(path: Path, stem: str, langs: list[str], bodies: list[bytes]) -> int:
    import pyarrow as pa

    uncompressed_bytes = 0
    with pa.CompressedOutputStream(str(path), "zstd") as f:
        buf: list[bytes] = []
        for r, (lang, body) in enumerate(zip(langs, bodies, strict=True)):
            buf.append(
                b'{"id": "%s:%d", "lang": "%s", "text": "%s"}\n' % (stem.encode(), r, lang.encode(), body)
            )
            if len(buf) >= 4096:
                chunk = b"".join(buf)
                uncompressed_bytes += len(chunk)
                f.write(chunk)
                buf = []
        chunk = b"".join(buf)
        uncompressed_bytes += len(chunk)
        f.write(chunk)
    return uncompressed_bytes


def _write_parquet(path: Path, stem: str, langs: list[str], texts: list[bytes]) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("id", pa.string()), ("lang", pa.string()), ("text", pa.string())])
    uncompressed_bytes = 0
    with pq.ParquetWriter(str(path), schema, compression="zstd") as w:
        for s in range(0, len(texts), 8192):
            part = texts[s : s + 8192]
            uncompressed_bytes += sum(len(t) for t in part)
            table = pa.table(
                {
                    "id": pa.array([f"{stem}:{r}" for r in range(s, s + len(part))], pa.string()),
                    "lang": pa.array(langs[s : s + len(part)], pa.string()),
                    "text": pa.array(part, pa.binary()).cast(pa.string()),
                },
                schema=schema,
            )
            w.write_table(table)
    return uncompressed_bytes


def _init_worker(cfg: GenConfig, pools: Pools, shards: list[Shard]) -> None:
    global _CFG, _POOLS, _SHARDS
    _CFG, _POOLS, _SHARDS = cfg, pools, shards
    _plan.cache_clear()


def sources_yaml(cfg: GenConfig, out: Path) -> str:
    lines = [
        f"# Sources of the generated corpus {out} (benchmarks/datascale/corpus.py, seed {cfg.seed}, "
        f"{cfg.size_gb} GB): put these under `sources:` of a jobs.preprocess config, e.g.",
        "#   python -m jobs.preprocess --config configs/preprocess/kk-ru-en.yaml ... with this list.",
        '# Documents are {"id", "lang", "text"} records; `lang` is the true composition (kk, kk+ru = mixed).',
        "sources:",
    ]
    for lang in cfg.shares:
        lines.append(f'  - {{path: "{out}/{lang}/*.{cfg.format}", language: {lang}}}')
    return "\n".join(lines) + "\n"


def generate(cfg: GenConfig, data_root: Path, *, pools: Pools | None = None, log=print) -> dict:
    """Write the corpus, planted.parquet, corpus.json and sources.yaml; return the summary (also corpus.json).
    `pools` (from `load_pools`) saves re-reading the shared corpora when generating several corpora."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cfg.check()
    t0 = time.perf_counter()
    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if pools is None or tuple(pools.ranges) != tuple(cfg.shares):
        pools = load_pools(data_root, tuple(cfg.shares))
    t_pools = time.perf_counter() - t0
    shards = shard_layout(cfg)
    log(
        "pools: "
        + ", ".join(f"{lang} {hi - lo} sentences" for lang, (lo, hi) in pools.ranges.items())
        + f" ({t_pools:.1f}s); writing {len(shards)} files with {cfg.workers} worker(s)"
    )
    _init_worker(cfg, pools, shards)
    # Each language's files are written in order by one process at a time per window; files are independent
    # given the plans, so any split over processes gives the same bytes.
    order = list(range(len(shards)))
    results: list[ShardOutput] = []
    if cfg.workers > 1:
        import multiprocessing as mp

        ctx = mp.get_context("fork")
        with ProcessPoolExecutor(
            cfg.workers, mp_context=ctx, initializer=_init_worker, initargs=(cfg, pools, shards)
        ) as ex:
            for res in ex.map(_write_shard, order):
                results.append(res)
                log(
                    f"  {res.rel_path}: {res.docs} docs, {res.uncompressed_bytes / 1e6:.1f} MB text, {res.file_bytes / 1e6:.1f} MB on disk"
                )
    else:
        for i in order:
            res = _write_shard(i)
            results.append(res)
            log(
                f"  {res.rel_path}: {res.docs} docs, {res.uncompressed_bytes / 1e6:.1f} MB text, {res.file_bytes / 1e6:.1f} MB on disk"
            )
    cols: dict[str, list] = {"copy_file": []}
    for res in results:
        cols["copy_file"].extend([res.rel_path] * len(res.planted["copy_record"]))
        for k, v in res.planted.items():
            cols.setdefault(k, []).extend(v)
    table = pa.table(
        {
            "copy_file": pa.array(cols["copy_file"], pa.string()),
            "copy_record": pa.array(cols["copy_record"], pa.int64()),
            "original_file": pa.array(cols["original_file"], pa.string()),
            "original_record": pa.array(cols["original_record"], pa.int64()),
            "kind": pa.array(cols["kind"], pa.string()),
            "jaccard": pa.array(cols["jaccard"], pa.float64()),
            "target_jaccard": pa.array(cols["target_jaccard"], pa.float64()),
            "edits": pa.array(cols["edits"], pa.int64()),
            "change": pa.array(cols["change"], pa.string()),
        }
    )
    pq.write_table(table, str(out / "planted.parquet"))
    (out / "sources.yaml").write_text(sources_yaml(cfg, out), encoding="utf-8")
    seconds = time.perf_counter() - t0
    docs = sum(r.docs for r in results)
    uncompressed_bytes = sum(r.uncompressed_bytes for r in results)
    kinds = cols["kind"]
    jac = np.asarray(cols["jaccard"], dtype=np.float64)
    near = np.asarray([k == "near" for k in kinds], dtype=bool)
    comp: dict[str, int] = {}
    for r in results:
        for k, v in r.comp_counts.items():
            comp[k] = comp.get(k, 0) + v
    summary = {
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("out", "workers")},
        "data_root": str(data_root),
        "pool_sentences": {lang: hi - lo for lang, (lo, hi) in pools.ranges.items()},
        "files": [
            {
                "path": r.rel_path,
                "docs": r.docs,
                "uncompressed_bytes": r.uncompressed_bytes,
                "file_bytes": r.file_bytes,
            }
            for r in results
        ],
        "docs": docs,
        "uncompressed_bytes": uncompressed_bytes,
        "file_bytes": sum(r.file_bytes for r in results),
        "composition": dict(sorted(comp.items())),
        "planted": {
            "exact": int(sum(k == "exact" for k in kinds)),
            "near": int(near.sum()),
            "near_at_or_above_0.8": int((jac[near] >= 0.8).sum()),
            "cross_file": int(
                sum(a != b for a, b in zip(cols["copy_file"], cols["original_file"], strict=True))
            ),
            "exact_changed": int(
                sum(bool(c) for c, k in zip(cols["change"], kinds, strict=True) if k == "exact")
            ),
        },
        "seconds": round(seconds, 1),
        "workers": cfg.workers,
    }
    (out / "corpus.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    log(
        f"wrote {docs} docs, {uncompressed_bytes / 1e9:.3f} GB text ({summary['file_bytes'] / 1e9:.3f} GB on disk) in "
        f"{seconds:.1f}s ({uncompressed_bytes / 1e6 / seconds:.1f} MB/s); planted {summary['planted']}"
    )
    return summary


def _pair(text: str) -> tuple[float, float]:
    lo, _, hi = text.partition(":")
    try:
        return float(lo), float(hi)
    except ValueError:
        raise ValueError(f"--near-jaccard takes LO:HI, e.g. 0.7:0.95; got {text!r}") from None


def _shares(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for part in text.split(","):
        lang, _, v = part.partition("=")
        try:
            out[lang.strip()] = float(v)
        except ValueError:
            raise ValueError(
                f"--shares takes lang=share pairs, e.g. kk=0.4,ru=0.3,en=0.3; got {text!r}"
            ) from None
    return out


def parse_args(argv: list[str] | None) -> GenConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--size-gb", type=float, default=0.5, help="uncompressed text size (1 GB = 1e9 bytes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", choices=FORMATS, default="jsonl.zst")
    p.add_argument("--shard-mb", type=float, default=64.0, help="uncompressed text per file")
    p.add_argument("--shares", type=_shares, default="kk=0.4,ru=0.3,en=0.3")
    p.add_argument("--exact-rate", type=float, default=0.05, help="share of documents that are exact copies")
    p.add_argument("--near-rate", type=float, default=0.05, help="share of documents that are near copies")
    p.add_argument(
        "--near-jaccard", type=_pair, default="0.7:0.95", help="band of near copies' target Jaccard"
    )
    p.add_argument("--ngram", type=int, default=5, help="words per shingle (jobs.preprocess dedup.ngram)")
    p.add_argument(
        "--mixed-rate", type=float, default=0.02, help="share of mixed-language documents per file"
    )
    p.add_argument(
        "--other-rate", type=float, default=0.01, help="share of documents in another language per file"
    )
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    a = p.parse_args(argv)
    return GenConfig(
        out=a.out,
        size_gb=a.size_gb,
        seed=a.seed,
        format=a.format,
        shard_mb=a.shard_mb,
        shares=a.shares,
        exact_rate=a.exact_rate,
        near_rate=a.near_rate,
        near_jaccard=a.near_jaccard,
        ngram=a.ngram,
        mixed_rate=a.mixed_rate,
        other_rate=a.other_rate,
        workers=max(1, a.workers),
    )


def data_root() -> Path:
    """TULPAR_DATA, default ../shared/data beside the checkout (as jobs.platform.runtime.Settings, without
    importing the platform's model code)."""
    env = os.environ.get("TULPAR_DATA")
    return Path(env).expanduser().resolve() if env else (REPO_ROOT.parent / "shared" / "data").resolve()


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_args(argv)
        generate(cfg, data_root())
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
