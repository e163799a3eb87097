"""Language identification: lingua (offline n-gram models, knows Kazakh) restricted to configured candidates,
plus a script check (share of Cyrillic or Latin letters), and the routing decision per document."""

from __future__ import annotations

import re
from functools import lru_cache

from jobs.prep.config import LangIdConfig

_CYRILLIC = re.compile(r"[\u0400-\u052f]")
_LATIN = re.compile(r"[A-Za-z\u00c0-\u024f]")


def script_shares(text: str) -> tuple[float, float]:
    """(Cyrillic share, Latin share) of the letters in the text; (0, 0) when it has no letters."""
    letters = sum(1 for c in text if c.isalpha())
    if not letters:
        return 0.0, 0.0
    return len(_CYRILLIC.findall(text)) / letters, len(_LATIN.findall(text)) / letters


def detection_sample(text: str, max_chars: int) -> str:
    """The text, or three slices of it (start, middle, end) totalling about max_chars, so that a long
    document is judged by more than its first paragraph."""
    if len(text) <= max_chars:
        return text
    part = max_chars // 3
    mid = len(text) // 2 - part // 2
    return " ".join((text[:part], text[mid : mid + part], text[-part:]))


@lru_cache(maxsize=4)
def _detector(candidates: tuple[str, ...]):
    from lingua import IsoCode639_1, LanguageDetectorBuilder

    codes = []
    for c in candidates:
        try:
            codes.append(getattr(IsoCode639_1, c.upper()))
        except AttributeError:
            raise ValueError(
                f"langid.candidates: {c!r} is not a language lingua knows (ISO 639-1 codes such as kk, ru, en)"
            ) from None
    if len(codes) < 2:
        raise ValueError("langid.candidates needs at least two languages")
    return LanguageDetectorBuilder.from_iso_codes_639_1(*codes).build()


def check_candidates(cfg: LangIdConfig) -> None:
    """Fail early (on the driver) with a clear message when a candidate code is unknown."""
    _detector(tuple(cfg.candidates))


def detect(text: str, cfg: LangIdConfig) -> tuple[str, float]:
    """(ISO 639-1 code of the most likely candidate, its confidence in [0, 1]); ("", 0) for texts with fewer
    than `min_letters` letters, which are not detected."""
    if sum(1 for c in text[: cfg.max_chars * 2] if c.isalpha()) < max(1, cfg.min_letters):
        return "", 0.0
    values = _detector(tuple(cfg.candidates)).compute_language_confidence_values(
        detection_sample(text, cfg.max_chars)
    )
    if not values or values[0].value <= 0:
        return "", 0.0
    top = values[0]
    return top.language.iso_code_639_1.name.lower(), float(top.value)


def decide(
    declared: str, detected: str, confidence: float, text: str, cfg: LangIdConfig, outputs: list[str]
) -> tuple[str, str]:
    """(final language, drop reason or "") for one document."""
    if declared == "auto":
        if not detected or confidence < cfg.min_confidence:
            return declared, "language_uncertain"
        if detected not in outputs:
            return detected, "language_other"
        final = detected
    elif detected and detected != declared and confidence >= cfg.min_confidence:
        if cfg.on_mismatch == "keep":
            final = declared
        elif cfg.on_mismatch == "route" and detected in outputs:
            final = detected
        else:
            return declared, "language_mismatch"
    else:
        final = declared
    script = cfg.scripts.get(final)
    if script is not None:
        cyr, lat = script_shares(text)
        share = cyr if script == "cyrillic" else lat
        if share < cfg.min_script_share:
            return final, "script_mismatch"
    return final, ""
