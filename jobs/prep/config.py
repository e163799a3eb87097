"""The preprocessing config: every key documented, unknown keys are errors (StrictModel)."""

from __future__ import annotations

import hashlib
import json
import math
import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from jobs.platform.results import StageResult, TokenizerOutputs, take_inputs
from llm_core.config import StrictModel, config_to_dict

# Part of every dataset's content hash: bump it when a change to the code changes what a config produces, so that
# re-running a config writes a new output instead of reusing one made by older code.
PIPELINE_VERSION = "1"

# Latin (and IPA) letters that look like Cyrillic ones, as typed inside Cyrillic words (Kazakh keyboards without
# the extra letters, OCR, copy-paste). Applied only inside words that also contain Cyrillic letters.
DEFAULT_LOOKALIKES: dict[str, str] = {
    "a": "а",
    "c": "с",
    "e": "е",
    "i": "і",
    "o": "о",
    "p": "р",
    "x": "х",
    "y": "у",
    "h": "һ",
    "A": "А",
    "B": "В",
    "C": "С",
    "E": "Е",
    "H": "Н",
    "I": "І",
    "K": "К",
    "M": "М",
    "O": "О",
    "P": "Р",
    "T": "Т",
    "X": "Х",
    "Y": "У",
    "ə": "ә",  # U+0259 Latin schwa -> U+04D9 Cyrillic schwa
    "Ə": "Ә",
    "ɵ": "ө",  # U+0275 barred o -> U+04E9
    "Ɵ": "Ө",
}

DEFAULT_BOILERPLATE = [
    r"\ball rights reserved\b",
    r"\bcookies?\b.*\b(accept|policy|use)\b",
    r"\b(privacy policy|terms of (use|service))\b",
    r"^\s*(subscribe|share|tweet|like us on facebook|read more|click here)\b.{0,40}$",
    r"все права защищены",
    r"^\s*(подписывайтесь|подписаться|поделиться|читайте также|читать далее)\b.{0,40}$",
    r"барлық құқықтар қорғалған",
    r"^\s*(бөлісу|толығырақ|жазылыңыз)\b.{0,40}$",
    r"\bjavascript\b.*\b(enable|disabled|включите|қосыңыз)",
]


class SourceSpec(StrictModel):
    """One input: a file, a directory (all supported files under it) or a glob, locally or on s3://."""

    path: str = Field(
        description="file, directory or glob; relative paths are under TULPAR_DATA; s3://... works"
    )
    language: str = Field("auto", description="declared language code (kk, ru, en, ...) or `auto` to detect")
    format: Literal["auto", "txt", "jsonl", "parquet"] = Field(
        "auto", description="auto: by extension (.txt, .jsonl/.json, .parquet, plus .gz/.zst/.zstd)"
    )
    txt_mode: Literal["line", "blank_line"] = Field(
        "line", description=".txt documents: one per line, or one per blank-line-separated block"
    )
    text_field: str = Field("text", description="field (jsonl) or column (parquet) holding the text")


class ReadConfig(StrictModel):
    """Reading raw files, and what to do with bad input (every case is counted in the report)."""

    chunk_mb: float = Field(
        8.0,
        gt=0,
        description="uncompressed .txt (line mode) and .jsonl files are read in byte ranges of this size",
    )
    max_doc_bytes: int = Field(
        1_000_000, gt=0, description="longer documents (e.g. a 50 MB line) are skipped or truncated"
    )
    on_long_document: Literal["skip", "truncate"] = Field(
        "skip", description="what happens to a too-long document"
    )
    on_invalid_utf8: Literal["replace", "skip"] = Field(
        "replace", description="replace: invalid bytes become U+FFFD (then removed); skip: drop the document"
    )
    input_hash: Literal["stat", "content"] = Field(
        "stat",
        description="fingerprint inputs by path, size and modification time from the listing (no extra I/O, any "
        "rewrite changes it) or by content (sha256 of every byte, read on the driver on every run)",
    )
    sniff_bytes: int = Field(
        1024, gt=0, description="bytes read (decompressed) from the head of each file to detect binary files"
    )
    sniff: Literal["auto", "driver", "reader"] = Field(
        "auto",
        description="where each file's head is checked (binary, empty, corrupt): on the driver while planning, "
        "or in the reading task (no per-file request on the driver); auto: driver for local files, reader for "
        "s3:// and other object stores",
    )
    sniff_threads: int = Field(
        32, gt=0, description="files sniffed at a time by the driver on object storage (sniff: driver)"
    )
    max_control_ratio: float = Field(
        0.1,
        ge=0,
        le=1,
        description="a file whose sniffed head has more non-text bytes (NUL, control, invalid UTF-8) is binary",
    )


class NormalizeConfig(StrictModel):
    """Unicode and whitespace clean-up, applied to every document."""

    unicode_form: Literal["NFC", "NFKC"] = Field("NFC", description="Unicode normal form")
    unescape_html: bool = Field(
        True, description="turn HTML entities (&amp;, &#39;) left by scrapers into characters"
    )
    remove_invisible: bool = Field(
        True,
        description="drop control (Cc except \\n, \\t), format (Cf: zero-width, BOM, soft hyphen), U+FFFD",
    )
    collapse_whitespace: bool = Field(
        True, description="runs of spaces/tabs/NBSP -> one space; >2 newlines -> 2"
    )
    fix_lookalikes: bool = Field(
        True, description="Latin look-alike letters inside Cyrillic words -> Cyrillic"
    )
    lookalikes: dict[str, str] = Field(
        default_factory=lambda: dict(DEFAULT_LOOKALIKES), description="look-alike letter -> Cyrillic letter"
    )

    @field_validator("lookalikes")
    @classmethod
    def _single_chars(cls, v: dict[str, str]) -> dict[str, str]:
        bad = [k for k, t in v.items() if len(k) != 1 or len(t) != 1]
        if bad:
            raise ValueError(f"normalize.lookalikes keys and values must be single characters: {bad}")
        return v


class LangIdConfig(StrictModel):
    """Language identification (a fastText model trained on our corpora, lingua where it is unsure; both offline)
    plus a script check. How they combine: jobs/prep/langid.py and docs/preprocessing.md."""

    enabled: bool = Field(True, description="false: keep every document's declared language, no detection")
    method: Literal["lingua", "fasttext"] = Field(
        "lingua",
        description="lingua: lingua on every document; fasttext (what configs/preprocess/*.yaml use, several "
        "times faster): a fastText model trained on `fasttext_sources` decides where it is sure and knows the "
        "words (`fasttext_min_probability`, `fasttext_min_known_words`), lingua decides the rest",
    )
    candidates: list[str] = Field(
        default_factory=lambda: ["kk", "ru", "en", "uk", "be", "fr", "de"],
        description="ISO 639-1 codes lingua chooses among (must include every output language); each one more "
        "costs time on every document lingua sees",
    )
    fasttext_sources: dict[str, list[str]] = Field(
        default_factory=lambda: {"kk": ["corpus/kk"], "ru": ["corpus/ru"], "en": ["corpus/en"]},
        description="label -> files or directories under TULPAR_DATA the fastText model is trained on (10% of "
        "their paragraphs held out and scored); must include every output language",
    )
    fasttext_train_chars: int = Field(
        3_000_000, gt=0, description="at most this many characters of training text per label (balances them)"
    )
    fasttext_min_probability: float = Field(
        0.99, ge=0, le=1, description="fastText's answer is taken only with at least this probability..."
    )
    fasttext_min_known_words: dict[str, float] = Field(
        default_factory=lambda: {"kk": 0.7, "ru": 0.8, "en": 0.9},
        description="...and when at least this share of the sample's words (per detected language; 0.9 for one "
        "not named) occur (twice or more) in its training text for that language; other documents (e.g. "
        "Ukrainian, which looks like Russian to a model that never saw it) go to lingua",
    )
    fasttext_alphabets: dict[str, str] = Field(
        default_factory=lambda: {
            "kk": "аәбвгғдеёжзийкқлмнңоөпрстуұүфхһцчшщъыіьэюя",
            "ru": "абвгдеёжзийклмнопрстуфхцчшщъыьэюя",
            "en": "abcdefghijklmnopqrstuvwxyz",
        },
        description="...and when the sample has no letter of that language's script (`scripts`) outside these "
        "lower-case letters: French é or Ukrainian ї send the document to lingua, whatever fastText says",
    )
    min_confidence: float = Field(
        0.6, ge=0, le=1, description="below this, a declared language is kept; an `auto` document is dropped"
    )
    max_chars: int = Field(
        600, gt=0, description="detect on at most this many characters (start, middle, end)"
    )
    min_letters: int = Field(
        20,
        ge=0,
        description="shorter documents are not detected (too unreliable): they keep the declared language",
    )
    on_mismatch: Literal["route", "drop", "keep"] = Field(
        "route",
        description="detected != declared: route to the detected language (if it is an output language, else "
        "drop), drop, or keep the declared language",
    )
    scripts: dict[str, Literal["cyrillic", "latin"]] = Field(
        default_factory=lambda: {"kk": "cyrillic", "ru": "cyrillic", "en": "latin"},
        description="expected script per language",
    )
    min_script_share: float = Field(0.5, ge=0, le=1, description="share of letters in the expected script")


class QualityConfig(StrictModel):
    """Gopher/FineWeb-style heuristics; a document failing one is dropped with that reason."""

    enabled: bool = Field(True, description="false: no quality filtering")
    min_chars: int = Field(20, ge=0)
    min_words: int = Field(3, ge=0)
    max_words: int = Field(200_000, gt=0)
    min_mean_word_length: float = Field(2.0, ge=0, description="mean characters per word")
    max_mean_word_length: float = Field(15.0, gt=0)
    max_symbol_ratio: float = Field(
        0.1, ge=0, le=1, description="symbol characters (Unicode S*, #, ...) per non-space character"
    )
    max_digit_ratio: float = Field(0.3, ge=0, le=1, description="digits per non-space character")
    min_alpha_word_ratio: float = Field(
        0.6, ge=0, le=1, description="share of words with a letter among words with a letter or digit"
    )
    max_duplicate_line_ratio: float = Field(0.3, ge=0, le=1, description="lines repeating an earlier line")
    repetition_min_words: int = Field(
        30,
        ge=0,
        description="the two n-gram repetition checks apply to documents with at least this many words",
    )
    max_top_ngram_ratio: float = Field(
        0.2, ge=0, le=1, description="characters covered by the most frequent repeated word 2-gram"
    )
    max_duplicate_ngram_ratio: float = Field(
        0.15, ge=0, le=1, description="characters covered by word 5-grams that occur more than once"
    )
    boilerplate_patterns: list[str] = Field(
        default_factory=lambda: list(DEFAULT_BOILERPLATE), description="regexes (case-insensitive) per line"
    )
    remove_boilerplate_lines: bool = Field(True, description="delete matching lines from kept documents")
    max_boilerplate_line_ratio: float = Field(0.5, ge=0, le=1, description="more boilerplate lines: drop")

    @field_validator("boilerplate_patterns")
    @classmethod
    def _compiles(cls, v: list[str]) -> list[str]:
        for p in v:
            try:
                re.compile(p)
            except re.error as exc:
                raise ValueError(
                    f"quality.boilerplate_patterns: {p!r} is not a valid regex ({exc})"
                ) from None
        return v


class PiiConfig(StrictModel):
    """PII scrubbing: matches are replaced by placeholders and counted per kind."""

    enabled: bool = Field(True, description="false: no scrubbing")
    email: str | None = Field("<EMAIL>", description="replacement for e-mail addresses (null: keep them)")
    phone: str | None = Field("<PHONE>", description="replacement for phone numbers (10-15 digits)")
    iban: str | None = Field("<IBAN>", description="replacement for IBAN-like account numbers")


class DedupConfig(StrictModel):
    """Exact and near-duplicate removal across the whole corpus (the first document in input order is kept)."""

    exact: bool = Field(True, description="same text after case-folding and dropping punctuation/spacing")
    near: bool = Field(
        True, description="MinHash LSH over word n-grams finds candidate pairs, their true Jaccard decides"
    )
    threshold: float = Field(
        0.7, gt=0, lt=1, description="Jaccard similarity at which a document is a near-duplicate"
    )
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations")
    ngram: int = Field(5, ge=1, le=20, description="words per shingle (shorter documents: one shingle)")
    seed: int = Field(1, description="MinHash permutation seed")
    candidate_recall: float = Field(
        0.995,
        gt=0.5,
        lt=1,
        description="LSH bands x rows are chosen so that a pair exactly at the threshold becomes a candidate with "
        "this probability (more bands: higher recall, more candidates to verify)",
    )


class MixtureConfig(StrictModel):
    """Target token proportions of the train split, reached by down-sampling and by repeating (epochs)."""

    target: dict[str, float] | None = Field(
        None, description="language -> share of train tokens (sums to 1); null keeps natural proportions"
    )
    total_tokens: int | None = Field(
        None, gt=0, description="train tokens wanted; null: the most that needs no language beyond max_epochs"
    )
    max_epochs: float = Field(1.0, ge=1.0, description="most times a language's documents may be repeated")
    seed: int = Field(0, description="order in which documents are picked and laid out")

    @field_validator("target")
    @classmethod
    def _sums_to_one(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v is None:
            return v
        if any(x < 0 for x in v.values()) or not v:
            raise ValueError("mixture.target shares must be >= 0")
        total = sum(v.values())
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            raise ValueError(f"mixture.target shares sum to {total:g}: they must sum to 1")
        return v


class SplitConfig(StrictModel):
    """Train/validation split by document, deterministic by content hash."""

    val_fraction: float = Field(0.02, ge=0, lt=1)


class TokenizerConfig(StrictModel):
    """The tokenizer the shards are written with: the tokenizer stage's output (`jobs.tokenizer`). Preprocessing
    never trains one; the dataset records it (path, sha256, vocabulary) and pretraining takes it from there."""

    path: str = Field(
        description="tokenizer dir or tokenizer.json; relative: cwd, $TULPAR_HOME/tokenizers, $TULPAR_DATA/tokenizers",
    )
    batch_size: int = Field(256, gt=0, description="documents per encode_batch call")
    encoder: Literal["auto", "fast", "hf"] = Field(
        "auto",
        description="fast: tiktoken's BPE over the same vocabulary (same ids, ~5x faster; byte-level BPE "
        "tokenizers only, checked when loaded and against HF on every 64th document); hf: Hugging Face "
        "tokenizers; auto: fast where the tokenizer allows it, else hf",
    )


class OutputConfig(StrictModel):
    """Where the dataset goes, shard size, and the failure threshold."""

    dir: str | None = Field(
        None, description="dataset dir (path or s3://); default $TULPAR_STORAGE/datasets/<name>"
    )
    shard_max_tokens: int = Field(
        50_000_000, gt=0, description="a shard is cut once it holds this many tokens"
    )
    min_train_tokens: int = Field(
        16 * 128 + 1, gt=0, description="fail when fewer train tokens remain (one batch of 16 x 128 + 1)"
    )
    reuse: bool = Field(
        True, description="skip the work when the dataset dir already holds this config + inputs"
    )
    examples_per_reason: int = Field(3, ge=0, description="dropped-text examples per reason in the report")
    example_chars: int = Field(160, gt=0)


class ExecutionConfig(StrictModel):
    """How it runs; it does not change the output (and is not part of the content hash)."""

    num_workers: int | None = Field(None, gt=0, description="Ray CPU tasks at a time; null: all CPUs")
    batch_size: int = Field(512, gt=0, description="documents per Ray Data batch")
    local_num_cpus: int | None = Field(
        None, gt=0, description="CPUs of the local Ray started when RAY_ADDRESS is unset"
    )
    object_store_mb: int | None = Field(None, gt=0, description="object store of that local Ray")
    progress_bars: bool = True


class PreprocessConfig(StrictModel):
    """`python -m jobs.preprocess --config configs/preprocess/<name>.yaml`: raw text -> token shards."""

    name: str = Field(description="dataset name: output in datasets/<name>/")
    languages: list[str] = Field(min_length=1, description="output languages, in manifest order")
    sources: list[SourceSpec] = Field(
        min_length=1, description="inputs, read in this order (earlier wins dedup)"
    )
    read: ReadConfig = Field(default_factory=ReadConfig)
    normalize: NormalizeConfig = Field(default_factory=NormalizeConfig)
    langid: LangIdConfig = Field(default_factory=LangIdConfig)
    quality: QualityConfig = Field(default_factory=QualityConfig)
    pii: PiiConfig = Field(default_factory=PiiConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    mixture: MixtureConfig = Field(default_factory=MixtureConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    tokenizer: TokenizerConfig
    output: OutputConfig = Field(default_factory=OutputConfig)
    execution: ExecutionConfig = Field(default_factory=ExecutionConfig)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", v):
            raise ValueError(f"name {v!r} must be letters, digits, '.', '_' or '-' (it names a directory)")
        return v

    @model_validator(mode="after")
    def _check(self) -> PreprocessConfig:
        if len(set(self.languages)) != len(self.languages):
            raise ValueError(f"languages {self.languages} has duplicates")
        for lang in self.languages:
            if not re.fullmatch(r"[a-z]{2,3}", lang):
                raise ValueError(f"language {lang!r} must be an ISO 639 code such as kk, ru, en")
        if self.langid.enabled:
            missing = [lang for lang in self.languages if lang not in self.langid.candidates]
            if missing:
                raise ValueError(f"langid.candidates lacks output languages {missing}: add them")
            untrained = [lang for lang in self.languages if lang not in self.langid.fasttext_sources]
            if self.langid.method == "fasttext" and untrained:
                raise ValueError(
                    f"langid.fasttext_sources lacks output languages {untrained}: add their corpora "
                    "(or set langid.method=lingua)"
                )
        for s in self.sources:
            if s.language != "auto" and s.language not in self.languages:
                raise ValueError(
                    f"source {s.path!r} declares language {s.language!r}, not one of languages {self.languages}"
                )
            if s.language == "auto" and not self.langid.enabled:
                raise ValueError(f"source {s.path!r} has language auto, which needs langid.enabled=true")
        if self.mixture.target is not None and set(self.mixture.target) != set(self.languages):
            raise ValueError(
                f"mixture.target languages {sorted(self.mixture.target)} must be exactly languages {sorted(self.languages)}"
            )
        return self

    def content_sha256(self) -> str:
        """Hash of everything that determines the output: the config without its execution section, and the
        pipeline version (bumped whenever the code changes what a config produces)."""
        data = config_to_dict(self.model_copy(update={"execution": ExecutionConfig()}))
        blob = json.dumps({"pipeline_version": PIPELINE_VERSION, "config": data}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()

    def with_inputs(self, inputs: dict[str, StageResult]) -> PreprocessConfig:
        """`--input tokenizer=<tokenizer stage result>`: the shards are written with that tokenizer."""
        got = take_inputs("preprocess", inputs, {"tokenizer": (TokenizerOutputs,)})
        data = self.model_dump()
        if "tokenizer" in got:
            data["tokenizer"]["path"] = got["tokenizer"].tokenizer_dir
        return PreprocessConfig.model_validate(data)
