"""Per-document text clean-up: normalisation, quality heuristics and PII scrubbing (pure Python, no Ray).

Each function takes one document's text and returns the new text and/or a verdict; `jobs.prep.stages` applies
them to Arrow batches and the benchmark's plain loop calls them one document at a time.
"""

from __future__ import annotations

import html
import re
import sys
import unicodedata
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

from jobs.prep.charstats import BatchCounts, batch_counts
from jobs.prep.config import NormalizeConfig, PiiConfig, QualityConfig
from jobs.prep.regex_prefilter import prefilter

# ------------------------------------------------------------------------------------------ normalise


def char_class(predicate: Callable[[str], bool]) -> str:
    """A regex character class (without brackets) of every code point for which `predicate` holds, so that a
    per-character Python test runs as one regex scan."""
    ranges: list[tuple[int, int]] = []
    start = None
    for cp in range(sys.maxunicode + 2):
        ok = cp <= sys.maxunicode and predicate(chr(cp))
        if ok and start is None:
            start = cp
        elif not ok and start is not None:
            ranges.append((start, cp - 1))
            start = None
    return "".join(f"\\U{a:08x}" if a == b else f"\\U{a:08x}-\\U{b:08x}" for a, b in ranges)


_KEEP_CONTROL = {"\n", "\t"}
_ODD_SPACE_CHARS = r"\t\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000"  # space characters other than " "
_ODD_SPACE = re.compile(f"[{_ODD_SPACE_CHARS}]")
# only what collapsing changes: runs of 2+ spaces, or one space character other than " "
_SPACES = re.compile(rf"[ {_ODD_SPACE_CHARS}]{{2,}}|[{_ODD_SPACE_CHARS}]")
_MANY_NEWLINES = re.compile(r"\n{3,}")
_SPACE_AROUND_NEWLINE = re.compile(r" \n ?|\n ")  # a newline with a space beside it
_CYR = r"\u0400-\u04ff\u0500-\u052f"
_HAS_CYR = re.compile(f"[{_CYR}]")
_LATIN_LOOKALIKE = r"A-Za-z\u0259\u018f\u0275\u019f"
_LATIN_IN_WORD = re.compile(f"[{_LATIN_LOOKALIKE}]")
# a whole word (\w run) with both a Cyrillic letter and a Latin one: the only words look-alikes are fixed in
# (two lookaheads from each word start: linear in the word's length, where a backtracking pattern is not)
_MIXED_WORD = re.compile(rf"\b(?=\w*[{_CYR}])(?=\w*[{_LATIN_LOOKALIKE}])\w+")


@lru_cache(maxsize=8)
def _invisible_table() -> dict[int, None]:
    """Code points deleted by normalisation: controls (but \\n, \\t), format characters, U+FFFD."""
    drop: dict[int, None] = {}
    # every Cc and Cf code point lies in these ranges (checked in tests against the full Unicode range)
    for cp in (*range(0x30000), *range(0xE0000, 0xE1000)):
        ch = chr(cp)
        cat = unicodedata.category(ch)
        if (cat == "Cc" and ch not in _KEEP_CONTROL) or cat == "Cf" or cp == 0xFFFD:
            drop[cp] = None
    drop[ord("\r")] = None
    return drop


@lru_cache(maxsize=1)
def _invisible_re() -> re.Pattern:
    """The code points of `_invisible_table` as one character class (deleting them by regex is much faster
    than `str.translate` with a table of thousands of entries)."""
    drop = _invisible_table()
    return re.compile(f"[{char_class(lambda ch: ord(ch) in drop)}]+")


def _may_have_invisible(text: str) -> bool:
    """False only when the text has none of `_invisible_table`'s code points: str.isprintable() is False for
    every control and format character (and more), so a text that is printable once its newlines and tabs are
    blanked, and has no U+FFFD, has nothing to delete; one C scan instead of the regex's."""
    flat = text.replace("\n", " ")
    if "\t" in flat:
        flat = flat.replace("\t", " ")
    return not flat.isprintable() or "\ufffd" in text


@lru_cache(maxsize=8)
def _lookalike_table(items: tuple[tuple[str, str], ...]) -> dict[int, str]:
    return {ord(k): v for k, v in items}


def normalize_text(text: str, cfg: NormalizeConfig) -> tuple[str, int]:
    """(normalised text, number of look-alike letters fixed)."""
    if cfg.unescape_html and "&" in text:
        text = html.unescape(text)
    text = unicodedata.normalize(cfg.unicode_form, text)
    if cfg.remove_invisible and _may_have_invisible(text):
        text = _invisible_re().sub("", text)
    fixes = 0
    if cfg.fix_lookalikes and _LATIN_IN_WORD.search(text) and _HAS_CYR.search(text):
        table = _lookalike_table(tuple(sorted(cfg.lookalikes.items())))

        def fix(m: re.Match) -> str:
            nonlocal fixes
            word = m.group(0)
            new = word.translate(table)
            if _LATIN_IN_WORD.search(new):  # other Latin letters remain: a real mixed token (e.g. a code)
                return word
            fixes += sum(a != b for a, b in zip(word, new))
            return new

        text = _MIXED_WORD.sub(fix, text)
        if fixes:
            text = unicodedata.normalize(cfg.unicode_form, text)
    if cfg.collapse_whitespace:
        # each regex only where a substring test says it can change something (most texts: none of them)
        if "  " in text or _ODD_SPACE.search(text):
            text = _SPACES.sub(" ", text)
        if " \n" in text or "\n " in text:
            text = _SPACE_AROUND_NEWLINE.sub("\n", text)
        if "\n\n\n" in text:
            text = _MANY_NEWLINES.sub("\n\n", text)
    return text.strip(), fixes


# -------------------------------------------------------------------------------------------- quality

_WORD = re.compile(r"\S+")
_PUNCT_OK = set(".,;:!?'\"()[]-–—«»„“”‘’…/%")


@dataclass(frozen=True)
class QualityStats:
    chars: int
    words: int
    mean_word_length: float
    symbol_ratio: float
    digit_ratio: float
    alpha_word_ratio: float
    duplicate_line_ratio: float
    top_ngram_ratio: float
    duplicate_ngram_ratio: float


def _top_repeated_ngram_ratio(words: list[str], n: int, total_chars: int) -> float:
    """Characters covered by the most frequent word n-gram that occurs more than once."""
    if len(words) < 2 * n or not total_chars:
        return 0.0
    counts = Counter(zip(*(words[i:] for i in range(n))))
    gram, count = counts.most_common(1)[0]
    return 0.0 if count < 2 else count * sum(len(w) for w in gram) / total_chars


def _duplicate_ngram_ratio(words: list[str], n: int, total_chars: int) -> float:
    """Characters inside word n-grams that occur more than once (each word counted once)."""
    if len(words) < 2 * n or not total_chars:
        return 0.0
    if len(set(zip(*(words[i:] for i in range(n))))) == len(words) - n + 1:
        return 0.0  # no n-gram occurs twice (most documents): nothing to count
    grams = list(zip(*(words[i:] for i in range(n))))
    counts = Counter(grams)
    covered = bytearray(len(words))
    for i, g in enumerate(grams):
        if counts[g] > 1:
            covered[i : i + n] = b"\x01" * n
    return sum(len(w) for w, c in zip(words, covered) if c) / total_chars


@lru_cache(maxsize=1)
def numeric_non_letters() -> str:
    """Character class of what is alphanumeric but neither a letter nor a decimal digit (superscripts,
    fractions, Roman numerals, ...): `[^\\W\\d_<this>]` is exactly str.isalpha."""
    return char_class(lambda c: c.isalnum() and not c.isalpha() and not c.isdecimal())


@lru_cache(maxsize=1)
def letter_runs() -> re.Pattern:
    """Runs of letters (str.isalpha), for counting letters with one regex scan."""
    return re.compile(rf"[^\W\d_{numeric_non_letters()}]+")


@lru_cache(maxsize=1)
def _quality_res() -> tuple[re.Pattern, re.Pattern, re.Pattern, re.Pattern]:
    """Regexes counting what quality_stats counts per character / word, equal to the str predicates (the
    unit tests check every code point): digits (str.isdigit), symbols (not alnum, not space, not allowed
    punctuation), words with a letter (str.isalpha), words with a letter or digit (str.isalnum). They lean on
    the regex engine's own classes (\\w is isalnum or "_", \\d is isdecimal, \\s is isspace), which it tests
    natively, plus the few code points where those differ from the predicates."""
    numeric = numeric_non_letters()
    digit_not_decimal = char_class(lambda c: c.isdigit() and not c.isdecimal())
    punct = re.escape("".join(sorted(_PUNCT_OK)))
    digit = re.compile(rf"[\d{digit_not_decimal}]")
    symbol = re.compile(rf"[^\w\s{punct}]|_")
    alpha_word = re.compile(rf"\S*?[^\W\d_{numeric}]\S*")
    alnum_word = re.compile(r"\S*?[^\W_]\S*")
    return digit, symbol, alpha_word, alnum_word


def quality_stats(
    text: str,
    ngram_min_words: int = 0,
    counts: tuple[BatchCounts, int] | None = None,
    lowered: str | None = None,
) -> QualityStats:
    """The statistics the quality filters read; the two n-gram ratios are computed only for documents with at
    least `ngram_min_words` words (0.0 otherwise: the filters ignore them below `repetition_min_words`).
    `counts`: this text's row of `charstats.batch_counts` (the same character and word counts, for a batch);
    `lowered`: text.lower(), when the caller has it already."""
    if counts is None:
        digit_re, symbol_re, alpha_word_re, alnum_word_re = _quality_res()
        words = text.split()  # the same words as _WORD (\S+): both split on str.isspace characters
        n_words = len(words)
        word_chars = sum(map(len, words))
        digits = len(digit_re.findall(text))
        symbols = len(symbol_re.findall(text))
        alpha_words = len(alpha_word_re.findall(text))
        alnum_words = len(alnum_word_re.findall(text))
    else:
        c, i = counts
        n_words, word_chars = int(c.words[i]), int(c.word_chars[i])
        digits, symbols = int(c.digits[i]), int(c.symbols[i])
        alpha_words, alnum_words = int(c.alpha_words[i]), int(c.alnum_words[i])
    symbols += text.count("...")  # Gopher counts ellipses as "symbols"
    non_space = word_chars
    lines = [ln.strip() for ln in text.split("\n")]
    lines = [ln for ln in lines if ln]
    dup_lines = len(lines) - len(set(lines))
    top = dup = 0.0
    if n_words >= ngram_min_words:
        # == [w.lower() for w in words]: lower() adds no whitespace
        lowered_words = (text.lower() if lowered is None else lowered).split()
        top = _top_repeated_ngram_ratio(lowered_words, 2, word_chars)
        dup = _duplicate_ngram_ratio(lowered_words, 5, word_chars)
    return QualityStats(
        chars=len(text),
        words=n_words,
        mean_word_length=word_chars / n_words if n_words else 0.0,
        symbol_ratio=symbols / non_space if non_space else 0.0,
        digit_ratio=digits / non_space if non_space else 0.0,
        alpha_word_ratio=alpha_words / alnum_words if alnum_words else 0.0,
        duplicate_line_ratio=dup_lines / len(lines) if lines else 0.0,
        top_ngram_ratio=top,
        duplicate_ngram_ratio=dup,
    )


_BOILERPLATE_FLAGS = re.IGNORECASE | re.MULTILINE


@lru_cache(maxsize=8)
def _boilerplate_re(patterns: tuple[str, ...]) -> re.Pattern | None:
    if not patterns:
        return None
    return re.compile("|".join(f"(?:{p})" for p in patterns), _BOILERPLATE_FLAGS)


def strip_boilerplate(text: str, cfg: QualityConfig, lowered: str | None = None) -> tuple[str, int, int]:
    """(text without boilerplate lines when configured, boilerplate lines, all non-empty lines). A literal
    prefilter (`regex_prefilter`: the phrases every match must contain) skips the regex scan of texts that
    cannot match, which are nearly all of them; its "no" is exact. `lowered`: text.lower(), if known."""
    patterns = tuple(cfg.boilerplate_patterns)
    rx = _boilerplate_re(patterns)
    lines = text.split("\n")
    n_lines = sum(1 for ln in lines if ln.strip())
    if (
        rx is None
        or not prefilter(patterns, _BOILERPLATE_FLAGS).may_match(text, lowered)
        or not rx.search(text)
    ):
        return text, 0, n_lines
    keep, bad = [], 0
    for ln in lines:
        if ln.strip() and rx.search(ln):
            bad += 1
        else:
            keep.append(ln)
    if cfg.remove_boilerplate_lines:
        text = "\n".join(keep).strip()
    return text, bad, n_lines


def quality_verdict(text: str, cfg: QualityConfig) -> tuple[str, str]:
    """(text, reason or "" when the document passes); a passing text loses its boilerplate lines when
    `remove_boilerplate_lines`, a failing one is returned unchanged (for the report's examples)."""
    original = text
    text, bad, n_lines = strip_boilerplate(text, cfg)
    if n_lines and bad / n_lines > cfg.max_boilerplate_line_ratio:
        return original, "boilerplate"
    reason = _first_failure(quality_stats(text, cfg.repetition_min_words), cfg)
    return (original, reason) if reason else (text, "")


def quality_verdicts(texts: list[str], cfg: QualityConfig) -> list[tuple[str, str]]:
    """`quality_verdict` of every text, with the character and word counts of the whole batch taken at once."""
    out: list[tuple[str, str]] = [("", "")] * len(texts)
    todo: list[int] = []
    stripped: list[str] = []
    lows: list[
        str | None
    ] = []  # each text lower-cased once: for the boilerplate prefilter and the n-gram rules
    for i, text in enumerate(texts):
        low = text.lower()
        kept, bad, n_lines = strip_boilerplate(text, cfg, low)
        if n_lines and bad / n_lines > cfg.max_boilerplate_line_ratio:
            out[i] = (text, "boilerplate")
        else:
            todo.append(i)
            stripped.append(kept)
            lows.append(low if kept is text else None)
    counts = batch_counts(stripped, scripts=False)
    for j, (i, kept) in enumerate(zip(todo, stripped)):
        stats = quality_stats(kept, cfg.repetition_min_words, (counts, j), lows[j])
        reason = _first_failure(stats, cfg)
        out[i] = (texts[i], reason) if reason else (kept, "")
    return out


def _first_failure(s: QualityStats, cfg: QualityConfig) -> str:
    long_enough = s.words >= cfg.repetition_min_words  # n-gram repetition says little about a short sentence
    checks = (
        (s.chars < cfg.min_chars, "too_short"),
        (s.words < cfg.min_words, "too_few_words"),
        (s.words > cfg.max_words, "too_many_words"),
        (not cfg.min_mean_word_length <= s.mean_word_length <= cfg.max_mean_word_length, "mean_word_length"),
        (s.symbol_ratio > cfg.max_symbol_ratio, "symbol_ratio"),
        (s.digit_ratio > cfg.max_digit_ratio, "digit_ratio"),
        (s.alpha_word_ratio < cfg.min_alpha_word_ratio, "alpha_words"),
        (s.duplicate_line_ratio > cfg.max_duplicate_line_ratio, "duplicate_lines"),
        (long_enough and s.top_ngram_ratio > cfg.max_top_ngram_ratio, "repeated_ngrams"),
        (long_enough and s.duplicate_ngram_ratio > cfg.max_duplicate_ngram_ratio, "duplicate_ngrams"),
    )
    return next((reason for failed, reason in checks if failed), "")


# ------------------------------------------------------------------------------------------------ PII

EMAIL_RE = re.compile(r"(?<![\w.+-])[\w.+-]+@[\w-]+(?:\.[\w-]+)*\.[A-Za-z]{2,24}(?![\w-])")
# 10-15 digits written with optional +, spaces, dots, dashes and one pair of parentheses: +7 (701) 123-45-67,
# 8 777 123 4567, +1-202-555-0147. Years, dates and short numbers have too few digits to match.
PHONE_RE = re.compile(r"(?<![\w+])(?:\+?\d{1,3}[\s.-]?)?(?:\(\d{1,5}\)[\s.-]?)?\d(?:[\s.-]?\d){4,13}(?![\w])")
# IBAN: two letters, two check digits, 11-30 alphanumerics, optionally grouped by spaces (KZ86 125K ZT50 0410 0100).
IBAN_RE = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b")


def _digits(s: str) -> int:
    return sum(c.isdigit() for c in s)


def _plausible_phone(s: str) -> bool:
    """10-15 digits that look dialled rather than counted: a leading +, an area code in parentheses, dashes
    between short groups, a Kazakh/Russian 7/8 trunk prefix with 11 digits, or ...-45-67-style pairs at the end.
    `2 000 000 000` (a grouped amount) and `1805 1806 1807` are not phone numbers."""
    n = _digits(s)
    if not 10 <= n <= 15:
        return False
    groups = [g for g in re.split(r"[\s.()+-]+", s) if g]
    return (
        s.startswith("+")
        or "(" in s
        or ("-" in s and all(len(g) <= 4 for g in groups[1:]))
        or (n == 11 and groups[0] in ("7", "8", s[:11]) and s[0] in "78")
        or (len(groups) >= 3 and len(groups[-1]) == 2 and len(groups[-2]) == 2)
    )


_DECIMAL = re.compile(r"\d")


def scrub_pii(text: str, cfg: PiiConfig) -> tuple[str, dict[str, int]]:
    """(text with PII replaced, counts per kind)."""
    counts = {"email": 0, "phone": 0, "iban": 0}
    if not cfg.enabled:
        return text, counts
    if cfg.email is not None and "@" in text:
        text, counts["email"] = EMAIL_RE.subn(cfg.email, text)
    # A phone number needs 10 digits, an IBAN 8 (\d, as the patterns match them): most texts have fewer and skip
    # both scans. Counted after the e-mail (and again after the IBAN) replacement, whose placeholders may hold digits.
    n_digits = len(_DECIMAL.findall(text))
    if cfg.iban is not None and n_digits >= 8:

        def iban(m: re.Match) -> str:
            raw = m.group(0).replace(" ", "")
            if 15 <= len(raw) <= 34 and _digits(raw) >= 8:
                counts["iban"] += 1
                return cfg.iban
            return m.group(0)

        text = IBAN_RE.sub(iban, text)
    if counts["iban"]:  # its placeholder may hold digits
        n_digits = len(_DECIMAL.findall(text))
    if cfg.phone is not None and n_digits >= 10:

        def phone(m: re.Match) -> str:
            s = m.group(0)
            if _plausible_phone(s):
                counts["phone"] += 1
                return cfg.phone
            return s

        text = PHONE_RE.sub(phone, text)
    return text, counts
