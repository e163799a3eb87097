"""The per-document preprocessing functions made fast for issue 15 give the results of the straightforward
per-character / per-word code they replaced (kept here as the reference), and the fastText language ID is
built deterministically and routes FLORES-200 sentences right."""

from __future__ import annotations

import html
import re
import sys
import unicodedata
import zlib

import numpy as np
import pytest

from jobs.prep import clean, dedup, langid
from jobs.prep.config import LangIdConfig, NormalizeConfig, PiiConfig, QualityConfig
from tests.conftest import DATA, REPO

# ------------------------------------------------------------------------------- references (the old code)


def ref_normalize(text: str, cfg: NormalizeConfig) -> tuple[str, int]:
    cyr = r"\u0400-\u04ff\u0500-\u052f"
    latin = re.compile(r"[A-Za-z\u0259\u018f\u0275\u019f]")
    if cfg.unescape_html and "&" in text:
        text = html.unescape(text)
    text = unicodedata.normalize(cfg.unicode_form, text)
    if cfg.remove_invisible:
        text = text.translate(clean._invisible_table())
    fixes = 0
    if cfg.fix_lookalikes and latin.search(text) and re.search(f"[{cyr}]", text):
        table = {ord(k): v for k, v in cfg.lookalikes.items()}

        def fix(m: re.Match) -> str:
            nonlocal fixes
            word = m.group(0)
            if not latin.search(word):
                return word
            new = word.translate(table)
            if latin.search(new):
                return word
            fixes += sum(a != b for a, b in zip(word, new))
            return new

        text = re.sub(rf"\w*[{cyr}]\w*", fix, text)
        if fixes:
            text = unicodedata.normalize(cfg.unicode_form, text)
    if cfg.collapse_whitespace:
        text = re.sub(r"[ \t\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]+", " ", text)
        text = re.sub(r" ?\n ?", "\n", text)
        text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip(), fixes


def ref_quality_stats(text: str) -> clean.QualityStats:
    words = re.findall(r"\S+", text)
    word_chars = sum(len(w) for w in words)
    digits = symbols = 0
    for ch in text:
        if ch.isdigit():
            digits += 1
        elif not ch.isalnum() and not ch.isspace() and ch not in clean._PUNCT_OK:
            symbols += 1
    symbols += text.count("...")
    alpha = sum(1 for w in words if any(c.isalpha() for c in w))
    alnum = sum(1 for w in words if any(c.isalnum() for c in w))
    lines = [ln.strip() for ln in text.split("\n") if ln.strip()]
    lowered = [w.lower() for w in words]
    return clean.QualityStats(
        chars=len(text),
        words=len(words),
        mean_word_length=word_chars / len(words) if words else 0.0,
        symbol_ratio=symbols / word_chars if word_chars else 0.0,
        digit_ratio=digits / word_chars if word_chars else 0.0,
        alpha_word_ratio=alpha / alnum if alnum else 0.0,
        duplicate_line_ratio=(len(lines) - len(set(lines))) / len(lines) if lines else 0.0,
        top_ngram_ratio=clean._top_repeated_ngram_ratio(lowered, 2, word_chars),
        duplicate_ngram_ratio=clean._duplicate_ngram_ratio(lowered, 5, word_chars),
    )


def ref_shingles(words: list[str], n: int) -> np.ndarray:
    if not words:
        return np.zeros(0, dtype=np.uint32)
    wh = dedup._fmix32(np.array([zlib.crc32(w.encode("utf-8")) for w in words], dtype=np.uint32))
    k = min(n, len(words))
    m = len(words) - k + 1
    acc = np.zeros(m, dtype=np.uint32)
    for i in range(k):
        acc = acc + wh[i : i + m] * dedup._MULT[i]
        acc = (acc << np.uint32(5)) | (acc >> np.uint32(27))
    return dedup._fmix32(acc ^ np.uint32(k))


EDGE_CASES = [
    "",
    "   ",
    "Привет,\u00a0\u00a0мир!\r\n\n\n\nЕщё  строка\t\tс  табами. \n Конец ",
    "Kазақстан Pеспубликасы — мемлекет. Cөз HTML&amp;CSS кoд: x86_64, Python3, ABCабв",
    "Superscripts ² ³ and ½ ⅓, Roman Ⅻ, circled ① digits, Arabic ٣ and Devanagari ३ numbers 12345.",
    "Symbols #$%^&*_+=<>|~`@ and emoji 😀🚀 and ... ellipses... and — dashes – «ёлочки» „quotes“.",
    "Zero\u200bwidth\u00adsoft\ufeffBOM\u0007bell\ufffdreplacement and \U000e0041 tag chars.",
    "repeat repeat repeat repeat " * 20 + "\nline\nline\nline",
    "Call +7 (701) 123-45-67 or 8 777 123 4567, mail aigerim.nurlanova@mail.kz, IBAN KZ86 125K ZT50 0410 0100.",
    "Numbers 2 000 000 000 and 1805 1806 1807 and 555-12-34 are not all phones; ²²²²²²²²²²² neither.",
    "one space \n two\n\n\nthree\u3000four\u202ffive\u2028six\tseven \n",  # each whitespace rule alone
    "Line sep\u2028and para sep\u2029stay; private use \ue000 too",  # not printable, nothing to delete
    "tab\tonly",
    "printable only, one line",
]


def corpus_sample(n_per_file: int = 150) -> list[str]:
    from llm_core.text import iter_documents, text_files

    root = DATA / "corpus"
    if not root.is_dir():
        pytest.skip(f"TULPAR_DATA={DATA} has no corpus/")
    docs = []
    for f in text_files(root):
        for i, doc in enumerate(iter_documents(f, txt_mode="auto")):
            if i >= n_per_file:
                break
            docs.append(doc)
    return docs


# ---------------------------------------------------------------------------------------------- tests


def test_regex_classes_equal_the_str_predicates_on_every_code_point():
    digit, symbol, alpha_word, alnum_word = clean._quality_res()
    letters = clean.letter_runs()
    invisible = clean._invisible_re()
    drop = clean._invisible_table()
    bad = []
    for cp in range(sys.maxunicode + 1):
        if 0xD800 <= cp <= 0xDFFF:
            continue
        c = chr(cp)
        got = (
            bool(digit.fullmatch(c)),
            bool(symbol.fullmatch(c)),
            bool(alpha_word.fullmatch(c)) if not c.isspace() else False,
            bool(alnum_word.fullmatch(c)) if not c.isspace() else False,
            bool(letters.fullmatch(c)),
            bool(invisible.fullmatch(c)),
        )
        want = (
            c.isdigit(),
            not c.isalnum() and not c.isspace() and c not in clean._PUNCT_OK,
            c.isalpha(),
            c.isalnum(),
            c.isalpha(),
            cp in drop,
        )
        if got != want:
            bad.append((hex(cp), got, want))
    assert not bad, bad[:10]


def test_normalize_quality_and_pii_equal_the_reference_on_corpus_text():
    ncfg, qcfg, pcfg = NormalizeConfig(), QualityConfig(), PiiConfig()
    docs = corpus_sample() + EDGE_CASES
    for text in docs:
        assert clean.normalize_text(text, ncfg) == ref_normalize(text, ncfg), text[:80]
        normal, _ = clean.normalize_text(text, ncfg)
        assert clean.quality_stats(normal) == ref_quality_stats(normal), normal[:80]
        long_enough = ref_quality_stats(normal).words >= qcfg.repetition_min_words
        fast = clean.quality_stats(normal, qcfg.repetition_min_words)
        if not long_enough:  # the n-gram ratios are skipped where the filters do not read them
            assert fast.top_ngram_ratio == fast.duplicate_ngram_ratio == 0.0
    # PII: scanning is skipped below 10 (phone) / 8 (IBAN) digits; same replacements and counts as scanning
    for text in docs + [e.replace("1", "") for e in EDGE_CASES]:
        got = clean.scrub_pii(text, pcfg)
        counts = {"email": 0, "phone": 0, "iban": 0}
        want = text
        if "@" in want:
            want, counts["email"] = clean.EMAIL_RE.subn(pcfg.email, want)

        def iban(m, counts=counts):
            raw = m.group(0).replace(" ", "")
            if 15 <= len(raw) <= 34 and clean._digits(raw) >= 8:
                counts["iban"] += 1
                return pcfg.iban
            return m.group(0)

        def phone(m, counts=counts):
            if clean._plausible_phone(m.group(0)):
                counts["phone"] += 1
                return pcfg.phone
            return m.group(0)

        want = clean.PHONE_RE.sub(phone, clean.IBAN_RE.sub(iban, want))
        assert got == (want, counts), text[:80]


def test_batched_shingles_equal_the_per_document_loop():
    docs = corpus_sample(40) + EDGE_CASES
    words = [dedup.dedup_words(t) for t in docs]
    for n in (1, 3, 5):
        flat, counts = dedup.batch_shingle_hashes(words, n, dedup.WordHashes())
        want = [ref_shingles(w, n) for w in words]
        assert counts.tolist() == [len(s) for s in want]
        assert np.array_equal(flat, np.concatenate(want))
        sigs = dedup.batch_minhash_signatures(flat, counts, 64, 3, chunk=500)
        assert np.array_equal(sigs, dedup.minhash_signatures(want, 64, 3))


@pytest.fixture(scope="module")
def small_fasttext(tmp_path_factory):
    """A fastText language ID trained on 300k characters per language of the shared corpora."""
    if not (DATA / "corpus").is_dir():
        pytest.skip(f"TULPAR_DATA={DATA} has no corpus/")
    cfg = LangIdConfig(method="fasttext", fasttext_train_chars=300_000)
    home = tmp_path_factory.mktemp("home")
    return cfg, home, langid.fasttext_model(cfg, DATA, home)


def test_fasttext_model_is_built_once_deterministically(small_fasttext, tmp_path):
    cfg, home, model = small_fasttext
    assert model.path.is_file() and model.path.parent.parent == home / "langid"
    assert set(model.info["heldout_accuracy"]) == {"kk", "ru", "en"}
    assert min(model.info["heldout_accuracy"].values()) > 0.95
    again = langid.fasttext_model(cfg, DATA, home)  # found, not retrained
    assert again == model and len(list((home / "langid").iterdir())) == 1
    other = langid.fasttext_model(cfg, DATA, tmp_path)  # same data, another home: the same bytes
    assert other.key == model.key and other.info["model_sha256"] == model.info["model_sha256"]
    changed = langid.fasttext_model(cfg.model_copy(update={"fasttext_train_chars": 200_000}), DATA, tmp_path)
    assert changed.key != model.key


def flores_handful(n: int = 6) -> dict[str, tuple[str, list[str]]]:
    out = {}
    for code, lang in (("kaz_Cyrl", "kk"), ("rus_Cyrl", "ru"), ("eng_Latn", "en")):
        path = DATA / "eval" / "parallel" / "flores200_devtest" / f"{code}.devtest"
        if not path.is_file():
            pytest.skip(f"{path} not found")
        out[code] = (lang, path.read_text(encoding="utf-8").splitlines()[:n])
    for line in (
        (REPO / "tests" / "fixtures" / "langid" / "flores200_devtest_other.tsv").read_text().splitlines()
    ):
        code, _, text = line.split("\t")
        out.setdefault(code, ("other", []))[1].append(text)
    return out


def test_flores_sentences_are_routed_right(small_fasttext, monkeypatch):
    """kk/ru/en sentences are kept as their language; the fastText setup routes every other-language sentence
    that lingua alone routes right (lingua alone misses at most one of six per language)."""
    cfg, home, _ = small_fasttext
    monkeypatch.setenv("TULPAR_HOME", str(home))
    monkeypatch.setenv("TULPAR_DATA", str(DATA))
    outputs = ["kk", "ru", "en"]
    right: dict[str, dict[str, list[bool]]] = {}
    for setup in (cfg, LangIdConfig()):  # fastText + lingua, and lingua alone (fb78a74's setup)
        for code, (expected, sentences) in flores_handful().items():
            for text, (detected, conf) in zip(sentences, langid.detect_many(sentences, setup)):
                final, reason = langid.decide("auto", detected, conf, text, setup, outputs)
                ok = (final == expected and not reason) if expected != "other" else bool(reason)
                right.setdefault(setup.method, {}).setdefault(code, []).append(ok)
    for code in ("kaz_Cyrl", "rus_Cyrl", "eng_Latn"):
        assert all(right["fasttext"][code]) and all(right["lingua"][code]), code
    for code, lingua_ok in right["lingua"].items():
        assert sum(lingua_ok) >= len(lingua_ok) - 1, code
        assert all(f or not lg for f, lg in zip(right["fasttext"][code], lingua_ok)), code


def test_fasttext_sources_must_exist(tmp_path):
    cfg = LangIdConfig(method="fasttext", fasttext_sources={"kk": ["nowhere/kk"], "ru": ["corpus/ru"]})
    with pytest.raises(ValueError, match="fasttext_sources.kk: 'nowhere/kk' has no text"):
        langid.fasttext_model(cfg, DATA, tmp_path)


def test_benchmark_table_runs_on_a_small_sample(monkeypatch, tmp_path, small_fasttext):
    """benchmarks/datascale/stages.py end to end on 0.3 MB: every stage gets a row (the figures are not checked)."""
    from benchmarks.datascale import stages as bench
    from llm_core.tokenizer import train_bpe

    _, home, _ = small_fasttext
    tok = tmp_path / "tok"
    train_bpe(corpus_sample(30), 600).save(tok)
    monkeypatch.setenv("TULPAR_HOME", str(home))
    monkeypatch.setenv("TULPAR_DATA", str(DATA))
    argv = ["--mb", "0.3", "--tokenizer", str(tok), "--override", "langid.fasttext_train_chars=300000"]
    args = bench.parse_args(argv)
    args.argv = argv
    section = bench.run(args)
    names = [r.split("|")[1].strip() for r in section.splitlines() if r.startswith("| ")][1:]
    assert names == [
        "tokenizer alone (encode_batch, all documents)",
        "normalize",
        "langid",
        "quality",
        "pii",
        "signature",
        "tokenize",
        "sum of the stages",
        "**chain, batch by batch**",
    ]


def test_fasttext_defers_to_lingua_on_foreign_letters_and_unknown_words(small_fasttext, monkeypatch):
    """fastText's answer needs the language's alphabet (é is not English) and enough known words (per language)."""
    cfg, home, _ = small_fasttext
    monkeypatch.setenv("TULPAR_HOME", str(home))
    monkeypatch.setenv("TULPAR_DATA", str(DATA))
    asked: list[str] = []
    monkeypatch.setattr(langid, "_lingua_detect", lambda text, c: asked.append(text) or ("fr", 0.9))
    plain = "the president of the country was elected yesterday by a very large majority of the people"
    accented = plain.replace("president", "président")
    cfg = cfg.model_copy(update={"fasttext_min_probability": 0.5, "fasttext_min_known_words": {"en": 0.7}})
    assert langid.detect_many([plain, accented], cfg)[0][0] == "en"
    assert asked == [accented]
    asked.clear()
    no_alphabets = cfg.model_copy(update={"fasttext_alphabets": {}})
    assert [d for d, _ in langid.detect_many([plain, accented], no_alphabets)] == ["en", "en"] and not asked
    made_up = plain + " zorblat quuxen fribble snorp"  # 15 of 20 words known (not these 4, nor "elected")
    assert langid.detect_many([made_up], cfg)[0][0] == "en" and not asked
    strict = cfg.model_copy(update={"fasttext_min_known_words": {"en": 0.8}})
    assert langid.detect_many([made_up], strict)[0][0] == "fr" and asked == [made_up]


def test_alphabet_check_looks_only_at_the_languages_own_script():
    cfg = LangIdConfig()
    assert langid._alien_letter("україна її", "ru", cfg)  # ї is Cyrillic, not Russian
    assert not langid._alien_letter("привет google", "ru", cfg)  # Latin words are the script check's business
    assert langid._alien_letter("қазақ", "ru", cfg) and not langid._alien_letter("қазақ әлемі", "kk", cfg)
    assert langid._alien_letter("jalapeño", "en", cfg) and not langid._alien_letter(
        "москва moscow", "en", cfg
    )
    assert not langid._alien_letter("anything", "de", cfg)  # no alphabet configured: no check


def test_batch_counts_equal_the_per_document_scans():
    """charstats counts a batch in one numpy pass; every count equals what the per-document regexes and str
    predicates give, on the corpus and on edge cases (empty texts, lone surrogates, numerics, odd spaces)."""
    from jobs.prep import charstats

    digit_re, symbol_re, alpha_word_re, alnum_word_re = clean._quality_res()
    letters = clean.letter_runs()
    texts = corpus_sample(40) + [
        "",
        " ",
        "a_b __ x² ½ ٣ Ⅻ",
        "\ud800 lone surrogate",
        "  lead  trail  \n\n",
        "слово\u00a0word\u2003три\u3000end",
        "ёЁ ӘәҒғ Ǆǅ ß İ",
        "...!?—«»",
    ]
    head = 50
    got = charstats.batch_counts(texts, head=head)
    for i, text in enumerate(texts):
        words = text.split()
        want = {
            "letters": sum(map(len, letters.findall(text))),
            "digits": len(digit_re.findall(text)),
            "symbols": len(symbol_re.findall(text)),
            "head_letters": sum(map(len, letters.findall(text[:head]))),
            "words": len(words),
            "word_chars": sum(map(len, words)),
            "alpha_words": len(alpha_word_re.findall(text)),
            "alnum_words": len(alnum_word_re.findall(text)),
        }
        assert {k: int(getattr(got, k)[i]) for k in want} == want, repr(text[:80])
        assert got.script_shares(i) == langid.script_shares(text)
    assert charstats.batch_counts([]).letters.size == 0
    # each group alone (what the langid and quality stages ask for) equals the same group counted together
    scripts_only = charstats.batch_counts(texts, head=head, words=False)
    words_only = charstats.batch_counts(texts, scripts=False)
    for name in ("letters", "cyrillic", "latin", "head_letters"):
        assert (
            np.array_equal(getattr(scripts_only, name), getattr(got, name))
            and getattr(words_only, name) is None
        )
    for name in ("digits", "symbols", "words", "word_chars", "alpha_words", "alnum_words"):
        assert (
            np.array_equal(getattr(words_only, name), getattr(got, name))
            and getattr(scripts_only, name) is None
        )


def test_batch_quality_verdicts_equal_one_by_one():
    texts = corpus_sample(40) + [
        "All rights reserved.\nAll rights reserved.\nok",
        "1 2 3 4 5 6 7 8",
        "a a a a a",
    ]
    cfg = QualityConfig()
    assert clean.quality_verdicts(texts, cfg) == [clean.quality_verdict(t, cfg) for t in texts]


def test_stages_on_one_docbatch_equal_stages_on_tables():
    """clean_chunk chains the stages on one DocBatch (Python columns, one table at the end); the result equals
    applying each stage to an Arrow table in turn."""
    import pyarrow as pa

    from jobs.prep import stages
    from jobs.prep.config import PreprocessConfig

    cfg = PreprocessConfig.model_validate(
        {
            "name": "t",
            "languages": ["kk", "ru", "en"],
            "sources": [{"path": "x", "language": "auto"}],
            "tokenizer": {"path": ""},
        }
    )
    texts = corpus_sample(5) + EDGE_CASES + ["All rights reserved.\nAll rights reserved.\nok"]
    n = len(texts)
    t = pa.table(
        {
            "doc_id": pa.array(range(n), pa.int64()),
            "file_id": pa.array([0] * n, pa.int32()),
            "offset": pa.array(range(n), pa.int64()),
            "src_lang": pa.array(["auto"] * n, pa.string()),
            "lang": pa.array(["auto"] * n, pa.string()),
            "text": pa.array(texts, pa.large_string()),
            "n_bytes_in": pa.array([len(x.encode()) for x in texts], pa.int64()),
            "reason": pa.array([""] * n, pa.string()),
            "repaired": pa.array([""] * n, pa.string()),
            "detail": pa.array([""] * n, pa.string()),
        }
    )
    chain = (
        stages.normalize_docs,
        stages.langid_docs,
        stages.quality_docs,
        stages.pii_docs,
        stages.signature_docs,
    )
    one_by_one = t
    for fn in chain:
        one_by_one = fn(one_by_one, cfg)
    batch = stages.DocBatch(t)
    for fn in chain:
        assert fn(batch, cfg) is batch
    together = batch.table()
    assert together.schema == one_by_one.schema and together.equals(one_by_one)
    assert together.column_names == [  # the columns the stages document, in the order they were added
        *(
            "doc_id",
            "file_id",
            "offset",
            "src_lang",
            "lang",
            "text",
            "n_bytes_in",
            "reason",
            "repaired",
            "detail",
        ),
        *("n_fixes", "detected", "confidence", "pii_email", "pii_phone", "pii_iban", "split", "n_bytes"),
        *("n_chars", "exact_key", "snippet", "signature", "shingles"),
    ]
    assert set(together.column("reason").to_pylist()) > {""}  # some documents were dropped on the way
    assert batch.table(drop=("text",)).column_names == [c for c in together.column_names if c != "text"]
