"""The literal prefilter of the boilerplate regexes (jobs/prep/regex_prefilter.py) never says "cannot match"
where the regex matches: checked against `re` itself on all of Unicode, on random patterns with texts that
match them in every case variant `re` allows, and on the corpus, where it must also skip nearly every text."""

from __future__ import annotations

import random
import re
import sys
from functools import cache

from jobs.prep import clean
from jobs.prep.config import DEFAULT_BOILERPLATE, QualityConfig
from jobs.prep.regex_prefilter import _literal_chars, _matches, prefilter
from tests.test_prep_perdoc import corpus_sample

FLAGS = re.IGNORECASE | re.MULTILINE
EVERY = "".join(map(chr, range(sys.maxunicode + 1)))
# letters whose case variants under re.IGNORECASE are not what str.lower() suggests, and some ordinary ones
TRICKY = "sSſiIıİkKKσςΣµμßẞåÅÅωΩΩвВᲀдДᲁоОᲂтТᲄᲅэЭәӘіІқҚңҢ"


@cache
def variants(ch: str) -> tuple[str, ...]:
    """What `re` with IGNORECASE lets match `ch`, by brute force over all of Unicode."""
    return tuple(sorted(re.compile(re.escape(ch), re.IGNORECASE).findall(EVERY)))


def test_case_variants_equal_a_scan_of_all_unicode():
    chars = _literal_chars(tuple(DEFAULT_BOILERPLATE), FLAGS) | set(TRICKY)
    bad = [(c, _matches(c, FLAGS), variants(c)) for c in sorted(chars) if _matches(c, FLAGS) != variants(c)]
    assert not bad, bad[:5]


def test_needles_of_the_default_patterns():
    pf = prefilter(tuple(DEFAULT_BOILERPLATE), FLAGS)
    assert pf.flat is not None  # every default pattern has a needle: a text without any skips the regex
    assert pf.needles[0] == ("all rights reserved",)
    assert set(pf.needles[2]) == {"privacy policy", "terms of "}
    assert "подписывайтесь" in pf.needles[5]
    # case variants re folds differently from str.lower(): long s, dotless i, the dot of İ, old Cyrillic forms
    assert pf.table[ord("ſ")] == "s" and pf.table[ord("ı")] == "i" and pf.table[0x307] is None
    assert pf.table[0x1C80] == "в"


def _case_variant(text: str, rng: random.Random) -> str:
    return "".join(rng.choice(variants(c)) if c.isalpha() else c for c in text)


def test_case_variants_of_each_boilerplate_phrase_pass_the_prefilter():
    rng = random.Random(0)
    pf = prefilter(tuple(DEFAULT_BOILERPLATE), FLAGS)
    rx = clean._boilerplate_re(tuple(DEFAULT_BOILERPLATE))
    phrases = [
        "All rights reserved",
        "We use cookies. Accept",
        "Privacy Policy",
        "terms of service",
        "Subscribe to our newsletter",
        "like us on facebook",
        "Все права защищены",
        "Подписывайтесь на канал",
        "Читайте также",
        "Барлық құқықтар қорғалған",
        "Толығырақ",
        "Please enable JavaScript",
        "JavaScript қосыңыз",
    ]
    checked = 0
    for phrase in phrases:
        for _ in range(60):
            text = f"Текст.\n{_case_variant(phrase, rng)}\nΑΣ end"
            if rx.search(text):  # some variants are not matches (e.g. \b next to a letter re calls non-word)
                checked += 1
                assert pf.may_match(text), text
    assert checked > 0.9 * 60 * len(phrases)


# -------------------------------------------------------------------------------------- random patterns

ALPHABET = "abksiorвдотэқ ſıİKΣσς.-"


def _random_pattern(rng: random.Random, depth: int = 0) -> list:
    """A small regex AST: ("lit", s) | ("cls", s) | ("any",) | ("alt", [seq...]) | ("rep", seq, lo, hi) |
    ("at", r"\\b")."""
    seq = []
    for _ in range(rng.randint(1, 4)):
        kind = rng.random()
        if kind < 0.45:
            seq.append(("lit", "".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 6)))))
        elif kind < 0.55:
            seq.append(("cls", "".join(rng.sample(ALPHABET, 3))))
        elif kind < 0.62:
            seq.append(("any",))
        elif kind < 0.72:
            seq.append(("at", r"\b"))
        elif kind < 0.86 and depth < 2:
            seq.append(("alt", [_random_pattern(rng, depth + 1) for _ in range(rng.randint(2, 3))]))
        elif depth < 2:
            lo = rng.randint(0, 2)
            seq.append(("rep", _random_pattern(rng, depth + 1), lo, lo + rng.randint(0, 2)))
    return seq


def _to_regex(seq: list) -> str:
    out = []
    for node in seq:
        if node[0] == "lit":
            out.append(re.escape(node[1]))
        elif node[0] == "cls":
            out.append("[" + "".join(re.escape(c) for c in node[1]) + "]")
        elif node[0] == "any":
            out.append(".")
        elif node[0] == "at":
            out.append(node[1])
        elif node[0] == "alt":
            out.append("(?:" + "|".join(_to_regex(s) for s in node[1]) + ")")
        else:
            out.append("(?:" + _to_regex(node[1]) + f"){{{node[2]},{node[3]}}}")
    return "".join(out)


def _sample(seq: list, rng: random.Random) -> str:
    """A string the AST's regex is meant to match (with random case variants); \\b may still refuse it."""
    out = []
    for node in seq:
        if node[0] == "lit":
            out.append(_case_variant(node[1], rng))
        elif node[0] == "cls":
            out.append(_case_variant(rng.choice(node[1]), rng))
        elif node[0] == "any":
            out.append(rng.choice("xY7 "))
        elif node[0] == "alt":
            out.append(_sample(rng.choice(node[1]), rng))
        elif node[0] == "rep":
            out.append("".join(_sample(node[1], rng) for _ in range(rng.randint(node[2], node[3]))))
    return "".join(out)


def test_random_patterns_never_miss_a_match():
    rng = random.Random(1)
    matched = skipped = 0
    for _ in range(300):
        asts = [_random_pattern(rng) for _ in range(rng.randint(1, 3))]
        patterns = tuple(_to_regex(a) for a in asts)
        pf = prefilter(patterns, FLAGS)
        rxs = [re.compile(p, FLAGS) for p in patterns]
        for _ in range(20):
            text = rng.choice(["", "Ab ", "ΑΣ ", "x\n"]) + _sample(_random_pattern(rng), rng)
            if rng.random() < 0.7:  # mostly texts with a sample of one of the patterns in them
                text += (
                    rng.choice(["", " ", "Σ"]) + _sample(rng.choice(asts), rng) + rng.choice(["", " ", "a"])
                )
            hit = any(r.search(text) for r in rxs)
            may = pf.may_match(text)
            if hit:
                matched += 1
                assert may, (patterns, text)
            elif not may:
                skipped += 1
    assert matched > 1000 and skipped > 300  # both sides of the prefilter were exercised


def test_patterns_without_a_needle_always_run():
    pf = prefilter((r"^\W{3,}$", r"\bab\b"), FLAGS)  # no literal run of 3+ characters
    assert pf.flat is None and pf.may_match("zzz")
    pf = prefilter((r"(?-i:Cookie) policy", r"x(?i:HELLO)"), FLAGS)
    assert pf.may_match("COOKIE POLICY") is True  # " policy" is a needle; the regex decides
    assert pf.may_match("nothing here") is False


def test_strip_boilerplate_equals_the_plain_regex_on_the_corpus():
    cfg = QualityConfig()
    rx = clean._boilerplate_re(tuple(cfg.boilerplate_patterns))
    pf = prefilter(tuple(cfg.boilerplate_patterns), FLAGS)
    texts = corpus_sample(60) + [
        "Новости дня.\nВсе права защищены © 2024",
        "Story.\nCLICK HERE\nRead more about it",
        "Мәтін.\nБарлық құқықтар қорғалған.",
    ]
    skipped = 0
    for text in texts:
        want_bad = sum(1 for ln in text.split("\n") if ln.strip() and rx.search(ln))
        _, bad, _ = clean.strip_boilerplate(text, cfg)
        assert bad == want_bad, text[:80]
        skipped += not pf.may_match(text)
    assert skipped > 0.9 * len(texts)
