"""Precision and recall of duplicate removal against the pairs planted by `benchmarks.datascale.corpus`.

Input: the generated corpus directory (its `planted.parquet` and `corpus.json`) and per-document decisions, parquet
files with at least the columns `file` (the input path or URI as the preprocessing job saw it), `record` (0-based
record index in the file: line for jsonl, row for parquet), `reason` ("" kept, "exact_duplicate",
"near_duplicate", or another drop reason), `duplicate_of_file` and `duplicate_of_record` (null unless a
duplicate) - what jobs.preprocess writes under `<dataset_dir>/documents/*.parquet`.

Planted clusters are an original with its copies. Only pairs where both documents reached deduplication count
(neither was dropped for another reason, e.g. a quality filter); every planted document must have a decision.

- recall (near, at the threshold): planted near pairs with true shingle Jaccard >= threshold whose copy was
  dropped as a duplicate of a document of its own planted cluster (directly or through a chain of
  duplicate_of), or whose original was dropped as a duplicate of that copy (a job that keeps any member of a
  cluster, e.g. datatrove), over all such pairs. The same for exact pairs; per Jaccard band for the whole near range.
- precision (near): documents dropped as near_duplicate that are in a planted cluster and whose duplicate_of is in
  that cluster, over all documents dropped as near_duplicate (the same for exact_duplicate). A drop with a null
  duplicate_of counts when the document is in a planted cluster (`target_unknown` says how many).
- `--verify`: the drops no planted cluster explains are read back from the corpus and their true Jaccard with
  their duplicate_of is computed: accidental duplicates of the recombined corpus (>= threshold) are told apart from
  wrong decisions.

`reference` runs today's exact + MinHash-LSH decisions (jobs.prep.dedup, num_perm 128, seed 1) over the whole
corpus in input order, writes them in the schema above and scores them: the accidental duplicate rate of a corpus.

    python -m benchmarks.datascale.planted score --corpus /tmp/corpus --documents $TULPAR_HOME/datasets/x/documents
    python -m benchmarks.datascale.planted reference --corpus /tmp/corpus --out /tmp/corpus-ref --verify
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DUP_REASONS = ("exact_duplicate", "near_duplicate")
REQUIRED = ("file", "record", "reason", "duplicate_of_file", "duplicate_of_record")
BANDS = (0.0, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0001)


def corpus_files(corpus: Path) -> list[str]:
    """The corpus's files (relative to it) in input order, from corpus.json."""
    meta = corpus / "corpus.json"
    if not meta.is_file():
        raise ValueError(
            f"{meta} not found: --corpus must be a directory written by benchmarks.datascale.corpus"
        )
    return [f["path"] for f in json.loads(meta.read_text(encoding="utf-8"))["files"]]


class FileIndex:
    """Maps the file strings of a decisions table (absolute paths, file:// or s3:// URIs) to corpus files."""

    def __init__(self, corpus: Path, rel_files: list[str]):
        self.rel = rel_files
        self.index = {r: i for i, r in enumerate(rel_files)}
        self.root = os.path.realpath(corpus)

    def lookup(self, name) -> int:
        if not isinstance(name, str):  # null (None, NaN)
            return -1
        s = name[len("file://") :] if name.startswith("file://") else name
        if s in self.index:
            return self.index[s]
        if s.startswith("/"):
            rel = os.path.relpath(os.path.realpath(s), self.root)
            if rel in self.index:
                return self.index[rel]
        for r, i in self.index.items():  # s3://bucket/prefix/kk/part-00001.jsonl.zst
            if s.endswith("/" + r):
                return i
        raise ValueError(
            f"decision for {name!r}, which is not a file of the corpus {self.root}: wrong --corpus?"
        )

    def keys(self, names, records) -> np.ndarray:
        uniq: dict = {}
        for n in names:
            if n not in uniq and not (isinstance(n, float) and n != n):
                uniq[n] = self.lookup(n)
        ids = np.fromiter((uniq.get(n, -1) for n in names), dtype=np.int64, count=len(names))
        rec = np.asarray(records, dtype=np.float64)  # nullable ints arrive as floats with NaN
        out = (ids << 32) + np.where(np.isnan(rec), 0, rec).astype(np.int64)
        return np.where((ids < 0) | np.isnan(rec), -1, out)


def key_of(file_idx: np.ndarray, record: np.ndarray) -> np.ndarray:
    return (np.asarray(file_idx, dtype=np.int64) << 32) + np.asarray(record, dtype=np.int64)


def read_decisions(path: Path):
    """Decisions from a dataset dir (its documents/*.parquet), a directory of parquet files or one file."""
    import pyarrow.dataset as ds

    if path.is_dir() and (path / "documents").is_dir():
        path = path / "documents"
    if not path.exists():
        raise ValueError(
            f"no decisions at {path}: pass a dataset dir with documents/*.parquet or a parquet file"
        )
    table = ds.dataset(str(path), format="parquet").to_table()
    missing = [c for c in REQUIRED if c not in table.column_names]
    if missing:
        raise ValueError(f"decisions at {path} lack columns {missing} (need {list(REQUIRED)})")
    df = table.select(list(REQUIRED)).to_pandas()
    # a record standing for a file problem (jobs.prep.sources FILE_REASONS) has no record index: not a document
    from jobs.prep.sources import FILE_REASONS

    return df[~(df["record"].isna() & df["reason"].isin(FILE_REASONS))].reset_index(drop=True)


@dataclass
class Truth:
    copy: np.ndarray  # keys
    original: np.ndarray
    kind: np.ndarray  # "exact" | "near"
    jaccard: np.ndarray


def read_truth(corpus: Path, files: FileIndex) -> Truth:
    import pyarrow.parquet as pq

    t = pq.read_table(str(corpus / "planted.parquet")).to_pandas()
    fi = {r: i for i, r in enumerate(files.rel)}
    return Truth(
        key_of(t.copy_file.map(fi).to_numpy(), t.copy_record.to_numpy()),
        key_of(t.original_file.map(fi).to_numpy(), t.original_record.to_numpy()),
        t.kind.to_numpy().astype(str),
        t.jaccard.to_numpy(dtype=np.float64),
    )


def _resolve_chain(dup_of: dict[int, int], start: int, cluster: dict[int, int], want: int) -> bool:
    """Whether following duplicate_of from `start` reaches a document of planted cluster `want`."""
    k = start
    for _ in range(64):
        if cluster.get(k) == want:
            return True
        nxt = dup_of.get(k, -1)
        if nxt < 0:
            return False
        k = nxt
    return False


def score(
    truth: Truth, keys: np.ndarray, reasons: np.ndarray, dup_keys: np.ndarray, *, threshold: float
) -> dict:
    """Recall per planted kind and Jaccard band, and precision of the exact/near drops (see the module doc)."""
    reason_of = dict(zip(keys.tolist(), reasons.tolist(), strict=True))
    dup_of = {int(k): int(d) for k, d, r in zip(keys, dup_keys, reasons, strict=True) if r in DUP_REASONS}
    cluster: dict[int, int] = {}  # planted document -> its original's key
    for c, o in zip(truth.copy.tolist(), truth.original.tolist(), strict=True):
        cluster[c] = o
        cluster[o] = o
    absent = [k for k in cluster if k not in reason_of]
    if absent:
        raise ValueError(
            f"{len(absent)} planted documents have no decision (e.g. file #{absent[0] >> 32} record "
            f"{absent[0] & 0xFFFFFFFF}): the decisions must cover every input document"
        )
    in_dedup = {k: reason_of[k] in ("",) + DUP_REASONS for k in cluster}
    alive_members: dict[int, int] = {}
    for k, ok in in_dedup.items():
        if ok:
            alive_members[cluster[k]] = alive_members.get(cluster[k], 0) + 1
    found = np.zeros(len(truth.copy), dtype=bool)
    eligible = np.zeros(len(truth.copy), dtype=bool)
    target_unknown = 0
    for i, (c, o) in enumerate(zip(truth.copy.tolist(), truth.original.tolist(), strict=True)):
        eligible[i] = in_dedup[c] and alive_members.get(o, 0) >= 2
        if not eligible[i]:
            continue
        if reason_of[c] in DUP_REASONS:
            d = dup_of.get(c, -1)
            target_unknown += d < 0
            found[i] = d < 0 or _resolve_chain(dup_of, d, cluster, o)
        elif reason_of[o] in DUP_REASONS:  # the original dropped in favour of this copy (keep-any clustering)
            found[i] = _resolve_chain(dup_of, dup_of.get(o, -1), {c: 0}, 0)

    def recall(mask: np.ndarray) -> dict:
        m = mask & eligible
        return {
            "pairs": int(m.sum()),
            "found": int(found[m].sum()),
            "recall": _ratio(found[m].sum(), m.sum()),
        }

    near = truth.kind == "near"
    bands = []
    for lo, hi in zip(BANDS[:-1], BANDS[1:], strict=True):
        r = recall(near & (truth.jaccard >= lo) & (truth.jaccard < hi))
        if r["pairs"]:
            bands.append({"jaccard": f"[{lo:.2f}, {min(hi, 1.0):.2f})", **r})

    def precision(reason: str) -> dict:
        sel = [k for k, r in reason_of.items() if r == reason]
        tp = 0
        unexplained = []
        for k in sel:
            ck = cluster.get(k)
            d = dup_of.get(k, -1)
            if ck is not None and (d < 0 or _resolve_chain(dup_of, d, cluster, ck)):
                tp += 1
            else:
                unexplained.append((k, d))
        return {
            "dropped": len(sel),
            "planted": tp,
            "precision": _ratio(tp, len(sel)),
            "unexplained": unexplained,
        }

    return {
        "threshold": threshold,
        "documents": len(keys),
        "dropped_exact": int(sum(r == "exact_duplicate" for r in reasons)),
        "dropped_near": int(sum(r == "near_duplicate" for r in reasons)),
        "planted_pairs": len(truth.copy),
        "pairs_not_in_dedup": int((~eligible).sum()),
        "recall_near_at_threshold": recall(near & (truth.jaccard >= threshold)),
        "recall_near_below_threshold": recall(near & (truth.jaccard < threshold)),
        "recall_exact": recall(truth.kind == "exact"),
        "recall_near_by_band": bands,
        "precision_near": precision("near_duplicate"),
        "precision_exact": precision("exact_duplicate"),
        "target_unknown": target_unknown,
    }


def _ratio(a, b) -> float | None:
    return round(float(a) / float(b), 4) if b else None


# ---------------------------------------------------------------------------------------------------------------
# Reading documents back (verification, reference run)


def iter_texts(path: Path):
    """(record, text) of one corpus file."""
    if path.name.endswith(".parquet"):
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(str(path))
        r = 0
        for batch in pf.iter_batches(columns=["text"], batch_size=8192):
            for t in batch.column(0).to_pylist():
                yield r, t
                r += 1
        return
    import pyarrow as pa

    with pa.input_stream(str(path), compression="zstd" if path.name.endswith(".zst") else None) as f:
        for r, line in enumerate(f.read().decode("utf-8").splitlines()):
            yield r, json.loads(line)["text"]


def read_texts(corpus: Path, files: FileIndex, keys: set[int]) -> dict[int, str]:
    out: dict[int, str] = {}
    by_file: dict[int, set[int]] = {}
    for k in keys:
        by_file.setdefault(k >> 32, set()).add(k & 0xFFFFFFFF)
    for fi, recs in by_file.items():
        for r, text in iter_texts(corpus / files.rel[fi]):
            if r in recs:
                out[(fi << 32) + r] = text
    return out


def verify_unexplained(corpus: Path, files: FileIndex, result: dict, threshold: float, ngram: int) -> dict:
    """True Jaccard of every drop that no planted cluster explains, with the document it duplicates."""
    from benchmarks.datascale.corpus import jaccard, shingle_set
    from jobs.prep.dedup import dedup_words

    out = {}
    for name in ("precision_near", "precision_exact"):
        pairs = result[name]["unexplained"]
        texts = read_texts(corpus, files, {k for p in pairs for k in p if k >= 0})
        genuine, wrong, values = 0, 0, []
        for k, d in pairs:
            if d < 0:
                wrong += 1
                continue
            j = jaccard(shingle_set(dedup_words(texts[k]), ngram), shingle_set(dedup_words(texts[d]), ngram))
            values.append(round(j, 4))
            genuine += j >= threshold if name == "precision_near" else j == 1.0
            wrong += not (j >= threshold if name == "precision_near" else j == 1.0)
        p = result[name]
        out[name] = {
            "accidental_true_duplicates": genuine,
            "wrong": wrong,
            "precision_vs_true_jaccard": _ratio(p["planted"] + genuine, p["dropped"]),
            "unexplained_jaccard": sorted(values)[:50],
        }
    return out


def reference_decisions(
    corpus: Path, files: FileIndex, *, threshold: float, num_perm: int, ngram: int, log=print
):
    """Today's exact + MinHash-LSH decisions (jobs.prep.dedup.find_duplicates) over the corpus in input order."""
    import pandas as pd

    from jobs.prep.dedup import (
        WordHashes,
        dedup_words,
        exact_key,
        find_duplicates,
        minhash_signatures,
        shingle_hashes,
    )

    keys, sigs, file_col, rec_col = [], [], [], []
    cache = WordHashes()
    t0 = time.perf_counter()
    for fi, rel in enumerate(files.rel):
        batch_sh = []
        for r, text in iter_texts(corpus / rel):
            words = dedup_words(text)
            keys.append(exact_key(words))
            batch_sh.append(shingle_hashes(words, ngram, cache))
            file_col.append(fi)
            rec_col.append(r)
        sigs.append(minhash_signatures(batch_sh, num_perm, 1))
        log(f"  signatures {rel}: {len(batch_sh)} docs ({time.perf_counter() - t0:.0f}s)")
    res = find_duplicates(
        np.ones(len(keys), dtype=bool),
        np.asarray(keys, dtype=np.uint64),
        np.concatenate(sigs),
        threshold=threshold,
    )
    file_arr = np.asarray(file_col)
    rec_arr = np.asarray(rec_col)
    dup = res.duplicate_of
    root = str(Path(corpus).resolve())
    names = [f"{root}/{r}" for r in files.rel]
    return pd.DataFrame(
        {
            "file": [names[i] for i in file_arr],
            "record": rec_arr,
            "reason": res.reason.astype(str),
            "duplicate_of_file": [names[file_arr[d]] if d >= 0 else None for d in dup],
            "duplicate_of_record": pd.array(
                [int(rec_arr[d]) if d >= 0 else None for d in dup], dtype="Int64"
            ),
        }
    )


def score_tables(corpus: Path, decisions, *, threshold: float, verify: bool, ngram: int = 5) -> dict:
    files = FileIndex(corpus, corpus_files(corpus))
    truth = read_truth(corpus, files)
    keys = files.keys(
        decisions["file"].tolist(), decisions["record"].astype("Float64").to_numpy(na_value=np.nan)
    )
    if (keys < 0).any():
        raise ValueError("decisions with a null file or record: every row must name its document")
    dup_keys = files.keys(
        decisions["duplicate_of_file"].tolist(),
        decisions["duplicate_of_record"].astype("Float64").to_numpy(na_value=np.nan),
    )
    result = score(
        truth, keys, decisions["reason"].fillna("").astype(str).to_numpy(), dup_keys, threshold=threshold
    )
    if verify:
        result["verified"] = verify_unexplained(corpus, files, result, threshold, ngram)
    for name in ("precision_near", "precision_exact"):
        u = result[name].pop("unexplained")
        result[name]["unexplained"] = len(u)
        result[name]["unexplained_examples"] = [
            [
                files.rel[k >> 32],
                k & 0xFFFFFFFF,
                files.rel[d >> 32] if d >= 0 else None,
                d & 0xFFFFFFFF if d >= 0 else None,
            ]
            for k, d in u[:5]
        ]
    return result


def format_result(name: str, r: dict) -> str:
    rn, re_, pn, pe = (
        r["recall_near_at_threshold"],
        r["recall_exact"],
        r["precision_near"],
        r["precision_exact"],
    )
    lines = [
        f"{name}: {r['documents']} documents, dropped {r['dropped_exact']} exact + {r['dropped_near']} near duplicates",
        f"  near recall at J >= {r['threshold']}: {rn['found']}/{rn['pairs']} = {rn['recall']}; "
        f"near precision {pn['planted']}/{pn['dropped']} = {pn['precision']}",
        f"  exact recall {re_['found']}/{re_['pairs']} = {re_['recall']}; exact precision "
        f"{pe['planted']}/{pe['dropped']} = {pe['precision']}; pairs outside dedup {r['pairs_not_in_dedup']}",
        "  near recall by true Jaccard: "
        + ", ".join(f"{b['jaccard']} {b['found']}/{b['pairs']}" for b in r["recall_near_by_band"]),
    ]
    if "verified" in r:
        v = r["verified"]["precision_near"]
        lines.append(
            f"  unexplained near drops: {pn['unexplained']} ({v['accidental_true_duplicates']} accidental true "
            f"near-duplicates, {v['wrong']} wrong); precision against true Jaccard {v['precision_vs_true_jaccard']}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("score", help="score a preprocessing run's documents/*.parquet")
    s.add_argument("--documents", required=True, help="dataset dir, documents dir or parquet file")
    r = sub.add_parser("reference", help="decide with jobs.prep.dedup over the corpus, write and score it")
    r.add_argument("--out", required=True, help="writes OUT/documents/part-0.parquet and OUT/score.json")
    r.add_argument("--num-perm", type=int, default=128)
    for q in (s, r):
        q.add_argument("--corpus", required=True, help="directory written by benchmarks.datascale.corpus")
        q.add_argument("--threshold", type=float, default=0.8)
        q.add_argument("--ngram", type=int, default=5)
        q.add_argument(
            "--verify", action="store_true", help="read back unexplained drops, compute true Jaccard"
        )
        q.add_argument("--json", help="also write the result here")
    a = p.parse_args(argv)
    corpus = Path(a.corpus)
    try:
        if a.cmd == "reference":
            files = FileIndex(corpus, corpus_files(corpus))
            t0 = time.perf_counter()
            table = reference_decisions(
                corpus, files, threshold=a.threshold, num_perm=a.num_perm, ngram=a.ngram
            )
            print(f"reference decisions in {time.perf_counter() - t0:.0f}s")
            out = Path(a.out) / "documents"
            out.mkdir(parents=True, exist_ok=True)
            table.to_parquet(out / "part-0.parquet", index=False)
            decisions = table
            a.json = a.json or str(Path(a.out) / "score.json")
        else:
            decisions = read_decisions(Path(a.documents))
        result = score_tables(corpus, decisions, threshold=a.threshold, verify=a.verify, ngram=a.ngram)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_result(a.cmd, result))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
