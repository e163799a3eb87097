"""Exact and near-duplicate removal as distributed stages, the way datatrove and NeMo Curator run it at web
scale, over the committed clean blocks (jobs.prep.blocks):

  keys      (Ray Data map, per block)  every eligible document emits its exact key (kind 0) and one hash per
                                       LSH band (kinds 1..b) of its MinHash signature, with a partition number
  buckets   (Ray Data groupby on the partition: a hash-partitioned shuffle; spills to disk when it must)
                                       documents sharing a key form a bucket; buckets emit candidate edges:
                                       exact edges (bucket's first document -> each other one), band edges
                                       (each member -> up to EDGE_FANOUT earlier members)
  cluster   (one Ray task)             band edges are verified by the TRUE Jaccard similarity of the two
                                       documents' shingle sets (read back from the blocks that hold them), then connected
                                       components over exact + verified edges; in each component the FIRST
                                       document (smallest id = input order) is kept. An exact duplicate names its
                                       exact key's first document; any other member is a near duplicate of the
                                       component's first. Written as dedup/duplicates.parquet sorted by doc id.

Only the bucket shuffle touches every document; the cluster task holds the candidate edges and the shingles
of their endpoints, which grow with the number of duplicates, not with the corpus.

Bands and rows (`candidate_params`) favour recall: a pair exactly at the threshold becomes a candidate with
probability `dedup.candidate_recall` (0.995), and since every candidate is checked by its true Jaccard similarity,
the extra candidates cost verification time, never precision. (datasketch's default balances false positives and
false negatives: at threshold 0.8 it picks 9 bands x 13 rows, which misses a pair at J = 0.87 one time in five.)

Compared with the sequential greedy pass this replaces (drop a document when an earlier KEPT document passes
the check): a chain a~b, b~c with a!~c keeps a and c there and only a here (c's cluster is a's); that is the
one difference, and `benchmarks/data_scale.py dedup-diff` counts it on a real corpus.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from jobs.prep.blocks import DUPLICATES, peak_rss_mb, read_clean
from jobs.prep.config import DedupConfig
from jobs.prep.store import Store

EDGE_FANOUT = 8  # a band bucket links each member to at most this many earlier members
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, element-wise on uint64 (an avalanching bijection)."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def band_hashes(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(n, bands) uint64: one 64-bit hash of each band's `rows` MinHash values."""
    h = np.zeros((sig.shape[0], bands), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for r in range(rows):
            col = sig[:, [j * rows + r for j in range(bands)]]
            h = _mix64(h * _GOLDEN + col.astype(np.uint64))
    return h


def emit_keys(
    batch: pa.Table, root: str, cfg: DedupConfig, bands: int, rows: int, partitions: int
) -> pa.Table:
    """Ray Data map over block ordinals: (part, kind, key, doc_id) rows of the blocks' eligible documents."""
    store = Store(root)
    kinds, keys, ids = [], [], []
    for o in batch.column("ordinal").to_pylist():
        cols = ["doc_id", "reason", "exact_key"] + (["signature"] if cfg.near else [])
        t = read_clean(store, o, cols)
        if t.num_rows == 0:
            continue
        exact_key = t.column("exact_key").to_numpy().astype(np.uint64)
        ok = (np.asarray(t.column("reason").to_pylist(), dtype=object) == "") & (exact_key != 0)
        doc_id = t.column("doc_id").to_numpy()[ok]
        if cfg.exact:
            kinds.append(np.zeros(len(doc_id), np.int16))
            keys.append(exact_key[ok])
            ids.append(doc_id)
        if cfg.near and len(doc_id):
            sig = t.column("signature").combine_chunks().values.to_numpy().reshape(-1, cfg.num_perm)[ok]
            h = band_hashes(sig, bands, rows)
            kinds.append(np.repeat(np.arange(1, bands + 1, dtype=np.int16)[None, :], len(doc_id), 0).ravel())
            keys.append(h.ravel())
            ids.append(np.repeat(doc_id, bands))
    if not ids:
        return pa.table({"part": pa.array([], pa.int32()), "kind": [], "key": [], "doc_id": []}).cast(
            pa.schema(
                [("part", pa.int32()), ("kind", pa.int16()), ("key", pa.uint64()), ("doc_id", pa.int64())]
            )
        )
    kind, key, doc = np.concatenate(kinds), np.concatenate(keys), np.concatenate(ids)
    with np.errstate(over="ignore"):
        part = (_mix64(key ^ (kind.astype(np.uint64) * _GOLDEN)) % np.uint64(partitions)).astype(np.int32)
    return pa.table({"part": part, "kind": kind, "key": key, "doc_id": doc})


def bucket_edges(t: pa.Table) -> pa.Table:
    """Ray Data map_groups over one partition: candidate edges (a < b) of its multi-document buckets."""
    kind = t.column("kind").to_numpy()
    key = t.column("key").to_numpy()
    doc = t.column("doc_id").to_numpy()
    order = np.lexsort((doc, key, kind))
    kind, key, doc = kind[order], key[order], doc[order]
    n = len(doc)
    starts = (
        np.flatnonzero(np.r_[True, (kind[1:] != kind[:-1]) | (key[1:] != key[:-1])])
        if n
        else np.zeros(0, int)
    )
    sizes = np.diff(np.r_[starts, n])
    a_out, b_out, exact_out = [], [], []
    for s, size in zip(starts[sizes > 1].tolist(), sizes[sizes > 1].tolist()):
        members = doc[s : s + size]
        if kind[s] == 0:
            a_out.append(np.full(size - 1, members[0]))
            b_out.append(members[1:])
            exact_out.append(np.ones(size - 1, bool))
            continue
        for j in range(1, size):
            earlier = members[: min(j, EDGE_FANOUT)]
            a_out.append(earlier)
            b_out.append(np.full(len(earlier), members[j]))
            exact_out.append(np.zeros(len(earlier), bool))
    if not a_out:
        return pa.table(
            {"a": pa.array([], pa.int64()), "b": pa.array([], pa.int64()), "exact": pa.array([], pa.bool_())}
        )
    return pa.table(
        {"a": np.concatenate(a_out), "b": np.concatenate(b_out), "exact": np.concatenate(exact_out)}
    )


def candidate_params(threshold: float, num_perm: int, recall: float) -> tuple[int, int]:
    """(bands, rows): the most rows per band (fewest candidates) whose LSH still makes a pair with Jaccard
    similarity `threshold` a candidate with probability >= `recall`: 1 - (1 - t^r)^b, b = num_perm // r."""
    for rows in range(num_perm, 0, -1):
        bands = num_perm // rows
        if 1 - (1 - threshold**rows) ** bands >= recall:
            return bands, rows
    return num_perm, 1


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Jaccard similarity of two sets of shingle hashes (each a unique, sorted array)."""
    inter = len(np.intersect1d(a, b, assume_unique=True))
    union = len(a) + len(b) - inter
    return inter / union if union else 1.0


def _shingle_sets(store: Store, ids: np.ndarray) -> dict[int, np.ndarray]:
    """Unique sorted shingle hashes of the given documents, read block by block."""
    out: dict[int, np.ndarray] = {}
    for o in np.unique(ids >> 32).tolist():
        t = read_clean(store, o, ["doc_id", "shingles"])
        doc = t.column("doc_id").to_numpy()
        col = t.column("shingles").combine_chunks()
        values, offsets = col.values.to_numpy(), col.offsets.to_numpy()
        for i in np.flatnonzero(np.isin(doc, ids)).tolist():
            out[int(doc[i])] = np.unique(values[offsets[i] : offsets[i + 1]])
    return out


def components(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(nodes, root of each node) of the graph with edges a-b; a component's root is its smallest node."""
    nodes = np.unique(np.concatenate([a, b]))
    u, v = np.searchsorted(nodes, a), np.searchsorted(nodes, b)
    label = np.arange(len(nodes))
    while True:
        m = np.minimum(label[u], label[v])
        new = label.copy()
        np.minimum.at(new, u, m)
        np.minimum.at(new, v, m)
        new = new[new]  # pointer jumping
        if np.array_equal(new, label):
            return nodes, nodes[label]
        label = new


def cluster(root: str, cfg: DedupConfig, *edge_tables: pa.Table) -> dict[str, Any]:
    """Ray task (edge tables as arguments, resolved by Ray): verify band edges, connected components, write
    dedup/duplicates.parquet; returns counts."""
    store = Store(root)
    tables = [t for t in edge_tables if t.num_rows]
    edges = (
        pd.concat([t.to_pandas() for t in tables]).drop_duplicates(["a", "b", "exact"])
        if tables
        else pd.DataFrame(
            {"a": np.zeros(0, np.int64), "b": np.zeros(0, np.int64), "exact": np.zeros(0, bool)}
        )
    )
    exact = edges[edges["exact"]]
    near = edges[~edges["exact"]].drop_duplicates(["a", "b"])
    candidates = (
        int(len(np.unique(np.concatenate([near["a"].to_numpy(), near["b"].to_numpy()])))) if len(near) else 0
    )
    if len(near):
        sets = _shingle_sets(store, np.unique(np.concatenate([near["a"], near["b"]])))
        similar = [
            jaccard(sets[a], sets[b]) >= cfg.threshold for a, b in zip(near["a"].tolist(), near["b"].tolist())
        ]
        near = near[np.asarray(similar, dtype=bool)]
    a = np.concatenate([exact["a"].to_numpy(np.int64), near["a"].to_numpy(np.int64)])
    b = np.concatenate([exact["b"].to_numpy(np.int64), near["b"].to_numpy(np.int64)])
    nodes, roots = components(a, b) if len(a) else (np.zeros(0, np.int64), np.zeros(0, np.int64))
    dup = nodes != roots
    exact_first = pd.Series(exact["a"].to_numpy(np.int64), index=exact["b"].to_numpy(np.int64))
    exact_first = exact_first[~exact_first.index.duplicated()]
    ids = nodes[dup]
    is_exact = np.isin(ids, exact_first.index.to_numpy())
    dup_of = np.where(is_exact, exact_first.reindex(ids).fillna(-1).to_numpy(np.int64), roots[dup])
    table = duplicates_table(ids, dup_of, np.where(is_exact, "exact_duplicate", "near_duplicate").tolist())
    store.write_table(DUPLICATES, table)
    return {
        "exact_duplicates": int(is_exact.sum()),
        "near_duplicates": int((~is_exact).sum()),
        "lsh_candidates": candidates,
        "lsh_edges_verified": int(len(near)),
        "cluster_peak_rss_mb": round(peak_rss_mb(), 1),
    }


def duplicates_table(ids, dup_of, reasons) -> pa.Table:
    return pa.table(
        {
            "doc_id": pa.array(ids, pa.int64()),
            "duplicate_of": pa.array(dup_of, pa.int64()),
            "reason": pa.array(reasons, pa.string()),
        }
    )


def empty_duplicates() -> pa.Table:
    return duplicates_table(np.zeros(0, np.int64), np.zeros(0, np.int64), [])


def lsh_params(cfg: DedupConfig) -> tuple[int, int]:
    return candidate_params(cfg.threshold, cfg.num_perm, cfg.candidate_recall)
