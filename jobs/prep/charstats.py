"""Per-document character and word counts for a whole batch at once: one numpy pass over the code points.

The clean pass counts, per document, letters (str.isalpha), Cyrillic and Latin characters (language ID's script
check and its minimum of letters), digits and symbols (the quality filters) and words with a letter or with a
letter or digit. Done per document, that is several regex scans of every text (a fifth of the clean pass on
the shared corpus). Here every code point gets a byte of flags once per process (`code_point_flags`, built from
the very regexes the per-document functions use, so the counts are equal by construction; the tests also compare
them on the corpus), and a batch's texts are joined, looked up and summed per document with cumulative sums.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

LETTER, CYRILLIC, LATIN, DIGIT, SYMBOL, SPACE, ALNUM = 1, 2, 4, 8, 16, 32, 64


@lru_cache(maxsize=1)
def code_point_flags() -> np.ndarray:
    """(0x110000,) uint8: the flags of every code point, each set by the regex the per-document code uses."""
    from jobs.prep import clean, langid

    digit_re, symbol_re, _, _ = clean._quality_res()
    letter = re.compile(f"[^\\W\\d_{clean.numeric_non_letters()}]")
    tests = (
        (LETTER, letter),
        (CYRILLIC, re.compile(langid._CYRILLIC.pattern.removesuffix("+"))),  # runs there, one character here
        (LATIN, re.compile(langid._LATIN.pattern.removesuffix("+"))),
        (DIGIT, digit_re),
        (SYMBOL, symbol_re),
        (SPACE, re.compile(r"\s")),
        (ALNUM, re.compile(r"[^\W_]")),
    )
    every = "".join(map(chr, range(sys.maxunicode + 1)))
    flags = np.zeros(sys.maxunicode + 1, dtype=np.uint8)
    for bit, rx in tests:
        # each match is one character replaced by U+0000: the zeros are the matches (U+0000 itself tested apart)
        marked = np.frombuffer(rx.sub("\x00", every).encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        assert marked.size == flags.size, f"{rx.pattern} matches more than one character"
        hit = marked == 0
        hit[0] = rx.match("\x00") is not None
        flags[hit] |= bit
    return flags


@dataclass
class BatchCounts:
    """Per document (arrays of the batch's length); a group not asked for (`batch_counts(scripts=False)` or
    `words=False`) is None."""

    letters: np.ndarray | None
    cyrillic: np.ndarray | None
    latin: np.ndarray | None
    head_letters: np.ndarray | None  # letters among the first `head` characters
    digits: np.ndarray | None
    symbols: np.ndarray | None
    words: np.ndarray | None  # whitespace-separated words (str.split())
    word_chars: np.ndarray | None  # characters inside words
    alpha_words: np.ndarray | None  # words with a letter
    alnum_words: np.ndarray | None  # words with a letter or a digit (str.isalnum character)

    def script_shares(self, i: int) -> tuple[float, float]:
        """langid.script_shares of document i: (Cyrillic, Latin) share of its letters."""
        n = int(self.letters[i])
        return (0.0, 0.0) if not n else (int(self.cyrillic[i]) / n, int(self.latin[i]) / n)


WORD_START, ALPHA_WORD_START, ALNUM_WORD_START, IN_WORD = 1, 2, 4, 8  # bits of the per-character word flags


def batch_counts(texts: list[str], head: int = 0, scripts: bool = True, words: bool = True) -> BatchCounts:
    """Counts of every text in one pass: `scripts` (language ID: letters, Cyrillic, Latin, and with `head` > 0
    the letters of each text's first `head` characters) and `words` (the quality filters: digits, symbols and
    the word counts); each group costs its own reductions, so a stage asks only for what it reads."""
    n = len(texts)
    if n == 0:
        empty = np.zeros(0, dtype=np.int64)
        return BatchCounts(*([empty] * 10))
    lengths = np.fromiter(map(len, texts), dtype=np.int64, count=n)
    # every text is followed by a newline: it ends the text's last word, and it makes every segment non-empty
    # (np.add.reduceat sums [starts[i], starts[i + 1]) and needs that); a newline only ever counts as SPACE
    starts = np.concatenate(([0], np.cumsum(lengths + 1)[:-1]))
    joined = "\n".join(texts) + "\n"
    flags = code_point_flags()[np.frombuffer(joined.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)]

    # sums of one bit over each text's segment (int32 sums of booleans run ~30x faster than int64 ones here; a
    # text has < 2**31 characters), handed out as int64
    def per_text(mask_bits: np.ndarray, bit: int) -> np.ndarray:
        return np.add.reduceat((mask_bits & bit) != 0, starts, dtype=np.int32).astype(np.int64)

    out = BatchCounts(*([None] * 10))
    if scripts:
        out.letters, out.cyrillic, out.latin = (per_text(flags, b) for b in (LETTER, CYRILLIC, LATIN))
        # letters of [start, start + head): reduceat over (start, head end) pairs, taking every other sum; the
        # head end never passes the text's own newline, and an empty head sums that newline, which is no letter
        head_end = starts + np.minimum(lengths, head)
        pairs = np.stack([starts, head_end], axis=1).ravel()
        out.head_letters = np.add.reduceat((flags & LETTER) != 0, pairs, dtype=np.int32)[::2].astype(np.int64)
    if words:
        in_word = (flags & SPACE) == 0
        word_start = in_word.copy()
        word_start[1:] &= ~in_word[:-1]
        first = np.flatnonzero(word_start)
        word_id = (
            np.cumsum(word_start, dtype=np.int32) - 1
        )  # the word each character belongs to (where in_word)
        word_flags = np.zeros(flags.size, dtype=np.uint8)
        word_flags[in_word] = IN_WORD
        word_flags[first] |= WORD_START
        for bit, mark in ((LETTER, ALPHA_WORD_START), (ALNUM, ALNUM_WORD_START)):
            has = np.bincount(word_id[in_word & ((flags & bit) != 0)], minlength=first.size) > 0
            word_flags[first[has]] |= mark
        out.digits, out.symbols = per_text(flags, DIGIT), per_text(flags, SYMBOL)
        out.words, out.word_chars = per_text(word_flags, WORD_START), per_text(word_flags, IN_WORD)
        out.alpha_words = per_text(word_flags, ALPHA_WORD_START)
        out.alnum_words = per_text(word_flags, ALNUM_WORD_START)
    return out
