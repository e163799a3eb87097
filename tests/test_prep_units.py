"""Preprocessing building blocks without Ray: readers and bad input, normalisation, language ID, quality, PII,
MinHash (datasketch-compatible), dedup decisions, mixture and shard plans."""

from __future__ import annotations

import gzip
import json
import logging
import sys
import unicodedata

import numpy as np
import pyarrow as pa
import pytest

from jobs.platform.configfile import load_config
from jobs.prep import clean, dedup, langid, plan
from jobs.prep.config import (
    LangIdConfig,
    MixtureConfig,
    NormalizeConfig,
    PiiConfig,
    PreprocessConfig,
    QualityConfig,
    ReadConfig,
)
from jobs.prep.sources import Chunk, discover, plan_chunks, read_chunk
from llm_core.config import ConfigError


def cfg_for(tmp_path, sources, **extra):
    data = {
        "name": "t",
        "languages": ["kk", "ru", "en"],
        "sources": sources,
        "tokenizer": {"path": "x"},
        **extra,
    }
    return PreprocessConfig.model_validate(data)


def read_all(cfg, root, chunk_bytes=1 << 30):
    files = discover(cfg, root)
    by_id = {f.file_id: f for f in files}
    docs = [d for c in plan_chunks(files, chunk_bytes) for d in read_chunk(c, by_id[c.file_id], cfg.read)]
    return files, docs


# ---------------------------------------------------------------------------------------------- reading


def test_formats_compression_and_chunking_give_the_same_documents(tmp_path):
    lines = [f"line {i} " + "слово " * (i % 7) for i in range(300)]
    (tmp_path / "a.txt").write_text("\n".join(lines) + "\n")
    with gzip.open(tmp_path / "b.txt.gz", "wt") as f:
        f.write("\n".join(lines))
    with pa.CompressedOutputStream(str(tmp_path / "c.jsonl.zst"), "zstd") as f:
        f.write("".join(json.dumps({"text": x}) + "\n" for x in lines).encode())
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": lines}), tmp_path / "d.parquet")
    cfg = cfg_for(tmp_path, [{"path": str(tmp_path), "language": "kk"}])
    files, docs = read_all(cfg, tmp_path)
    assert [f.format for f in files] == ["txt", "txt", "jsonl", "parquet"]
    assert [f.compression for f in files] == [None, "gzip", "zstd", None]
    texts = [d.text for d in docs]
    assert texts == lines * 4
    # byte-range chunks of a large uncompressed file: same documents, same order, unique ids
    _, small = read_all(cfg, tmp_path, chunk_bytes=1000)
    assert [d.text for d in small] == texts
    assert len({d.doc_id for d in small}) == len(small)
    assert [d.doc_id for d in small] == sorted(d.doc_id for d in small)


def test_blank_line_mode_and_offsets(tmp_path):
    (tmp_path / "p.txt").write_text("first para\nwraps here\n\n\nsecond\n  \nthird\n")
    cfg = cfg_for(tmp_path, [{"path": "p.txt", "language": "en", "txt_mode": "blank_line"}])
    _, docs = read_all(cfg, tmp_path)
    assert [d.text for d in docs] == ["first para\nwraps here", "second", "third"]
    assert [d.offset for d in docs] == [0, 24, 34]


def test_bad_input_is_counted_not_fatal(tmp_path):
    (tmp_path / "utf.txt").write_bytes(b"good line\nbad \xff\xfe line\n")
    (tmp_path / "bin.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "r.jsonl").write_text(
        '{"text": "ok"}\n{"text": broken\n{"title": "x"}\n{"text": null}\n["list"]\n'
    )
    (tmp_path / "notes.csv").write_text("a,b\n")
    (tmp_path / "link.txt").symlink_to(tmp_path / "nowhere")
    big = b"x" * 3000 + b"\nshort tail line\n"
    (tmp_path / "long.txt").write_bytes(big)
    src = [{"path": str(tmp_path), "language": "en"}, {"path": "missing_dir/*.txt", "language": "en"}]
    cfg = cfg_for(tmp_path, src, read={"max_doc_bytes": 1000})
    files, docs = read_all(cfg, tmp_path, chunk_bytes=700)
    status = {f.uri.rsplit("/", 1)[-1]: f.status for f in files}
    assert (
        status["bin.txt"] == "binary"
        and status["empty.txt"] == "empty"
        and status["notes.csv"] == "unsupported"
    )
    assert status["link.txt"] == "unreadable" and status["*.txt"] == "missing"
    by_reason = {}
    for d in docs:
        by_reason.setdefault(d.reason or d.repaired or "ok", []).append(d.text)
    assert by_reason["malformed_json"] == ['{"text": broken']
    assert len(by_reason["missing_text_field"]) == 3
    assert by_reason["too_long"][0].startswith("xxx")
    assert "short tail line" in by_reason["ok"] and "good line" in by_reason["ok"]
    assert by_reason["invalid_utf8"] == ["bad \ufffd\ufffd line"]  # repaired, kept
    skip = cfg.model_copy(
        update={"read": ReadConfig(max_doc_bytes=1000, on_invalid_utf8="skip", on_long_document="truncate")}
    )
    _, docs = read_all(skip, tmp_path, chunk_bytes=700)
    assert any(d.reason == "invalid_utf8" for d in docs)
    trunc = [d for d in docs if d.repaired == "truncated"]
    assert len(trunc) == 1 and trunc[0].text == "x" * 1000 and trunc[0].n_bytes_in == 3000


def test_fifty_megabyte_line_is_read_with_bounded_memory(tmp_path):
    path = tmp_path / "huge.txt"
    with open(path, "wb") as f:
        f.write(b"word " * 10_000_000)  # 50 MB, no newline
        f.write(b"\nthe next line is fine\n")
    cfg = cfg_for(tmp_path, [{"path": "huge.txt", "language": "en"}])
    _, docs = read_all(cfg, tmp_path, chunk_bytes=8 << 20)
    assert [(d.reason, d.n_bytes_in) for d in docs] == [("too_long", 50_000_000), ("", 21)]
    assert docs[1].text == "the next line is fine" and len(docs[0].text) <= 400


# ------------------------------------------------------------------------------------------ normalise


def test_normalize():
    cfg = NormalizeConfig()
    text, fixes = clean.normalize_text(
        "Қазaқстан\u200b  Республикасы\u00a0— ел.\r\n\n\n\nKazakh\u00adstan &amp; co", cfg
    )
    assert text == "Қазақстан Республикасы — ел.\n\nKazakhstan & co" and fixes == 1
    assert (
        clean.normalize_text("Жылы 1999 ж. Word mix: iPhone, eBay", cfg)[0]
        == "Жылы 1999 ж. Word mix: iPhone, eBay"
    )
    assert clean.normalize_text("е\u0301", cfg)[0] == unicodedata.normalize("NFC", "е\u0301")
    assert clean.normalize_text(" \u200b\ufeff ", cfg)[0] == ""


def test_invisible_table_covers_all_control_and_format_characters():
    table = clean._invisible_table()
    every = {cp for cp in range(sys.maxunicode + 1) if unicodedata.category(chr(cp)) in ("Cc", "Cf")}
    assert every - set(table) == {9, 10}


# ------------------------------------------------------------------------------------------- language


def test_language_id_and_routing():
    cfg = LangIdConfig()
    kk = "Қазақстан Республикасы — Орталық Азиядағы мемлекет, астанасы Астана қаласы."
    ru = "Москва является столицей России и крупнейшим по численности населения городом страны."
    en = "The quick brown fox jumps over the lazy dog near the river bank every morning."
    assert (
        langid.detect(kk, cfg)[0] == "kk"
        and langid.detect(ru, cfg)[0] == "ru"
        and langid.detect(en, cfg)[0] == "en"
    )
    outputs = ["kk", "ru", "en"]
    d, c = langid.detect(ru, cfg)
    assert langid.decide("kk", d, c, ru, cfg, outputs) == ("ru", "")  # routed
    drop = cfg.model_copy(update={"on_mismatch": "drop"})
    assert langid.decide("kk", d, c, ru, drop, outputs) == ("kk", "language_mismatch")
    fr = "Le renard brun rapide saute par-dessus le chien paresseux au bord de la rivière."
    d, c = langid.detect(fr, cfg)
    assert d == "fr" and langid.decide("ru", d, c, fr, cfg, outputs)[1] == "language_mismatch"
    assert langid.decide("auto", d, c, fr, cfg, outputs)[1] == "language_other"
    assert langid.detect("Сен қорықпа.", cfg) == ("", 0.0)  # too short to judge
    assert langid.decide("ru", "", 0.0, ":D =)", cfg, outputs) == ("ru", "script_mismatch")


def test_unknown_candidate_is_a_config_error():
    with pytest.raises(ValueError, match="'xx' is not a language lingua knows"):
        langid.check_candidates(LangIdConfig(candidates=["kk", "ru", "en", "xx"]))


# -------------------------------------------------------------------------------------------- quality


@pytest.mark.parametrize(
    "text, reason",
    [
        ("Бұл жақсы құжат, онда бірнеше сөз бар.", ""),
        ("Тым қысқа.", "too_short"),
        ("$$$ ### @@@ %%% ^^^ &&& *** ~~~ +++ === <<< >>>", "symbol_ratio"),
        ("12345 67890 12345 67890 123 456 789 слово", "digit_ratio"),
        ("line one is here\nline one is here\nline one is here\nanother line", "duplicate_lines"),
        ("buy now " * 20, "repeated_ngrams"),
        ("All rights reserved.\nSubscribe to our newsletter\nA real sentence is here.", "boilerplate"),
        (
            "aaaaaaaaaaaaaaaaaaaaaaaaaaaaa bbbbbbbbbbbbbbbbbbbbbbbbb ccccccccccccccccccccccccc",
            "mean_word_length",
        ),
    ],
)
def test_quality(text, reason):
    assert clean.quality_verdict(text, QualityConfig())[1] == reason


def test_boilerplate_lines_removed_from_kept_documents():
    text = "A real sentence about the history of Almaty and its people.\nAll rights reserved.\nAnother real line here."
    out, reason = clean.quality_verdict(text, QualityConfig())
    assert reason == "" and "rights reserved" not in out and "Another real line" in out


# ------------------------------------------------------------------------------------------------ PII


def test_pii_scrubbing():
    text = (
        "Жазыңыз: aigerim.n@mail.kz, тел. +7 (701) 555-12-34 немесе 87015551234, шот KZ86 125K ZT50 0410 0100. "
        "Жылдар 1805 1806 1807, сома 2 000 000 000 теңге, ISBN 978-3-16-148410-0."
    )
    out, counts = clean.scrub_pii(text, PiiConfig())
    assert counts == {"email": 1, "phone": 2, "iban": 1}
    assert "aigerim" not in out and "555-12" not in out and "KZ86" not in out and "8701555" not in out
    assert "1805 1806 1807" in out and "2 000 000 000" in out and "978-3-16-148410-0" in out
    assert out.count("<PHONE>") == 2 and "<EMAIL>" in out and "<IBAN>" in out


# ---------------------------------------------------------------------------------------------- dedup


def test_batched_minhash_equals_datasketch():
    from datasketch import MinHash

    texts = ["a b c d e f g h", "one two", "", "x " * 40000, "қазақ тілі мемлекеттік тіл болып табылады"]
    shingles = [dedup.shingle_hashes(dedup.dedup_words(t), 5) for t in texts]
    sigs = dedup.minhash_signatures(shingles, 64, 7, chunk=1000)
    for sh, sig in zip(shingles, sigs):
        m = MinHash(64, seed=7, hashfunc=lambda x: x, scheme="affine32")
        m.update_batch(sh.tolist())
        assert np.array_equal(sig, m.hashvalues)


def test_find_duplicates_matches_datasketch_lsh():
    from datasketch import MinHash, MinHashLSH

    rng = np.random.default_rng(0)
    vocab = [f"w{i}" for i in range(300)]
    base = [list(rng.choice(vocab, 60)) for _ in range(30)]
    docs = []
    for b in base:  # each base doc, then an edited copy (1-12 words changed), then an exact copy
        docs.append(b)
        e = list(b)
        for j in rng.choice(60, int(rng.integers(1, 13)), replace=False):
            e[j] = "zz"
        docs += [e, list(b)]
    words = [[w.lower() for w in d] for d in docs]
    keys = np.array([dedup.exact_key(w) for w in words], dtype=np.uint64)
    shingles = [dedup.shingle_hashes(w, 5) for w in words]
    sigs = dedup.minhash_signatures(shingles, 128, 1)
    res = dedup.find_duplicates(np.ones(len(docs), bool), keys, sigs, threshold=0.7)
    assert (res.reason == "exact_duplicate").sum() == 30
    # reference: sequential datasketch LSH over kept documents
    b, r = dedup.lsh_params(0.7, 128)
    lsh = MinHashLSH(num_perm=128, params=(b, r))
    seen, expect = set(), []
    for i, sh in enumerate(shingles):
        if int(keys[i]) in seen:
            expect.append("exact_duplicate")
            continue
        seen.add(int(keys[i]))
        m = MinHash(128, seed=1, hashfunc=lambda x: x, scheme="affine32")
        m.update_batch(sh.tolist())
        if any((sigs[k] == sigs[i]).sum() >= 0.7 * 128 for k in lsh.query(m)):
            expect.append("near_duplicate")
            continue
        lsh.insert(i, m)
        expect.append("")
    assert res.reason.tolist() == expect
    assert 0 < expect.count("near_duplicate") < 30


def _clean_blocks(store, words: list[list[str]], per_block: int, num_perm: int = 128) -> list[int]:
    """Minimal clean/<o>.parquet files (the columns dedup reads) holding the given documents in order."""
    from jobs.prep.blocks import CLEAN

    ordinals = []
    for o, s in enumerate(range(0, len(words), per_block)):
        part = words[s : s + per_block]
        shingles = [dedup.shingle_hashes(w, 5) for w in part]
        sig = dedup.minhash_signatures(shingles, num_perm, 1)
        offsets = np.concatenate(([0], np.cumsum([len(x) for x in shingles])))
        store.write_table(
            CLEAN.format(o),
            pa.table(
                {
                    "doc_id": pa.array([(o << 32) | i for i in range(len(part))], pa.int64()),
                    "reason": [""] * len(part),
                    "exact_key": pa.array([dedup.exact_key(w) for w in part], pa.uint64()),
                    "signature": pa.FixedSizeListArray.from_arrays(pa.array(sig.ravel()), num_perm),
                    "shingles": pa.LargeListArray.from_arrays(
                        pa.array(offsets), pa.array(np.concatenate(shingles))
                    ),
                }
            ),
        )
        ordinals.append(o)
    return ordinals


def _distributed_dedup(store, ordinals, cfg, partitions: int = 3) -> dict[int, tuple[str, int]]:
    """jobs.prep.neardup's stages without Ray: keys per block, the hash partitioning done by hand, one cluster."""
    from jobs.prep import neardup
    from jobs.prep.blocks import DUPLICATES

    bands, rows = neardup.lsh_params(cfg)
    keys = pa.concat_tables(
        [
            neardup.emit_keys(pa.table({"ordinal": [o]}), store.root, cfg, bands, rows, partitions)
            for o in ordinals
        ]
    )
    part = keys.column("part").to_numpy()
    edges = [neardup.bucket_edges(keys.filter(pa.array(part == p))) for p in range(partitions)]
    neardup.cluster(store.root, cfg, *edges)
    t = store.read_table(DUPLICATES).to_pylist()
    return {r["doc_id"]: (r["reason"], r["duplicate_of"]) for r in t}


def test_distributed_dedup_matches_sequential_datasketch_lsh(tmp_path):
    """Exact copies, edited copies (1-12 of 60 words changed) and unrelated documents, spread over 4 blocks:
    the distributed stages drop exactly what a sequential datasketch MinHashLSH over kept documents (same bands
    and rows, candidates checked by true Jaccard) drops."""
    from datasketch import MinHash, MinHashLSH

    from jobs.prep import neardup
    from jobs.prep.config import DedupConfig
    from jobs.prep.store import Store

    rng = np.random.default_rng(0)
    vocab = [f"w{i}" for i in range(300)]
    base = [list(rng.choice(vocab, 60)) for _ in range(30)]
    docs = []
    for b in base:  # each base doc, then an edited copy, then an exact copy
        docs.append(b)
        e = list(b)
        for j in rng.choice(60, int(rng.integers(1, 13)), replace=False):
            e[j] = "zz"
        docs += [e, list(b)]
    words = [[w.lower() for w in d] for d in docs]
    store = Store(str(tmp_path / "work"))
    ordinals = _clean_blocks(store, words, per_block=25)
    got = _distributed_dedup(store, ordinals, DedupConfig(threshold=0.7))
    ids = [(o << 32) | i for o in ordinals for i in range(min(25, len(words) - 25 * o))]
    # reference: sequential datasketch LSH over kept documents
    keys = [dedup.exact_key(w) for w in words]
    sets = [np.unique(dedup.shingle_hashes(w, 5)) for w in words]
    lsh = MinHashLSH(num_perm=128, params=neardup.lsh_params(DedupConfig(threshold=0.7)))
    seen, expect = {}, {}
    for i, w in enumerate(words):
        if keys[i] in seen:
            expect[ids[i]] = ("exact_duplicate", ids[seen[keys[i]]])
            continue
        seen[keys[i]] = i
        m = MinHash(128, seed=1, hashfunc=lambda x: x, scheme="affine32")
        m.update_batch(dedup.shingle_hashes(w, 5).tolist())
        match = [k for k in lsh.query(m) if neardup.jaccard(sets[k], sets[i]) >= 0.7]
        if match:
            expect[ids[i]] = ("near_duplicate", ids[min(match)])
            continue
        lsh.insert(i, m)
    assert got == expect
    assert 0 < sum(v[0] == "near_duplicate" for v in expect.values()) < 30


def test_candidate_params_reach_the_recall_asked_for():
    from jobs.prep.neardup import candidate_params

    for t in (0.5, 0.7, 0.8, 0.9):
        b, r = candidate_params(t, 128, 0.995)
        assert b * r <= 128 and 1 - (1 - t**r) ** b >= 0.995
        assert 1 - (1 - t ** (r + 1)) ** (128 // (r + 1)) < 0.995  # the fewest candidates that do
    assert candidate_params(0.8, 128, 0.995) == (21, 6)


def test_distributed_dedup_keeps_the_first_of_a_chain(tmp_path):
    """a~b and b~c but a!~c: the sequential pass keeps a and c (c is compared with kept documents only); the
    connected components keep only a, the one documented difference."""
    from jobs.prep.config import DedupConfig
    from jobs.prep.store import Store

    rng = np.random.default_rng(3)
    a = [f"w{i}" for i in rng.choice(10_000, 100, replace=False)]
    b = a[:88] + [f"x{i}" for i in range(12)]  # J(a,b) 0.78, J(b,c) 0.71, J(a,c) 0.6
    c = a[:76] + [f"x{i}" for i in range(24)]
    store = Store(str(tmp_path / "work"))
    ordinals = _clean_blocks(store, [a, b, c], per_block=2)
    got = _distributed_dedup(store, ordinals, DedupConfig(threshold=0.7))
    from jobs.prep.neardup import jaccard

    sa, sb, sc = (np.unique(dedup.shingle_hashes(w, 5)) for w in (a, b, c))
    assert jaccard(sa, sb) >= 0.7 and jaccard(sb, sc) >= 0.7 and jaccard(sa, sc) < 0.7
    assert got == {1: ("near_duplicate", 0), 1 << 32: ("near_duplicate", 0)}


# ----------------------------------------------------------------------------------------------- plans


def test_mixture_plan_meets_target_and_is_deterministic():
    rng = np.random.default_rng(1)
    n = 3000
    ids = np.arange(n, dtype=np.int64) * 13
    langs = np.array(["kk"] * 400 + ["ru"] * 1800 + ["en"] * 800, dtype=object)
    toks = rng.integers(20, 400, n)
    cfg = MixtureConfig(target={"kk": 0.4, "ru": 0.3, "en": 0.3}, max_epochs=4)
    m = plan.plan_mixture(ids, langs, toks, ["kk", "ru", "en"], cfg)
    got = m.to_dict(["kk", "ru", "en"])["achieved"]
    assert all(abs(got[k] - v) < 0.005 for k, v in cfg.target.items())
    assert (
        m.epochs["kk"] > 1
        and m.epochs["ru"] < 1
        and set(np.unique(m.copies[:400])) <= {int(m.epochs["kk"]), int(m.epochs["kk"]) + 1}
    )
    again = plan.plan_mixture(ids, langs, toks, ["kk", "ru", "en"], cfg)
    assert np.array_equal(m.copies, again.copies)
    with pytest.raises(ValueError, match="more than mixture.max_epochs"):
        plan.plan_mixture(
            ids, langs, toks, ["kk", "ru", "en"], cfg.model_copy(update={"total_tokens": 10**8})
        )


@pytest.mark.parametrize("n,seed", [(3000, 1), (200_000, 2), (40, 3)])
def test_mixture_from_block_histograms_picks_the_documents_plan_mixture_picks(n, seed):
    """The distributed mixture (per-block token histograms, then the cut bucket's documents) gives every
    document the copies the in-memory plan gives it, with blocks seen in any order."""
    rng = np.random.default_rng(seed)
    ids = np.sort(rng.choice(2**40, n, replace=False)).astype(np.int64)
    langs = rng.choice(np.array(["kk", "ru", "en"], dtype=object), n, p=[0.15, 0.6, 0.25])
    toks = rng.integers(1, 500, n)
    cfg = MixtureConfig(target={"kk": 0.4, "ru": 0.3, "en": 0.3}, max_epochs=5, seed=seed)
    want = plan.plan_mixture(ids, langs, toks, ["kk", "ru", "en"], cfg)
    keys = plan.order_key(ids, cfg.seed)
    blocks = np.array_split(rng.permutation(n), 7)
    got = np.zeros(n, np.int64)
    for lang in ("kk", "ru", "en"):
        hist = sum(plan.token_histogram(keys[b][langs[b] == lang], toks[b][langs[b] == lang]) for b in blocks)
        full = int(np.floor(want.epochs[lang] + 1e-12))
        rest = want.planned_tokens[lang] - full * int(hist.sum())
        bucket, before = plan.cut_bucket(hist, rest)
        m = (langs == lang) & (plan.key_bucket(keys) == bucket)
        rule = plan.copy_rule(full, rest, bucket, before, ids[m], keys[m], toks[m])
        sel = langs == lang
        got[sel] = rule.copies(ids[sel], keys[sel])
    assert np.array_equal(got, want.copies)


def test_shard_plan_cuts_by_tokens():
    ids = np.arange(10, dtype=np.int64)
    sp = plan.plan_shards(
        ids,
        np.array(["train"] * 8 + ["val"] * 2, dtype=object),
        np.array(["kk"] * 10, dtype=object),
        np.full(10, 100),
        np.array([2] + [1] * 9),
        ["kk"],
        250,
        0,
    )
    assert sp.shards == [
        ("train", "kk", 0),
        ("train", "kk", 1),
        ("train", "kk", 2),
        ("train", "kk", 3),
        ("val", "kk", 0),
    ]
    assert len(sp.doc_id) == 11 and (sp.doc_id == 0).sum() == 2


# ----------------------------------------------------------------------------------------------- config


def test_config_errors_name_the_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: t\nlanguages: [kk]\nsources: [{path: x, language: ru}]\ntokenizer: {path: t}\n")
    with pytest.raises(ConfigError, match="declares language 'ru'"):
        load_config(PreprocessConfig, p)
    p.write_text(
        "name: t\nlanguages: [kk]\nsources: [{path: x}]\ntokenizer: {}\nmixture: {target: {kk: 0.5}}\n"
    )
    with pytest.raises(ConfigError) as e:
        load_config(PreprocessConfig, p)
    assert "sum to 0.5" in str(e.value) and "tokenizer.path: required but missing" in str(e.value)
    with pytest.raises(ConfigError, match="dedup.treshold: unknown key"):
        load_config(PreprocessConfig, "configs/preprocess/tiny.yaml", ["dedup.treshold=0.5"])


def test_content_hash_ignores_execution_settings():
    cfg = load_config(PreprocessConfig, "configs/preprocess/tiny.yaml")
    same = load_config(PreprocessConfig, "configs/preprocess/tiny.yaml", ["execution.num_workers=1"])
    other = load_config(PreprocessConfig, "configs/preprocess/tiny.yaml", ["dedup.threshold=0.8"])
    assert cfg.content_sha256() == same.content_sha256() != other.content_sha256()


def test_chunk_plan_only_splits_plain_line_files(tmp_path):
    for name in ("a.txt", "b.jsonl"):
        (tmp_path / name).write_bytes(b"x y z\n" * 1000)
    (tmp_path / "c.txt.gz").write_bytes(gzip.compress(b"x y z\n" * 1000))
    (tmp_path / "d.txt.gz").write_bytes(b"not gzip at all\n" * 100)
    cfg = cfg_for(
        tmp_path,
        [
            {"path": str(tmp_path), "language": "en"},
            {"path": str(tmp_path / "a.txt"), "language": "en", "txt_mode": "blank_line"},
        ],
    )
    files = discover(cfg, tmp_path)
    assert len(files) == 4  # a.txt listed once
    assert [f.status for f in files] == ["ok", "ok", "ok", "corrupt"]  # not a gzip stream at all
    chunks = plan_chunks(files, 1000)
    per_file = {f.uri.rsplit("/", 1)[-1]: sum(c.file_id == f.file_id for c in chunks) for f in files}
    assert per_file == {"a.txt": 6, "b.jsonl": 6, "c.txt.gz": 1, "d.txt.gz": 0}
    assert chunks[0] == Chunk(0, 0, 0, 1000)


def test_block_progress_off_a_terminal_logs_plain_lines_with_eta(caplog):
    from jobs.preprocess import BlockProgress

    now = [0.0]
    progress = BlockProgress(6, "pass 3 write", "shard", every_s=10.0, clock=lambda: now[0])
    assert progress.bar is None  # pytest's stderr is not a terminal
    with caplog.at_level(logging.INFO, logger="tulpar.preprocess"):
        now[0] = 1.0
        progress.advance()  # under 10 s since the start: no line
        now[0] = 12.0
        progress.advance(2)
        now[0] = 13.0
        progress.advance(2)  # 1 s after the last line: none
        now[0] = 14.0
        progress.advance()  # the last block: always a line
        progress.close()
    assert [r.getMessage() for r in caplog.records] == [
        "pass 3 write:  50% 3/6 [00:12<00:12,  4.00s/shard]",
        "pass 3 write: 100% 6/6 [00:14<00:00,  2.33s/shard]",
    ]
