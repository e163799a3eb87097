"""Language identification and the routing decision per document.

Two detectors, chosen by `langid.method`:

- `fasttext` (default): a fastText classifier trained on OUR corpora (`langid.fasttext_sources`, one label per
  language, only the paragraphs lingua also assigns to it, a held-out split kept aside and scored) chooses among the
  corpus languages in microseconds. Its answer is taken when its probability reaches
  `langid.fasttext_min_probability` AND at least `langid.fasttext_min_known_words` of the sample's words occur
  at least twice in its training text for that label (it answers only for text like what it learnt from) AND the
  sample has no letter of that language's script outside its alphabet (`langid.fasttext_alphabets`: é, ü, ї,
  ў, җ are not English, Russian or Kazakh letters). Every other document goes to lingua
  as below, which knows the close relatives of our languages (uk, be next to ru; fr, de next to en) that the
  fastText model has never seen.
- `lingua`: lingua (offline n-gram models, knows Kazakh) restricted to `langid.candidates`, on every document.

The fastText model is built on first use into `$TULPAR_HOME/langid/fasttext-<key>/model.bin`, where the key is
the sha256 of the training files and settings (one thread, fixed seed: the same data gives the same model, byte
for byte; about a minute on the shared corpora, once). The driver builds it before the workers start (`check_candidates`); a worker that finds
none builds the same one.

After detection, a script check (share of Cyrillic or Latin letters) and `decide` make the routing decision.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from jobs.prep.clean import letter_runs
from jobs.prep.config import LangIdConfig

_CYRILLIC = re.compile(r"[\u0400-\u052f]+")
_LATIN = re.compile(r"[A-Za-z\u00c0-\u024f]+")
# what the fastText model sees: lower-case letter runs separated by single spaces (digits, punctuation dropped)
_NOT_LETTERS = re.compile(r"[\W\d_]+")
FASTTEXT_VERSION = "3"  # part of the model key: bump when the training recipe below changes


def script_shares(text: str) -> tuple[float, float]:
    """(Cyrillic share, Latin share) of the letters in the text; (0, 0) when it has no letters."""
    letters = sum(map(len, letter_runs().findall(text)))
    if not letters:
        return 0.0, 0.0
    return sum(map(len, _CYRILLIC.findall(text))) / letters, sum(map(len, _LATIN.findall(text))) / letters


def detection_sample(text: str, max_chars: int) -> str:
    """The text, or three slices of it (start, middle, end) totalling about max_chars, so that a long
    document is judged by more than its first paragraph."""
    if len(text) <= max_chars:
        return text
    part = max_chars // 3
    mid = len(text) // 2 - part // 2
    return " ".join((text[:part], text[mid : mid + part], text[-part:]))


def _enough_letters(text: str, cfg: LangIdConfig) -> bool:
    head = text[: cfg.max_chars * 2]
    return sum(map(len, letter_runs().findall(head))) >= max(1, cfg.min_letters)


# --------------------------------------------------------------------------------------------- lingua


@lru_cache(maxsize=4)
def _lingua(candidates: tuple[str, ...]):
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


def _lingua_detect(text: str, cfg: LangIdConfig) -> tuple[str, float]:
    values = _lingua(tuple(cfg.candidates)).compute_language_confidence_values(
        detection_sample(text, cfg.max_chars)
    )
    if not values or values[0].value <= 0:
        return "", 0.0
    top = values[0]
    return top.language.iso_code_639_1.name.lower(), float(top.value)


# ------------------------------------------------------------------------------------------- fastText


def fasttext_text(text: str, max_chars: int) -> str:
    """The fastText model's view of a text: its detection sample, lower-cased, letters only."""
    return _NOT_LETTERS.sub(" ", detection_sample(text, max_chars).lower()).strip()


@dataclass(frozen=True)
class FastTextModel:
    path: Path
    key: str  # sha256 of the training text + settings
    info: dict  # what it was trained on and its held-out accuracy (info.json beside the model)


def _source_files(cfg: LangIdConfig, data_root: Path) -> dict[str, list[Path]]:
    """label -> the corpus files its training text comes from (langid.fasttext_sources under TULPAR_DATA)."""
    from llm_core.text import text_files

    out: dict[str, list[Path]] = {}
    for lang, paths in sorted(cfg.fasttext_sources.items()):
        files: list[Path] = []
        for rel in paths:
            root = data_root / rel
            found = text_files(root) if root.is_dir() else [root]
            if not found or not all(f.is_file() for f in found):
                raise ValueError(
                    f"langid.fasttext_sources.{lang}: {rel!r} has no text under TULPAR_DATA={data_root}: "
                    "point it at a corpus file or directory (or run `make data`)"
                )
            files.extend(found)
        out[lang] = files
    return out


def _training_lines(cfg: LangIdConfig, sources: dict[str, list[Path]]) -> tuple[list[str], list[str]]:
    """(train lines, held-out lines) as `__label__<lang> <text>`: the paragraphs of each label's corpora that
    lingua (langid.candidates) also assigns to that label (the French passages of War and Peace are not Russian
    nor English), at most fasttext_train_chars per label, in a fixed order (by content hash) so that the same
    corpora give the same file; 10% of them (by content hash) held out."""
    from llm_core.text import is_validation, iter_documents

    train: list[str] = []
    held: list[str] = []
    for lang, files in sources.items():
        rows: set[tuple[bytes, str, str]] = set()
        for f in files:
            for doc in iter_documents(f, txt_mode="auto"):
                for para in doc.split("\n"):
                    words = fasttext_text(para, cfg.max_chars)
                    if len(words) >= cfg.min_letters:
                        rows.add((hashlib.sha1(words.encode()).digest(), words, para))
        budget = cfg.fasttext_train_chars
        for _, words, para in sorted(rows):
            if budget <= 0:
                break
            if _lingua_detect(para, cfg)[0] != lang:
                continue
            budget -= len(words)
            line = f"__label__{lang} {words}"
            (held if is_validation(words, 0.1) else train).append(line)
    # interleave languages in a fixed pseudo-random order (fastText learns better from mixed labels)
    train.sort(key=lambda s: hashlib.sha1(s.encode()).digest())
    return train, held


def _train_settings(cfg: LangIdConfig) -> dict:
    return {
        "recipe": FASTTEXT_VERSION,
        "dim": 16,
        "minn": 2,
        "maxn": 4,
        "epoch": 5,
        "lr": 0.5,
        "wordNgrams": 1,
        "bucket": 200_000,
        "minCount": 1,
        "seed": 1,
        "max_chars": cfg.max_chars,
        "min_letters": cfg.min_letters,
        "train_chars": cfg.fasttext_train_chars,
        "label_check": sorted(cfg.candidates),
        "known_min_count": 2,
    }


_BUILD_LOCK = threading.Lock()


def fasttext_model(
    cfg: LangIdConfig, data_root: Path | None = None, home: Path | None = None
) -> FastTextModel:
    """The fastText model for this config: found in `$TULPAR_HOME/langid/`, else trained there (atomically).
    Its key hashes the training settings, the lingua candidates that clean the labels, and every training file's
    name and content."""
    if data_root is None or home is None:
        from jobs.platform.runtime import Settings

        settings = Settings.from_env()
        data_root = data_root or settings.data
        home = home or settings.home
    sources = _source_files(cfg, data_root)
    settings_ = _train_settings(cfg)
    h = hashlib.sha256(json.dumps(settings_, sort_keys=True).encode())
    for lang, files in sources.items():
        for f in files:
            h.update(f"{lang}\0{f.relative_to(data_root) if f.is_relative_to(data_root) else f}\0".encode())
            with f.open("rb") as fh:
                h.update(hashlib.file_digest(fh, "sha256").digest())
    key = h.hexdigest()
    out = home / "langid" / f"fasttext-{key[:16]}"
    with _BUILD_LOCK:
        if not (out / "info.json").is_file():
            train, held = _training_lines(cfg, sources)
            _train_fasttext(train, held, settings_, key, out)
    return FastTextModel(out / "model.bin", key, json.loads((out / "info.json").read_text(encoding="utf-8")))


def _train_fasttext(train: list[str], held: list[str], settings: dict, key: str, out: Path) -> None:
    import fasttext

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        data = tmp / "train.txt"
        data.write_text("\n".join(train) + "\n", encoding="utf-8")
        params = {
            k: settings[k]
            for k in ("dim", "minn", "maxn", "epoch", "lr", "wordNgrams", "bucket", "minCount", "seed")
        }
        m = fasttext.train_supervised(str(data), thread=1, verbose=0, **params)
        data.unlink()
        m.save_model(str(tmp / "model.bin"))
        counts: dict[str, dict[str, int]] = {}
        for line in train:
            label, text = line.split(" ", 1)
            c = counts.setdefault(label.removeprefix("__label__"), {})
            for w in text.split():
                c[w] = c.get(w, 0) + 1
        for label, c in counts.items():  # each label's known words: seen at least known_min_count times
            known = sorted(w for w, k in c.items() if k >= settings["known_min_count"])
            (tmp / f"words-{label}.txt").write_text("\n".join(known) + "\n", encoding="utf-8")
        labels, _ = m.f.multilinePredict([s.split(" ", 1)[1] for s in held], 1, 0.0, "strict")
        truth = [s.split(" ", 1)[0] for s in held]
        per: dict[str, list[int]] = {}
        for t, p in zip(truth, labels):
            per.setdefault(t.removeprefix("__label__"), []).append(int(p[0] == t))
        info = {
            "key": key,
            "settings": settings,
            "train_lines": len(train),
            "heldout_lines": len(held),
            "heldout_accuracy": {k: round(sum(v) / len(v), 4) for k, v in sorted(per.items())},
            "model_sha256": hashlib.sha256((tmp / "model.bin").read_bytes()).hexdigest(),
        }
        (tmp / "info.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        try:
            os.replace(tmp, out)  # another process may have built the same model meanwhile: keep theirs
        except OSError:
            if not (out / "info.json").is_file():
                raise
    finally:
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)


@lru_cache(maxsize=4)
def _fasttext_loaded(path: str):
    """(the model, label -> the words its training text for that label has at least twice)."""
    from fasttext.FastText import _FastText

    model = _FastText(model_path=path)
    known = {}
    for f in sorted(Path(path).parent.glob("words-*.txt")):
        known[f.stem.removeprefix("words-")] = frozenset(f.read_text(encoding="utf-8").split())
    return model, known


def _config_key(cfg: LangIdConfig) -> str:
    return json.dumps(cfg.model_dump(), sort_keys=True)


_MODELS: dict[str, FastTextModel] = {}


def _fasttext_for(cfg: LangIdConfig):
    key = _config_key(cfg)
    if key not in _MODELS:
        _MODELS[key] = fasttext_model(cfg)
    return _fasttext_loaded(str(_MODELS[key].path))


# --------------------------------------------------------------------------------------------- public


SCRIPT_LETTERS = {"cyrillic": "\u0400-\u052f", "latin": "a-z\u00c0-\u024f"}  # lower-case text


@lru_cache(maxsize=16)
def _foreign_letters(alphabet: str, script: str) -> re.Pattern:
    """Letters of `script` that are not in `alphabet` (a lower-case sample is searched for one)."""
    return re.compile(f"(?![{re.escape(alphabet)}])[{SCRIPT_LETTERS[script]}]")


def _alien_letter(sample: str, lang: str, cfg: LangIdConfig) -> bool:
    """Whether the sample has a letter of `lang`'s script outside its alphabet (`langid.fasttext_alphabets`)."""
    alphabet, script = cfg.fasttext_alphabets.get(lang), cfg.scripts.get(lang)
    if alphabet is None or script is None:
        return False
    return _foreign_letters(alphabet, script).search(sample) is not None


def check_candidates(cfg: LangIdConfig) -> None:
    """On the driver, before the workers start: fail early with a clear message when a lingua candidate is
    unknown, and build the fastText model (method fasttext) so that the workers find it."""
    _lingua(tuple(cfg.candidates))
    if cfg.method == "fasttext":
        _fasttext_for(cfg)


def detect_many(
    texts: Iterable[str], cfg: LangIdConfig, head_letters: Sequence[int] | None = None
) -> list[tuple[str, float]]:
    """(ISO 639-1 code, confidence in [0, 1]) per text; ("", 0) for texts with fewer than `min_letters`
    letters, which are not detected. `head_letters`: each text's letters among its first 2 x `max_chars`
    characters, when the caller counted them already (`charstats.batch_counts(texts, head=2 * max_chars)`)."""
    texts = list(texts)
    out: list[tuple[str, float]] = [("", 0.0)] * len(texts)
    if head_letters is None:
        todo = [i for i, t in enumerate(texts) if _enough_letters(t, cfg)]
    else:
        todo = [i for i, n in enumerate(head_letters) if n >= max(1, cfg.min_letters)]
    if cfg.method == "lingua":
        for i in todo:
            out[i] = _lingua_detect(texts[i], cfg)
        return out
    model, known = _fasttext_for(cfg)
    samples = [fasttext_text(texts[i], cfg.max_chars) for i in todo]
    labels, probs = model.f.multilinePredict(samples, 1, 0.0, "strict")
    for i, sample, lab, p in zip(todo, samples, labels, probs):
        lang = lab[0].removeprefix("__label__") if lab else ""
        prob = min(1.0, float(p[0])) if lab else 0.0
        words = sample.split()
        if (
            lang
            and prob >= cfg.fasttext_min_probability
            and sum(map(known.get(lang, frozenset()).__contains__, words))
            >= cfg.fasttext_min_known_words.get(lang, 0.9) * len(words)
            and not _alien_letter(sample, lang, cfg)
        ):
            out[i] = (lang, prob)
        else:
            out[i] = _lingua_detect(texts[i], cfg)
    return out


def detect(text: str, cfg: LangIdConfig) -> tuple[str, float]:
    """(ISO 639-1 code of the most likely language, its confidence in [0, 1]) for one text; ("", 0) when it has
    fewer than `min_letters` letters."""
    return detect_many([text], cfg)[0]


def decide(
    declared: str,
    detected: str,
    confidence: float,
    text: str,
    cfg: LangIdConfig,
    outputs: list[str],
    shares: tuple[float, float] | None = None,
) -> tuple[str, str]:
    """(final language, drop reason or "") for one document; `shares`: its `script_shares`, if counted already."""
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
        cyr, lat = shares if shares is not None else script_shares(text)
        share = cyr if script == "cyrillic" else lat
        if share < cfg.min_script_share:
            return final, "script_mismatch"
    return final, ""
