"""Driver-side plans over per-document metadata: the mixture (how many copies of each train document) and
the shard layout (which shard and position each copy goes to). Deterministic: they depend only on document
ids, token counts and seeds, never on the order in which workers finished."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import numpy as np

from jobs.prep.config import MixtureConfig
from llm_core.data import DataError
from llm_core.shards import SPLITS


def order_key(doc_ids: np.ndarray, seed: int) -> np.ndarray:
    """A pseudo-random but fixed uint64 per document id (splitmix64 of id ^ seed-hash)."""
    salt = int.from_bytes(hashlib.blake2b(str(seed).encode(), digest_size=8).digest(), "little")
    x = doc_ids.astype(np.uint64) ^ np.uint64(salt)
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@dataclass
class MixturePlan:
    copies: np.ndarray  # int64 copies per train document (0 = left out)
    target: dict[str, float] | None
    available_tokens: dict[str, int]
    planned_tokens: dict[str, int]
    achieved_tokens: dict[str, int]
    epochs: dict[str, float]
    total_tokens: int
    notes: list[str] = field(default_factory=list)

    def to_dict(self, languages: list[str]) -> dict:
        total = sum(self.achieved_tokens.values()) or 1
        achieved = {lang: self.achieved_tokens.get(lang, 0) / total for lang in languages}
        avail_total = sum(self.available_tokens.values()) or 1
        natural = {lang: self.available_tokens.get(lang, 0) / avail_total for lang in languages}
        return {
            "target": dict(self.target) if self.target is not None else natural,
            "achieved": achieved,
            "natural": natural,
            "available_tokens": self.available_tokens,
            "planned_tokens": self.planned_tokens,
            "achieved_tokens": self.achieved_tokens,
            "epochs": self.epochs,
            "total_tokens": self.total_tokens,
        }


def mixture_targets(
    available: dict[str, int], languages: list[str], cfg: MixtureConfig
) -> tuple[dict[str, int], dict[str, float], int]:
    """(planned train tokens per language, epochs = planned / available, total) for a target mixture; only
    per-language totals are needed, so the distributed pipeline calls this with aggregated counts."""
    if cfg.target is None:
        raise ValueError("mixture_targets needs mixture.target")
    empty = [lang for lang in languages if cfg.target[lang] > 0 and available[lang] == 0]
    if empty:
        raise DataError(
            f"mixture.target wants {empty} but no train text of that language is left after cleaning: add text, "
            "check the report's drop reasons, or set its share to 0"
        )
    shares = {lang: cfg.target[lang] for lang in languages}
    if cfg.total_tokens is not None:
        total = int(cfg.total_tokens)
    else:
        total = int(min(available[lang] * cfg.max_epochs / s for lang, s in shares.items() if s > 0))
    planned = {lang: int(round(total * shares[lang])) for lang in languages}
    epochs: dict[str, float] = {}
    for lang in languages:
        f = planned[lang] / available[lang] if available[lang] else 0.0
        epochs[lang] = f
        if f > cfg.max_epochs + 1e-9:
            raise DataError(
                f"mixture: {lang} needs {f:.2f} epochs of its {available[lang]:,} train tokens to reach "
                f"{planned[lang]:,} (mixture.total_tokens={total:,}), more than mixture.max_epochs={cfg.max_epochs}: "
                "lower total_tokens, raise max_epochs or add text"
            )
    return planned, epochs, total


def plan_mixture(
    doc_ids: np.ndarray, langs: np.ndarray, tokens: np.ndarray, languages: list[str], cfg: MixtureConfig
) -> MixturePlan:
    """Copies per train document so that language shares of train tokens match `cfg.target`.

    Each language gets `floor(f)` full passes over its documents (f = planned / available tokens) plus a
    prefix, in a fixed pseudo-random order, of documents whose tokens come closest to the remainder."""
    available = {lang: int(tokens[langs == lang].sum()) for lang in languages}
    copies = np.ones(len(doc_ids), dtype=np.int64)
    if cfg.target is None:
        return MixturePlan(
            copies,
            None,
            available,
            dict(available),
            dict(available),
            dict.fromkeys(languages, 1.0),
            sum(available.values()),
        )
    planned, epochs, total = mixture_targets(available, languages, cfg)
    achieved: dict[str, int] = {}
    for lang in languages:
        sel = np.flatnonzero(langs == lang)
        if len(sel) == 0:
            achieved[lang] = 0
            continue
        full = int(math.floor(epochs[lang] + 1e-12))
        rest = planned[lang] - full * available[lang]
        order = sel[np.argsort(order_key(doc_ids[sel], cfg.seed), kind="stable")]
        cum = np.cumsum(tokens[order])
        # the prefix length whose token sum is closest to `rest`
        i = int(np.searchsorted(cum, rest, side="left"))  # prefixes of length i sum below rest
        below = int(cum[i - 1]) if i > 0 else 0
        k = i + 1 if i < len(cum) and int(cum[i]) - rest < rest - below else i
        copies[sel] = full
        copies[order[:k]] += 1
        achieved[lang] = int((copies[sel] * tokens[sel]).sum())
    return MixturePlan(copies, dict(cfg.target), available, planned, achieved, epochs, total)


@dataclass
class ShardPlan:
    """One entry per document copy: the shard it goes to and its position there."""

    doc_id: np.ndarray  # int64, sorted (copies of one document are adjacent)
    shard: np.ndarray  # int32 index into `shards`
    position: np.ndarray  # int64 order inside the shard
    shards: list[tuple[str, str, int]]  # (split, language, index)


def plan_shards(
    doc_ids: np.ndarray,
    splits: np.ndarray,
    langs: np.ndarray,
    tokens: np.ndarray,
    copies: np.ndarray,
    languages: list[str],
    shard_max_tokens: int,
    seed: int,
) -> ShardPlan:
    """Lay every copy out per (split, language): copies ordered by (repeat number, fixed pseudo-random order)
    and cut into shards by start offset, so a shard holds about `shard_max_tokens` (documents are never split)."""
    out_ids, out_shard, out_pos, specs = [], [], [], []
    for split in SPLITS:
        for lang in languages:
            sel = np.flatnonzero((splits == split) & (langs == lang) & (copies > 0))
            if len(sel) == 0:
                continue
            reps = copies[sel]
            entry_doc = np.repeat(sel, reps)
            # repeat number of each entry: 0..copies-1
            starts = np.repeat(np.cumsum(reps) - reps, reps)
            rep_no = np.arange(len(entry_doc)) - starts
            key = order_key(doc_ids[entry_doc], seed)
            order = np.lexsort((doc_ids[entry_doc], key, rep_no))
            entry_doc = entry_doc[order]
            ntok = tokens[entry_doc]
            start_tok = np.cumsum(ntok) - ntok
            local_shard = (start_tok // shard_max_tokens).astype(np.int64)
            # renumber so indexes are contiguous even if one document spans several shard widths
            uniq, local_shard = np.unique(local_shard, return_inverse=True)
            base = len(specs)
            specs.extend((split, lang, i) for i in range(len(uniq)))
            out_ids.append(doc_ids[entry_doc])
            out_shard.append(base + local_shard)
            out_pos.append(np.arange(len(entry_doc), dtype=np.int64))
    if not specs:
        return ShardPlan(np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros(0, np.int64), [])
    ids = np.concatenate(out_ids)
    shard = np.concatenate(out_shard).astype(np.int32)
    pos = np.concatenate(out_pos)
    order = np.argsort(ids, kind="stable")
    return ShardPlan(ids[order], shard[order], pos[order], specs)


# ------------------------------------------------------------------ the mixture from aggregates (distributed)

HISTOGRAM_BITS = 12  # order-key buckets per language in the distributed mixture plan
_SHIFT = np.uint64(64 - HISTOGRAM_BITS)


def key_bucket(keys: np.ndarray) -> np.ndarray:
    """The histogram bucket (top HISTOGRAM_BITS bits) of uint64 order keys."""
    return (keys >> _SHIFT).astype(np.int64)


def token_histogram(keys: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """Tokens per order-key bucket: what each block reports so the driver can find a language's cut."""
    return np.bincount(key_bucket(keys), weights=tokens, minlength=1 << HISTOGRAM_BITS).astype(np.int64)


@dataclass(frozen=True)
class CopyRule:
    """Copies of one language's train documents without per-document state: `full` each, plus one more for
    documents whose (order key, doc id) sorts before `cut` — the same documents `plan_mixture` picks."""

    full: int
    cut_key: int
    cut_doc: int

    def copies(self, doc_ids: np.ndarray, keys: np.ndarray) -> np.ndarray:
        ck = np.uint64(self.cut_key)
        extra = (keys < ck) | ((keys == ck) & (doc_ids < self.cut_doc))
        return self.full + extra.astype(np.int64)


def cut_bucket(hist: np.ndarray, rest: int) -> tuple[int, int]:
    """(bucket holding the document whose cumulative tokens first reach `rest`, tokens before that bucket)."""
    cum = np.cumsum(hist)
    b = int(np.searchsorted(cum, rest, side="left"))
    return b, int(cum[b - 1]) if b > 0 else 0


def copy_rule(
    full: int,
    rest: int,
    bucket: int,
    tokens_before: int,
    bucket_ids: np.ndarray,
    bucket_keys: np.ndarray,
    bucket_tokens: np.ndarray,
) -> CopyRule:
    """The rule once the documents of the cut bucket are known: the prefix (in order-key order, ties by doc id)
    whose token sum is closest to `rest`, decided exactly as `plan_mixture` decides it."""
    if rest <= 0 or len(bucket_ids) == 0:
        return CopyRule(full, 0, -1)
    order = np.lexsort((bucket_ids, bucket_keys))
    ids, keys = bucket_ids[order], bucket_keys[order]
    cum = tokens_before + np.cumsum(bucket_tokens[order])
    i = int(np.searchsorted(cum, rest, side="left"))
    below = int(cum[i - 1]) if i > 0 else tokens_before
    include = i < len(cum) and int(cum[i]) - rest < rest - below
    j = i + 1 if include else i  # the first document left out
    if j < len(ids):
        return CopyRule(full, int(keys[j]), int(ids[j]))
    if bucket + 1 >= 1 << HISTOGRAM_BITS:
        return CopyRule(full, int(np.iinfo(np.uint64).max), int(np.iinfo(np.int64).max))
    return CopyRule(full, (bucket + 1) << int(_SHIFT), -1)
