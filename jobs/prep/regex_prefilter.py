"""A literal prefilter for case-insensitive regexes: skip the regex scan when its required text is absent.

Python's `re` tries a pattern at every position of a text; a case-insensitive alternation of boilerplate phrases
that starts with `\\b` gets none of its literal-prefix shortcuts and scans at ~10 MB/s, where lower-casing the
text and looking for a substring runs at hundreds of MB/s. This module reads each pattern's parse tree
(`re._parser`), finds text every match must contain (a run of literal characters, or one of several runs for an
alternation), and answers "can this pattern match here?" with substring tests on the text's canonical form.

Exact by construction, never by sampling: a literal character is used in a needle only when every code point
that `re.IGNORECASE` lets match it (found by matching it against all of Unicode) has the same canonical form,
`str.lower()` (in both final-sigma contexts) followed by a small translation table for the few code points whose
lower case differs from `re`'s case folding (ı, ſ, the dot of İ, ...). Every other character ends a run. So if
the regex matches, the needle is in the canonical text: a "no" from the prefilter is always right, and a "maybe"
runs the regex as before. A pattern without a needle of at least `MIN_NEEDLE` characters, or one the parser
cannot read, is always run (the tests compare verdicts with the plain regex on the corpus and on crafted texts).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from functools import lru_cache

MIN_NEEDLE = 3

try:  # the parser re.compile uses (private: read defensively; any surprise means "no prefilter")
    from re import _constants as _C
    from re import _parser as _P
except ImportError:  # pragma: no cover - other Python versions
    _P = _C = None


@lru_cache(maxsize=1)
def _cased_code_points() -> str:
    """Every code point with a case mapping (lower, upper or case fold differs from itself), ~0.4 s once."""
    every = map(chr, range(sys.maxunicode + 1))
    return "".join(c for c in every if c.lower() != c or c.upper() != c or c.casefold() != c)


@lru_cache(maxsize=4096)
def _matches(ch: str, flags: int) -> tuple[str, ...]:
    """Every code point the one-character pattern `ch` matches under `flags` (IGNORECASE: its case variants).
    Without IGNORECASE that is `ch`; with it, `ch` and code points `re` folds to the same letter, which all have a
    case mapping (re compares simple lower cases, plus a table of equivalents such as s/ſ, i/ı, which are cased
    letters too), so matching against the cased code points finds them all (tests compare with all of Unicode)."""
    if not flags & re.IGNORECASE:
        return (ch,)
    return tuple(sorted(set(re.compile(re.escape(ch), flags).findall(_cased_code_points())) | {ch}))


def _lowered(t: str) -> tuple[str, str]:
    """t.lower() in both contexts of the final-sigma rule (after a cased letter at a word's end, and not)."""
    return t.lower(), ("a" + t).lower()[1:]


@dataclass(frozen=True)
class Prefilter:
    """Per pattern, the needles one of which every match contains (None: no prefilter, always run it)."""

    needles: tuple[tuple[str, ...] | None, ...]
    table: dict[int, str | None]  # applied after str.lower(): the canonical form
    keys: tuple[str, ...]  # the table's keys, to translate only texts that have one
    flat: tuple[str, ...] | None  # every needle of every pattern; None when a pattern has none (always run)

    def canonical(self, text: str, lowered: str | None = None) -> str:
        """`lowered`: text.lower(), when the caller has it already."""
        low = text.lower() if lowered is None else lowered
        if any(map(low.__contains__, self.keys)):
            low = low.translate(self.table)
        return low

    def may_match(self, text: str, lowered: str | None = None) -> bool:
        """False when no pattern can match `text` (exact), True when one may (`lowered`: text.lower(), if known)."""
        flat = self.flat
        if flat is None:
            return True
        canon = self.canonical(text, lowered)
        return any(map(canon.__contains__, flat))


def _literal_chars(patterns: tuple[str, ...], flags: int) -> set[str]:
    out: set[str] = set()

    def walk(items) -> None:
        for op, av in items:
            if op is _C.LITERAL:
                out.add(chr(av))
            elif op is _C.SUBPATTERN:
                walk(av[3])
            elif op is _C.BRANCH:
                for alt in av[1]:
                    walk(alt)
            elif op in (_C.MAX_REPEAT, _C.MIN_REPEAT, _C.POSSESSIVE_REPEAT):
                walk(av[2])
            elif op is _C.ATOMIC_GROUP:
                walk(av)

    for p in patterns:
        try:
            walk(_P.parse(p, flags).data)
        except Exception:  # noqa: BLE001 - unreadable here means no prefilter for it, the regex still runs
            continue
    return out


def _translation(chars: set[str], flags: int) -> dict[int, str | None]:
    """Maps, applied after lower(), that give every case variant of a literal character the same form: a
    variant that lowers to another single character maps to the literal's lower case; one that lowers to the
    literal's lower case plus combining marks (İ -> i + U+0307) loses those marks."""
    table: dict[int, str | None] = {}
    for ch in chars:
        lo = ch.lower()
        if len(lo) != 1:
            continue
        for t in _matches(ch, flags):
            for tl in _lowered(t):
                if tl == lo:
                    continue
                if len(tl) == 1 and table.get(ord(tl), lo) == lo:
                    table[ord(tl)] = lo
                elif len(tl) > 1 and tl[0] == lo and all(0x300 <= ord(x) <= 0x36F for x in tl[1:]):
                    for x in tl[1:]:
                        table[ord(x)] = None
    return table


def _usable(ch: str, flags: int, table: dict[int, str | None]) -> str | None:
    """The canonical form of literal `ch` when every code point it matches has that same form, else None."""
    lo = ch.lower()
    if len(lo) != 1 or ord(lo) in table or ord(ch) in table:
        return None
    for t in _matches(ch, flags):
        for tl in _lowered(t):
            if tl.translate(table) != lo:
                return None
    return lo


def _needles(items, flags: int, table: dict[int, str | None]) -> tuple[str, ...] | None:
    """The best needle set of a parsed sequence: runs of usable literals (one needle each), an alternation whose
    every branch has a set (their union), or a group / a repeat of at least one (its contents' set). Best: the
    longest shortest needle."""
    candidates: list[tuple[str, ...]] = []
    run: list[str] = []

    def end_run() -> None:
        if run:
            candidates.append(("".join(run),))
            run.clear()

    for op, av in items:
        if op is _C.LITERAL:
            c = _usable(chr(av), flags, table)
            if c is None:
                end_run()
            else:
                run.append(c)
            continue
        end_run()
        inner: tuple[str, ...] | None = None
        if op is _C.SUBPATTERN:
            add, remove = av[1], av[2]
            inner = _needles(av[3], (flags | add) & ~remove, table) if not remove & re.IGNORECASE else None
        elif op is _C.BRANCH:
            alts = [_needles(alt, flags, table) for alt in av[1]]
            if all(a is not None for a in alts):
                inner = tuple(sorted({x for a in alts for x in a}))
        elif op in (_C.MAX_REPEAT, _C.MIN_REPEAT, _C.POSSESSIVE_REPEAT) and av[0] >= 1:
            inner = _needles(av[2], flags, table)
        elif op is _C.ATOMIC_GROUP:
            inner = _needles(av, flags, table)
        if inner is not None:
            candidates.append(inner)
    end_run()
    good = [c for c in candidates if min(map(len, c)) >= MIN_NEEDLE]
    return max(good, key=lambda c: (min(map(len, c)), -len(c))) if good else None


@lru_cache(maxsize=16)
def prefilter(patterns: tuple[str, ...], flags: int) -> Prefilter:
    """The prefilter of patterns compiled with `flags` (IGNORECASE or not; MULTILINE etc. do not matter)."""
    if _P is None:
        return Prefilter(tuple(None for _ in patterns), {}, (), None)
    table = _translation(_literal_chars(patterns, flags), flags) if flags & re.IGNORECASE else {}
    out: list[tuple[str, ...] | None] = []
    for p in patterns:
        try:
            parsed = _P.parse(p, flags)
            out.append(_needles(parsed.data, parsed.state.flags, table))
        except Exception:  # noqa: BLE001 - see _literal_chars
            out.append(None)
    flat = None if any(n is None for n in out) else tuple(x for n in out for x in n)
    return Prefilter(tuple(out), table, tuple(chr(k) for k in table), flat)
