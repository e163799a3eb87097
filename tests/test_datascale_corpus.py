"""The data-at-scale benchmark corpus (benchmarks/datascale): deterministic generation, planted duplicate rates and
Jaccard values recomputed from the written files, the sources snippet as jobs.prep.sources reads it, and the
planted-pair scorer on hand-built decision tables."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from benchmarks.datascale import planted
from benchmarks.datascale.corpus import (
    GenConfig,
    exact_variant,
    generate,
    jaccard,
    load_pools,
    near_variant,
    shingle_set,
)
from jobs.prep.config import SourceSpec
from jobs.prep.dedup import dedup_words, exact_key
from jobs.prep.sources import expand_source

RATES = {"exact_rate": 0.06, "near_rate": 0.08, "near_jaccard": (0.7, 0.95)}


@pytest.fixture(scope="module")
def pools(data_dir):
    return load_pools(data_dir, ("kk", "ru", "en"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, data_dir, pools) -> Path:
    """A ~2 MB corpus in 7 files."""
    out = tmp_path_factory.mktemp("corpus")
    cfg = GenConfig(out=str(out), size_gb=0.002, seed=3, shard_mb=0.25, **RATES)
    generate(cfg, data_dir, pools=pools, log=lambda *_: None)
    return out


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in ("corpus.json", "sources.yaml")
    }


def _records(root: Path) -> dict[tuple[str, int], dict]:
    meta = json.loads((root / "corpus.json").read_text())
    out = {}
    for f in meta["files"]:
        with pa.input_stream(str(root / f["path"]), compression="zstd") as s:
            for r, line in enumerate(s.read().decode("utf-8").splitlines()):
                out[(f["path"], r)] = json.loads(line)
    return out


def test_same_seed_same_bytes_whatever_the_workers(tmp_path, data_dir, pools):
    runs = {}
    for name, seed, workers in (("a", 5, 1), ("b", 5, 2), ("c", 6, 1)):
        cfg = GenConfig(
            out=str(tmp_path / name), size_gb=0.0008, seed=seed, shard_mb=0.1, workers=workers, **RATES
        )
        generate(cfg, data_dir, pools=pools, log=lambda *_: None)
        runs[name] = _digest(tmp_path / name)
    assert len(runs["a"]) == 8  # 7 data files (kk 3, ru 2, en 2) and planted.parquet
    assert runs["a"] == runs["b"]
    assert runs["c"].keys() == runs["a"].keys()
    assert all(runs["c"][k] != runs["a"][k] for k in runs["a"])


def test_planted_rates_and_true_jaccard_match_the_files(corpus):
    meta = json.loads((corpus / "corpus.json").read_text())
    recs = _records(corpus)
    assert len(recs) == meta["docs"] > 1000
    assert [f["path"].split("/")[0] for f in meta["files"]] == ["kk"] * 3 + ["ru"] * 2 + ["en"] * 2
    assert 1.5e6 < meta["uncompressed_bytes"] < 2.5e6
    for (path, r), rec in recs.items():  # ids name the file and record
        assert rec["id"] == f"{path.split('.')[0]}:{r}"
    truth = pq.read_table(corpus / "planted.parquet").to_pandas()
    n = len(recs)
    exact, near = truth[truth.kind == "exact"], truth[truth.kind == "near"]
    # a copy whose draw finds no earlier original stays an original: rates are slightly under the configured ones
    assert 0.045 < len(exact) / n <= 0.075
    assert 0.065 < len(near) / n <= 0.095
    assert (truth.copy_file != truth.original_file).sum() > 0.2 * len(truth)
    files = [f["path"] for f in meta["files"]]
    order = {f: i for i, f in enumerate(files)}
    for row in truth.itertuples():
        assert (order[row.original_file], row.original_record) < (order[row.copy_file], row.copy_record)
        a = dedup_words(recs[(row.copy_file, row.copy_record)]["text"])
        b = dedup_words(recs[(row.original_file, row.original_record)]["text"])
        if row.kind == "exact":
            assert exact_key(a) == exact_key(b)
        else:
            assert jaccard(shingle_set(a, 5), shingle_set(b, 5)) == pytest.approx(row.jaccard, abs=1e-12)
    assert (exact.change != "").mean() > 0.6  # most exact copies differ in case/punctuation/spacing
    changed = exact[exact.change != ""]
    assert any(
        recs[(r.copy_file, r.copy_record)]["text"] != recs[(r.original_file, r.original_record)]["text"]
        for r in changed.itertuples()
    )
    # true Jaccard within 0.02 of a target drawn uniformly from the band
    assert (near.jaccard - near.target_jaccard).abs().max() <= 0.02 + 1e-9
    assert near.jaccard.between(0.68, 0.97).all()
    assert 0.25 < (near.jaccard >= 0.8).mean() < 0.75
    langs = pd.Series([r["lang"] for r in recs.values()]).value_counts(normalize=True)
    assert langs[["kk", "ru", "en"]].sum() > 0.93
    assert langs[[x for x in langs.index if "+" in x]].sum() > 0.005  # mixed documents exist


def test_sources_snippet_lists_every_file_through_jobs_prep_sources(corpus, data_dir):
    snippet = yaml.safe_load((corpus / "sources.yaml").read_text())
    meta = json.loads((corpus / "corpus.json").read_text())
    listed = []
    for item in snippet["sources"]:
        spec = SourceSpec(**item)
        files, errors = expand_source(spec, data_dir)
        assert errors == []
        assert all(Path(f).parent.name == spec.language for f, *_ in files)
        listed += [str(Path(f).relative_to(corpus)) for f, *_ in files]
    assert listed == [f["path"] for f in meta["files"]]


def test_parquet_format_has_the_same_planted_structure(tmp_path, data_dir, pools):
    cfg = GenConfig(out=str(tmp_path), size_gb=0.0005, seed=1, shard_mb=0.1, format="parquet", **RATES)
    generate(cfg, data_dir, pools=pools, log=lambda *_: None)
    truth = pq.read_table(tmp_path / "planted.parquet").to_pandas()
    row = truth[truth.kind == "near"].iloc[0]
    copy = pq.read_table(tmp_path / row.copy_file).column("text")[int(row.copy_record)].as_py()
    orig = pq.read_table(tmp_path / row.original_file).column("text")[int(row.original_record)].as_py()
    j = jaccard(shingle_set(dedup_words(copy), 5), shingle_set(dedup_words(orig), 5))
    assert j == pytest.approx(row.jaccard)


def test_variants_keep_words_or_reach_the_target():
    import random

    text = "Бүгін ауа райы жақсы, күн ашық. Ертең жаңбыр жауады: бұлт көп!\nThe end, really."
    rnd = random.Random(0)
    for _ in range(50):
        v, _ = exact_variant(text, rnd)
        assert dedup_words(v) == dedup_words(text)
    long = " ".join(f"сөз{i}" for i in range(300))
    vocab = ["алма", "жаңа", "word"]
    for target in (0.72, 0.8, 0.9):
        v, j, edits = near_variant(long, target, 5, vocab, rnd)
        assert abs(j - target) <= 0.02 and edits >= 1
        assert j == pytest.approx(jaccard(shingle_set(dedup_words(v), 5), shingle_set(dedup_words(long), 5)))


# ---------------------------------------------------------------------------------------------------------------
# The scorer on hand-built tables


def _hand_corpus(tmp_path: Path) -> Path:
    root = tmp_path / "hand"
    root.mkdir()
    files = ["kk/part-00000.jsonl.zst", "kk/part-00001.jsonl.zst"]
    (root / "corpus.json").write_text(json.dumps({"files": [{"path": f} for f in files]}))
    a, b = files
    truth = pd.DataFrame(
        [  # copy file, copy rec, original file, original rec, kind, jaccard
            (a, 1, a, 0, "near", 0.9),  # found: copy dropped as duplicate of the original
            (b, 0, a, 0, "near", 0.85),  # found: dropped as duplicate of a sibling copy (a:1), same cluster
            (a, 3, a, 2, "near", 0.82),  # missed: kept
            (b, 2, a, 4, "near", 0.95),  # found the other way: the original dropped as duplicate of this copy
            (a, 6, a, 5, "near", 0.88),  # not counted: the original was dropped by a quality filter
            (
                b,
                3,
                a,
                7,
                "near",
                0.75,
            ),  # below the threshold, dropped: counts for precision, not for the recall
            (b, 4, a, 8, "exact", 1.0),  # exact, found
            (
                b,
                5,
                a,
                9,
                "near",
                0.9,
            ),  # dropped as duplicate of an unrelated document: wrong target, not found
        ],
        columns=["copy_file", "copy_record", "original_file", "original_record", "kind", "jaccard"],
    )
    pq.write_table(pa.Table.from_pandas(truth), root / "planted.parquet")
    return root


def _decisions(root: Path, rows: list[tuple]) -> pd.DataFrame:
    return pd.DataFrame(
        rows, columns=["file", "record", "reason", "duplicate_of_file", "duplicate_of_record"]
    ).astype({"duplicate_of_record": "Int64"})


def test_scorer_counts_found_missed_and_wrong_targets(tmp_path):
    root = _hand_corpus(tmp_path)
    a = f"{root}/kk/part-00000.jsonl.zst"  # absolute paths, as a job lists local files
    b = "s3://bucket/prefix/kk/part-00001.jsonl.zst"  # URIs resolve by their corpus-relative suffix
    rows = [
        (a, 0, "", None, None),
        (a, 1, "near_duplicate", a, 0),
        (b, 0, "near_duplicate", a, 1),
        (a, 2, "", None, None),
        (a, 3, "", None, None),
        (a, 4, "near_duplicate", b, 2),
        (b, 2, "", None, None),
        (a, 5, "quality", None, None),
        (a, 6, "", None, None),
        (a, 7, "", None, None),
        (b, 3, "near_duplicate", a, 7),
        (a, 8, "", None, None),
        (b, 4, "exact_duplicate", a, 8),
        (a, 9, "", None, None),
        (b, 5, "near_duplicate", a, 10),
        (a, 10, "", None, None),
        (a, 11, "", None, None),
        (b, 6, "near_duplicate", a, 11),  # not planted at all: a false positive (or an accidental duplicate)
    ]
    r = planted.score_tables(root, _decisions(root, rows), threshold=0.8, verify=False)
    assert r["recall_near_at_threshold"] == {"pairs": 5, "found": 3, "recall": 0.6}
    assert r["recall_near_below_threshold"] == {"pairs": 1, "found": 1, "recall": 1.0}
    assert r["recall_exact"] == {"pairs": 1, "found": 1, "recall": 1.0}
    assert r["pairs_not_in_dedup"] == 1
    pn = r["precision_near"]
    assert (pn["dropped"], pn["planted"], pn["unexplained"]) == (6, 4, 2)
    assert pn["precision"] == pytest.approx(4 / 6, abs=1e-4)
    assert r["precision_exact"]["precision"] == 1.0
    bands = {x["jaccard"]: (x["found"], x["pairs"]) for x in r["recall_near_by_band"]}
    assert bands["[0.80, 0.85)"] == (0, 1) and bands["[0.90, 0.95)"] == (1, 2)


def test_scorer_fails_closed_on_missing_documents_and_foreign_files(tmp_path):
    root = _hand_corpus(tmp_path)
    a = f"{root}/kk/part-00000.jsonl.zst"
    with pytest.raises(ValueError, match="planted documents have no decision"):
        planted.score_tables(root, _decisions(root, [(a, 0, "", None, None)]), threshold=0.8, verify=False)
    with pytest.raises(ValueError, match="not a file of the corpus"):
        planted.score_tables(
            root, _decisions(root, [("/elsewhere/x.jsonl", 0, "", None, None)]), threshold=0.8, verify=False
        )


def test_reference_dedup_finds_no_accidental_duplicates_on_the_generated_corpus(corpus):
    """jobs.prep.dedup over the 2 MB corpus: every exact copy found, every near drop a planted one."""
    files = planted.FileIndex(corpus, planted.corpus_files(corpus))
    table = planted.reference_decisions(
        corpus, files, threshold=0.8, num_perm=128, ngram=5, log=lambda *_: None
    )
    r = planted.score_tables(corpus, table, threshold=0.8, verify=True)
    assert r["recall_exact"]["recall"] == 1.0
    assert r["precision_near"]["precision"] == 1.0 and r["precision_exact"]["precision"] == 1.0
    assert r["verified"]["precision_near"]["wrong"] == 0
    assert r["recall_near_by_band"][-1]["recall"] >= 0.9  # the near copies far above the threshold


def test_datatrove_outputs_become_decisions_with_the_kept_cluster_member(tmp_path):
    """datatrove's exclusion files and kept ids -> the documents schema (without running datatrove)."""
    from benchmarks.datascale.datatrove_peer import write_decisions

    root = _hand_corpus(tmp_path)
    (root / "corpus.json").write_text(
        json.dumps({"config": {"format": "jsonl.zst"}, "files": [{"path": "kk/part-00000.jsonl.zst"}]})
    )
    work = tmp_path / "work"
    for sub in ("lang_removed", "dedup_removed", "kept"):
        (work / sub).mkdir(parents=True)
    (work / "lang_removed" / "00000.jsonl").write_text(
        json.dumps({"id": "kk/part-00000:3", "metadata": {}}) + "\n"
    )
    (work / "dedup_removed" / "00000.jsonl").write_text(
        json.dumps({"id": "kk/part-00000:1", "metadata": {"minhash_cluster_id": 7}}) + "\n"
    )
    (work / "kept" / "00000.tsv").write_text("kk/part-00000:0\t7\nkk/part-00000:2\t-1\n")
    counts = write_decisions(root, work)
    assert counts == {"documents": 4, "dropped_language": 1, "dropped_near": 1, "kept": 2}
    t = pq.read_table(work / "documents" / "part-0.parquet").to_pandas().sort_values("record")
    f = f"{root.resolve()}/kk/part-00000.jsonl.zst"
    assert t.record.tolist() == [0, 1, 2, 3]
    assert t.reason.tolist() == ["", "near_duplicate", "", "language"]
    assert (t.file == f).all()
    assert t.duplicate_of_file.tolist()[1] == f and t.duplicate_of_record.tolist()[1] == 0
    assert t.duplicate_of_file.isna().tolist() == [True, False, True, True]
