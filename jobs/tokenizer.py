"""Tokenizer training: `python -m jobs.tokenizer --config configs/tokenizer/<name>.yaml [key=value ...]`.

1. Draws a language-balanced sample (character budget per language, sources within a language weighted by
   size ** source_temperature, small languages repeated up to max_repeat) from raw text
   (TULPAR_DATA/<corpus_dir>/<lang>/) or from the kept documents of a `jobs.preprocess` dataset. Documents in
   the hash hold-out (the same split pretraining validates on) are never trained on.
2. Trains our byte-level BPE (`llm_core.tokenizer.train_bpe`: pre-tokenizer, digits, NFC, superword stage) and
   the naive baseline (`train_naive_bpe`: HF defaults, same vocab size, the whole corpus in its natural mix).
3. Writes $TULPAR_HOME/tokenizers/<name>/: tokenizer.json + tokenizer_config.json (chat template) +
   special_tokens_map.json (loadable by transformers.AutoTokenizer and vLLM), config.yaml, sample.json,
   baseline/tokenizer.json, and report/ (jobs.tokenizer_report's comparison on the eval sets and on the held-out
   corpus text; with `sweep.vocab_sizes`, sweep.{md,csv,png} too).
4. Logs all of it to MLflow (experiment tulpar-tokenizer) and prints a summary and the JSON result.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, model_validator

from jobs.platform import tracking
from jobs.platform.cache import StageCache, stat_fingerprint
from jobs.platform.results import TokenizerOutputs
from jobs.platform.runtime import JobResult, Settings, main_entry
from jobs.reporting.plots import png_bytes, pyplot
from jobs.reporting.tokenizers import (
    EvalSetSpec,
    TokenizerRef,
    build_report,
    check_target_keys,
    flat_metrics,
    log_report_to_mlflow,
    print_summary,
    target_metrics,
)
from llm_core.chat_data import prompt_to_messages, read_jsonl, record_to_messages
from llm_core.config import StrictModel, config_to_dict
from llm_core.data import DataError
from llm_core.io import atomic_dir, atomic_write_bytes, atomic_write_json, atomic_write_text
from llm_core.text import iter_documents, text_files
from llm_core.tokenizer import (
    LLAMA_BPE,
    SPECIAL_TOKENS,
    BalancedSample,
    DocumentSource,
    Tokenizer,
    check_llama_bpe_recipe,
    sample_balanced,
    train_bpe,
    train_naive_bpe,
)
from llm_core.tokenizer_eval import EvalText, LoadedTokenizer, count_tokens

log = logging.getLogger("tulpar.tokenizer")

OURS_LABEL = "ours"
BASELINE_NAME = "naive-baseline"


class TrainData(StrictModel):
    """Where the training text comes from and how much of each language is drawn."""

    source: Literal["raw", "dataset"] = Field(
        "raw", description="raw: text files per language; dataset: kept documents of a jobs.preprocess output"
    )
    corpus_dir: str = Field("corpus", description="raw: dir with <lang>/ subdirs, relative to TULPAR_DATA")
    text_field: str = Field("text", description="raw .jsonl: the field holding the text")
    txt_mode: Literal["line", "blank_line", "paragraph", "auto"] = Field(
        "auto",
        description="raw .txt: a document per line, per blank-line block, per hard-wrapped paragraph (wraps "
        "joined by spaces), or auto: paragraph for hard-wrapped prose, else line",
    )
    chat_sources: list[str] = Field(
        default_factory=list,
        description="SFT / preference .jsonl files (the formats jobs.sft and jobs.dpo read), relative to "
        "TULPAR_DATA or absolute: their message texts join the sample, by each record's `lang`",
    )
    dataset: str | None = Field(
        None, description="dataset: its dir (relative names resolve under $TULPAR_HOME/datasets)"
    )
    dataset_tokenizer: str | None = Field(
        None, description="dataset: tokenizer to decode its shards when the manifest has no tokenizer.path"
    )
    budgets: dict[str, int | None] = Field(
        default_factory=lambda: {"kk": 3_000_000, "ru": 3_000_000, "en": 3_000_000},
        min_length=1,
        description="characters per language (null: all of it); the keys are the languages",
    )
    source_temperature: float = Field(
        0.5, ge=0, le=1, description="source weight = size ** t within a language (1 natural, 0 equal)"
    )
    upsample: bool = Field(True, description="repeat a source that has less text than its share")
    max_repeat: float = Field(4.0, ge=1, description="at most this many passes over a source")
    holdout_fraction: float = Field(
        0.03, ge=0, lt=1, description="documents held out by content hash: never trained on, measured"
    )
    heldout_chars: int = Field(
        200_000, ge=0, description="held-out characters per language kept for the report"
    )
    min_chars: int = Field(1, ge=1, description="shorter documents are skipped")
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> TrainData:
        if self.source == "dataset" and not self.dataset:
            raise ValueError("data.source=dataset needs data.dataset (a jobs.preprocess output dir or name)")
        bad = {k: v for k, v in self.budgets.items() if v is not None and v <= 0}
        if bad:
            raise ValueError(f"data.budgets must be positive character counts or null, got {bad}")
        return self


class BPESpec(StrictModel):
    """Our tokenizer's recipe (llm_core.tokenizer.train_bpe)."""

    vocab_size: int = Field(32000, gt=262)
    min_frequency: int = Field(2, ge=1)
    pre_tokenizer: Literal["bytelevel", "gpt2", "llama3", "llama-bpe"] = Field(
        "gpt2",
        description="bytelevel: HF ByteLevel regex; gpt2 / llama3: those regexes written out; llama-bpe: exactly "
        "llama.cpp's (needs normalization none, superword_fraction 0; exports to GGUF, docs/gguf.md)",
    )
    digits: Literal["individual", "group3", "free"] = Field(
        "group3", description="numbers: one digit per pre-token, up to 3, or unlimited"
    )
    normalization: Literal["nfc", "none"] = "nfc"
    superword_fraction: float = Field(
        0.15, ge=0, lt=1, description="share of merges learned across spaces in a second stage (0: off)"
    )
    superword_span: Literal["words", "phrases"] = Field(
        "phrases",
        description="superword chunks: runs of words with their punctuation (phrases) or letter words only",
    )
    extra_special_tokens: list[str] = Field(
        default_factory=list, description=f"added after Tulpar's {SPECIAL_TOKENS}"
    )
    model_max_length: int = Field(32768, gt=0, description="written to tokenizer_config.json")

    @model_validator(mode="after")
    def _check(self) -> BPESpec:
        if self.pre_tokenizer == LLAMA_BPE:
            check_llama_bpe_recipe(self.digits, self.normalization, self.superword_fraction)
        return self


class BaselineSpec(StrictModel):
    """The naive baseline: HF ByteLevelBPETokenizer defaults at the same vocab size."""

    enabled: bool = True
    sample: Literal["natural", "balanced"] = Field(
        "natural",
        description="natural: every document of the same sources, no balancing; balanced: our exact sample",
    )


class ReportSpec(StrictModel):
    """The comparison written to report/: eval sets, reference tokenizers and targets for our tokenizer."""

    eval_sets: list[EvalSetSpec] = Field(
        default_factory=lambda: [EvalSetSpec.model_validate(n) for n in ("flores200_devtest", "ntrex128")]
    )
    references: list[TokenizerRef] = Field(default_factory=list, description="e.g. [qwen3, llama3, gemma3]")
    heldout: bool = Field(True, description="also measure the held-out corpus documents (not parallel)")
    pivot: str = "en"
    targets: dict[str, dict[str, int]] = Field(
        default_factory=dict, description="eval set -> language -> most tokens allowed for our tokenizer"
    )

    @model_validator(mode="after")
    def _check(self) -> ReportSpec:
        check_target_keys(self.targets, self.eval_sets, [lang for e in self.eval_sets for lang in e.files])
        return self


class SweepSpec(StrictModel):
    """Train the same recipe at other vocab sizes and plot tokens against vocab size."""

    vocab_sizes: list[int] = Field(default_factory=list, description="e.g. [16000, 32000, 48000, 64000]")
    baseline: bool = Field(True, description="train the baseline at each size too")

    @model_validator(mode="after")
    def _check(self) -> SweepSpec:
        small = [v for v in self.vocab_sizes if v <= 262]
        if small:
            raise ValueError(f"sweep.vocab_sizes must be > 262, got {small}")
        return self


class TokenizerJobConfig(StrictModel):
    name: str = Field(description="output dir $TULPAR_HOME/tokenizers/<name>/")
    data: TrainData = Field(default_factory=TrainData)
    tokenizer: BPESpec = Field(default_factory=BPESpec)
    baseline: BaselineSpec = Field(default_factory=BaselineSpec)
    report: ReportSpec = Field(default_factory=ReportSpec)
    sweep: SweepSpec = Field(default_factory=SweepSpec)
    show_progress: bool = Field(True, description="progress bars while sampling and training")


# ------------------------------------------------------------------ training text


def raw_sources(cfg: TrainData, settings: Settings) -> dict[str, list[DocumentSource]]:
    """Every .txt/.jsonl(.gz) file under <corpus_dir>/<lang>/, weighted by its size in bytes."""
    root = (
        Path(cfg.corpus_dir) if Path(cfg.corpus_dir).is_absolute() else settings.require_data(cfg.corpus_dir)
    )
    out: dict[str, list[DocumentSource]] = {}
    for lang in cfg.budgets:
        lang_dir = root / lang
        if not lang_dir.is_dir():
            raise ValueError(
                f"no text for language {lang!r}: {lang_dir} does not exist (add it or remove {lang!r} from "
                "data.budgets)"
            )

        def opener(p: Path) -> Any:
            return lambda: iter_documents(p, text_field=cfg.text_field, txt_mode=cfg.txt_mode)

        out[lang] = [DocumentSource(str(p), p.stat().st_size, opener(p)) for p in text_files(lang_dir)]
    return out


def chat_record_text(rec: dict, where: str) -> str:
    """The text a model reads from one SFT or preference record: its message contents (for a preference pair,
    the prompt turns then the chosen and the rejected response), without the chat template's markup."""
    if "prompt" in rec:
        for key in ("chosen", "rejected"):
            if not isinstance(rec.get(key), str):
                raise DataError(f"{where}: preference records need string 'chosen' and 'rejected'")
        parts = [m["content"] for m in prompt_to_messages(rec["prompt"], where)]
        parts += [rec["chosen"].strip(), rec["rejected"].strip()]
    else:
        parts = [m["content"] for m in record_to_messages(rec, where)]
    return "\n\n".join(p for p in parts if p)


def chat_sources(cfg: TrainData, settings: Settings) -> dict[str, list[DocumentSource]]:
    """One source per (chat file, language) for the languages in data.budgets; each record names its
    language in `lang` (other languages are skipped)."""
    out: dict[str, list[DocumentSource]] = {}
    for entry in cfg.chat_sources:
        path = Path(entry) if Path(entry).is_absolute() else settings.data / entry
        if not path.is_file():
            raise ValueError(
                f"data.chat_sources: {path} is not a file (TULPAR_DATA={settings.data}): fix the path, or "
                f"leave it out (data.chat_sources=[] trains on the corpus alone)"
            )
        texts: dict[str, list[str]] = {}
        for where, rec in read_jsonl([path]):
            lang = rec.get("lang")
            if not isinstance(lang, str):
                raise DataError(
                    f"{where}: no 'lang' field: chat records used for tokenizer training name their language "
                    '(e.g. "lang": "kk")'
                )
            if lang in cfg.budgets:
                texts.setdefault(lang, []).append(chat_record_text(rec, where))
        for lang, docs in texts.items():  # read once: sampling opens a source once per sample drawn
            size = sum(len(d.encode("utf-8")) for d in docs)
            out.setdefault(lang, []).append(DocumentSource(f"{path}#{lang}", size, lambda d=docs: iter(d)))
    return out


def dataset_sources(cfg: TrainData, settings: Settings) -> tuple[dict[str, list[DocumentSource]], str]:
    """The kept train documents of a jobs.preprocess dataset, decoded from its shards with the tokenizer that
    wrote them (byte-level BPE decodes losslessly); documents the mixture repeated are read once.
    Returns the sources and the manifest's sha256."""
    path = Path(cfg.dataset or "")
    if not path.is_absolute() and not path.exists():
        path = settings.home / "datasets" / path
    manifest_file = path / "manifest.json"
    if not manifest_file.is_file():
        raise ValueError(
            f"dataset {cfg.dataset!r}: {manifest_file} not found: run jobs.preprocess first or fix data.dataset"
        )
    try:
        from llm_core.shards import TokenDataset
    except ImportError:
        raise ValueError(
            "data.source=dataset needs llm_core.shards (the preprocessing stage), which this checkout lacks: "
            "use data.source=raw"
        ) from None
    from tokenizers import Tokenizer as HFTokenizer

    ds = TokenDataset.open(path)
    tok_path = ds.manifest["tokenizer"].get("path") or cfg.dataset_tokenizer
    if not tok_path:
        raise ValueError(
            f"dataset {path}: its manifest names no tokenizer path: set data.dataset_tokenizer to the tokenizer "
            f"that wrote it (sha256 {ds.tokenizer_sha256[:12]}…)"
        )
    tok_file = Path(tok_path)
    if tok_file.is_dir():
        tok_file = tok_file / "tokenizer.json"
    if not tok_file.is_file():
        raise ValueError(f"dataset tokenizer {tok_file} not found: set data.dataset_tokenizer")
    decoder = HFTokenizer.from_file(str(tok_file))
    sha = hashlib.sha256(decoder.to_str().encode("utf-8")).hexdigest()
    if sha != ds.tokenizer_sha256:
        raise ValueError(
            f"tokenizer {tok_file} (sha256 {sha[:12]}…) is not the one that wrote dataset {path} "
            f"({ds.tokenizer_sha256[:12]}…): set data.dataset_tokenizer to the right one"
        )
    eos = ds.eos_id

    def documents(lang: str) -> Iterator[str]:
        seen: set[bytes] = set()
        batch: list[list[int]] = []

        def flush() -> Iterator[str]:
            for text in decoder.decode_batch(batch, skip_special_tokens=False):
                key = hashlib.sha1(text.encode("utf-8")).digest()[:8]
                if key not in seen:
                    seen.add(key)
                    yield text

        for doc in ds.documents("train", lang):
            ids = doc.tolist()
            batch.append(ids[:-1] if ids and ids[-1] == eos else ids)
            if len(batch) == 256:
                yield from flush()
                batch = []
        if batch:
            yield from flush()

    out: dict[str, list[DocumentSource]] = {}
    for lang in cfg.budgets:
        if lang not in ds.languages:
            raise ValueError(
                f"dataset {path} has no language {lang!r} (it has {ds.languages}): fix data.budgets"
            )
        size = int(ds.counts["train"][lang]["bytes"])
        out[lang] = [DocumentSource(f"{path}:train/{lang}", size, lambda lang=lang: documents(lang))]
    return out, hashlib.sha256(manifest_file.read_bytes()).hexdigest()


def draw_samples(
    cfg: TokenizerJobConfig, settings: Settings
) -> tuple[BalancedSample, BalancedSample | None, str | None]:
    """(our balanced sample, the baseline's sample or None, the dataset manifest sha256 or None)."""
    d = cfg.data
    manifest_sha = None
    if d.source == "raw":
        sources = raw_sources(d, settings)
    else:
        sources, manifest_sha = dataset_sources(d, settings)
    for lang, extra in chat_sources(d, settings).items():
        sources[lang] = list(sources[lang]) + extra
    common = dict(
        holdout_fraction=d.holdout_fraction,
        min_chars=d.min_chars,
        seed=d.seed,
        show_progress=cfg.show_progress,
    )
    ours = sample_balanced(
        sources,
        d.budgets,
        temperature=d.source_temperature,
        upsample=d.upsample,
        max_repeat=d.max_repeat,
        heldout_chars=d.heldout_chars,
        **common,
    )
    baseline = None
    if cfg.baseline.enabled:
        if cfg.baseline.sample == "balanced":
            baseline = ours
        else:  # every document of every source, as the files have them
            baseline = sample_balanced(
                sources,
                dict.fromkeys(d.budgets),
                temperature=1.0,
                upsample=False,
                heldout_chars=0,
                **common,
            )
    return ours, baseline, manifest_sha


# ------------------------------------------------------------------ training


def train_ours(cfg: TokenizerJobConfig, docs: list[str], vocab_size: int) -> Tokenizer:
    t = cfg.tokenizer
    special = SPECIAL_TOKENS + [s for s in t.extra_special_tokens if s not in SPECIAL_TOKENS]
    tok = train_bpe(
        docs,
        vocab_size,
        min_frequency=t.min_frequency,
        special_tokens=special,
        show_progress=cfg.show_progress,
        pre_tokenizer=t.pre_tokenizer,
        digits=t.digits,
        normalization=t.normalization,
        superword_fraction=t.superword_fraction,
        superword_span=t.superword_span,
    )
    tok.model_max_length = t.model_max_length
    return tok


def _sample_summary(sample: BalancedSample) -> dict[str, Any]:
    return {
        "chars": {lang: sample.chars(lang) for lang in sample.train},
        "documents": {lang: len(docs) for lang, docs in sample.train.items()},
        "heldout_documents": {lang: len(docs) for lang, docs in sample.heldout.items()},
        "sources": [s.to_dict() for s in sample.stats],
    }


# ------------------------------------------------------------------ vocab sweep


def run_sweep(
    cfg: TokenizerJobConfig,
    ours: BalancedSample,
    baseline: BalancedSample | None,
    texts: list[EvalText],
    trained: dict[tuple[str, int], LoadedTokenizer],
    references: list[LoadedTokenizer],
    out_dir: Path,
) -> dict[str, Any]:
    """Tokens per eval set x language at each vocab size for our recipe (and the baseline); sweep.{csv,md,png}."""
    languages = list(cfg.data.budgets)

    def count_rows(name: str, vocab_size: int, tok: LoadedTokenizer) -> list[dict[str, Any]]:
        return [
            {
                "tokenizer": name,
                "vocab_size": vocab_size,
                "eval_set": text.name,
                "language": lang,
                "tokens": count_tokens(tok, text.lines[lang]),
            }
            for text in texts
            for lang in languages
            if lang in text.lines
        ]

    rows: list[dict[str, Any]] = []
    for vocab in sorted(set(cfg.sweep.vocab_sizes)):
        for kind in (OURS_LABEL, BASELINE_NAME):
            if kind == BASELINE_NAME and (baseline is None or not cfg.sweep.baseline):
                continue
            tok = trained.get((kind, vocab))
            if tok is None:
                started = time.perf_counter()
                if kind == OURS_LABEL:
                    hf = train_ours(cfg, ours.documents(), vocab).tk
                else:
                    hf = train_naive_bpe(baseline.documents(), vocab, show_progress=cfg.show_progress)
                tok = LoadedTokenizer(f"{kind}-{vocab}", hf, f"sweep {kind} {vocab}")
                print(
                    f"sweep: trained {kind} at {vocab:,} in {time.perf_counter() - started:.0f} s", flush=True
                )
            rows += count_rows(kind, vocab, tok)
    for ref in references:
        rows += count_rows(ref.name, ref.vocab_size, ref)
    csv_text = "tokenizer,vocab_size,eval_set,language,tokens\n" + "".join(
        f"{r['tokenizer']},{r['vocab_size']},{r['eval_set']},{r['language']},{r['tokens']}\n" for r in rows
    )
    files = {
        "sweep_csv": str(atomic_write_text(out_dir / "sweep.csv", csv_text)),
        "sweep_md": str(
            atomic_write_text(out_dir / "sweep.md", render_sweep_md(rows, texts, languages, cfg))
        ),
        "sweep_png": str(
            atomic_write_bytes(out_dir / "sweep.png", plot_sweep(rows, texts, languages, cfg.report.targets))
        ),
    }
    return {"rows": rows, "files": files}


def render_sweep_md(
    rows: list[dict[str, Any]], texts: list[EvalText], languages: list[str], cfg: TokenizerJobConfig
) -> str:
    out = [
        "# Vocabulary sweep",
        "",
        f"Recipe of `{cfg.name}` retrained at each vocab size; total tokens.",
        "",
    ]
    for text in texts:
        langs = [lang for lang in languages if lang in text.lines]
        out += [f"## {text.name}", "", "| tokenizer | vocab | " + " | ".join(langs) + " |"]
        out.append("|---|---:|" + "---:|" * len(langs))
        keys = dict.fromkeys((r["tokenizer"], r["vocab_size"]) for r in rows if r["eval_set"] == text.name)
        for name, vocab in keys:
            cells = []
            for lang in langs:
                r = next(
                    x
                    for x in rows
                    if x["eval_set"] == text.name
                    and x["tokenizer"] == name
                    and x["vocab_size"] == vocab
                    and x["language"] == lang
                )
                target = cfg.report.targets.get(text.name, {}).get(lang)
                mark = (
                    "" if target is None or name != OURS_LABEL else (" ✓" if r["tokens"] <= target else " ✗")
                )
                cells.append(f"{r['tokens']:,}{mark}")
            out.append(f"| {name} | {vocab:,} | " + " | ".join(cells) + " |")
        targets = cfg.report.targets.get(text.name)
        if targets:
            out += ["", "Targets (≤): " + ", ".join(f"{k} {v:,}" for k, v in targets.items()) + "."]
        out.append("")
    return "\n".join(out)


def plot_sweep(
    rows: list[dict[str, Any]],
    texts: list[EvalText],
    languages: list[str],
    targets: dict[str, dict[str, int]],
) -> bytes:
    """One panel per eval set: tokens vs vocab size per language (ours solid, baseline dashed, references as
    points, targets dotted)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(texts), figsize=(5.2 * len(texts), 4.2), dpi=100, squeeze=False)
    colors = {lang: f"C{i}" for i, lang in enumerate(languages)}
    markers = ["o", "s", "^", "D", "v", "P"]
    swept = (OURS_LABEL, BASELINE_NAME)
    for ax, text in zip(axes[0], texts):
        here = [r for r in rows if r["eval_set"] == text.name]
        top = 1.12 * max(r["tokens"] for r in here if r["tokenizer"] in swept)
        refs = list(dict.fromkeys(r["tokenizer"] for r in here if r["tokenizer"] not in swept))
        off_scale: list[str] = []
        for lang in [lang for lang in languages if lang in text.lines]:
            mine = [r for r in here if r["language"] == lang]
            for kind, style in ((OURS_LABEL, "-"), (BASELINE_NAME, "--")):
                pts = sorted((r["vocab_size"], r["tokens"]) for r in mine if r["tokenizer"] == kind)
                if pts:
                    ax.plot(*zip(*pts), style, marker=".", color=colors[lang], label=f"{kind} {lang}")
            for i, ref in enumerate(refs):
                for r in (r for r in mine if r["tokenizer"] == ref):
                    if r["tokens"] > top:  # keep the sweep readable: name what does not fit
                        off_scale.append(f"{ref} {lang} {r['tokens'] / 1000:.0f}k")
                        continue
                    ax.scatter(
                        [r["vocab_size"]],
                        [r["tokens"]],
                        marker=markers[i % len(markers)],
                        color=colors[lang],
                        s=24,
                    )
            target = targets.get(text.name, {}).get(lang)
            if target:
                ax.axhline(target, color=colors[lang], ls=":", lw=1)
        for i, ref in enumerate(refs):  # legend entries for the reference markers, colour-neutral
            ax.scatter([], [], marker=markers[i % len(markers)], color="grey", s=24, label=ref)
        ax.set_ylim(top=top)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("vocabulary size (log scale; markers: references)")
        ax.set_ylabel("tokens (total)")
        title = f"{text.name}: tokens vs vocab"
        if targets.get(text.name):
            title += " (dotted: targets)"
        if off_scale:
            title += "\noff scale: " + ", ".join(off_scale)
        ax.set_title(title, fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2, loc="upper right")
    return png_bytes(fig)


# ------------------------------------------------------------------ the job


def main(cfg: TokenizerJobConfig, settings: Settings) -> JobResult:
    languages = list(cfg.data.budgets)
    # Fail fast on bad eval/reference inputs before minutes of training.
    texts = [spec.load(settings, languages) for spec in cfg.report.eval_sets]
    references = [ref.load(settings) for ref in cfg.report.references]
    reserved = {cfg.name, BASELINE_NAME} & {r.name for r in references}
    if reserved:
        raise ValueError(f"report.references may not be named {sorted(reserved)}: rename them")

    cache = StageCache(
        settings, "tokenizer", {"config": config_to_dict(cfg), "inputs": input_fingerprint(cfg, settings)}
    )
    if (stored := cache.lookup()) is not None:
        return stored
    started = time.perf_counter()
    ours_sample, base_sample, manifest_sha = draw_samples(cfg, settings)
    for s in ours_sample.stats:
        print(
            f"sample {s.language}: {s.sampled_chars:>10,} chars ({s.repeats:.2f}x) from {Path(s.source).name}",
            flush=True,
        )
    out_dir = settings.path("tokenizers", cfg.name)
    tags = {"tulpar.tokenizer_name": cfg.name}
    if manifest_sha:
        tags["tulpar.dataset_manifest_sha256"] = manifest_sha
    with tracking.start_run(settings, "tokenizer", cfg, run_name=cfg.name, tags=tags) as run:
        t0 = time.perf_counter()
        tok = train_ours(cfg, ours_sample.documents(), cfg.tokenizer.vocab_size)
        train_s = time.perf_counter() - t0
        print(f"trained {cfg.name}: {tok.vocab_size:,} tokens in {train_s:.0f} s", flush=True)
        _set_tag("tulpar.tokenizer_sha256", tok.sha256)
        baseline_tk = None
        if base_sample is not None:
            t0 = time.perf_counter()
            baseline_tk = train_naive_bpe(
                base_sample.documents(), cfg.tokenizer.vocab_size, show_progress=cfg.show_progress
            )
            print(f"trained {BASELINE_NAME}: in {time.perf_counter() - t0:.0f} s", flush=True)

        with atomic_dir(out_dir) as tmp:
            tok.save(tmp)
            atomic_write_text(tmp / "config.yaml", yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
            sample_info = {"ours": _sample_summary(ours_sample)}
            if base_sample is not None and base_sample is not ours_sample:
                sample_info["baseline"] = _sample_summary(base_sample)
            atomic_write_json(tmp / "sample.json", sample_info)
            if baseline_tk is not None:
                (tmp / "baseline").mkdir()
                baseline_tk.save(str(tmp / "baseline" / "tokenizer.json"))

            measured = [LoadedTokenizer(cfg.name, tok.tk, str(out_dir / "tokenizer.json"))]
            if baseline_tk is not None:
                measured.append(
                    LoadedTokenizer(BASELINE_NAME, baseline_tk, str(out_dir / "baseline" / "tokenizer.json"))
                )
            report_texts = list(texts)
            if cfg.report.heldout and any(ours_sample.heldout.values()):
                held = {k: v for k, v in ours_sample.heldout.items() if v}
                report_texts.append(EvalText("heldout", held, parallel=False))
            report = build_report(
                measured + references,
                report_texts,
                tmp / "report",
                languages=languages,
                pivot=cfg.report.pivot,
                targets=cfg.report.targets,
                subject=cfg.name,
                title=f"Tokenizer {cfg.name}",
                show_progress=cfg.show_progress,
            )
            sweep = None
            if cfg.sweep.vocab_sizes:
                trained = {(OURS_LABEL, cfg.tokenizer.vocab_size): measured[0]}
                if baseline_tk is not None:
                    trained[(BASELINE_NAME, cfg.tokenizer.vocab_size)] = measured[1]
                sweep = run_sweep(cfg, ours_sample, base_sample, texts, trained, references, tmp / "report")

            metrics = _headline_metrics(report, cfg.name, train_s, time.perf_counter() - started)
            _log_outputs(tmp, report, sweep, metrics)

    print_summary(report, report_texts, languages)
    report_dir = out_dir / "report"
    outputs = TokenizerOutputs(
        tokenizer_dir=str(out_dir),
        tokenizer_json=str(out_dir / "tokenizer.json"),
        tokenizer_sha256=tok.sha256,
        vocab_size=tok.vocab_size,
        report_md=str(report_dir / "report.md"),
        report_csv=str(report_dir / "metrics.csv"),
        plots=sorted(
            str(report_dir / Path(f).name) for k, f in report["files"].items() if k.startswith("plot")
        ),
        baseline_tokenizer_json=str(out_dir / "baseline" / "tokenizer.json")
        if baseline_tk is not None
        else None,
        sweep_files={k: str(report_dir / Path(f).name) for k, f in sweep["files"].items()} if sweep else {},
    )
    return cache.store(
        JobResult(
            "tokenizer", outputs=outputs, metrics=metrics, mlflow_run_id=run.info.run_id, output_dir=out_dir
        )
    )


def input_fingerprint(cfg: TokenizerJobConfig, settings: Settings) -> dict[str, Any]:
    """What the tokenizer is trained and measured on, for the stage's cache key: the corpus files (path, size,
    modification time: re-reading a large corpus just to hash it would cost as much as sampling it), the chat
    sources, or the dataset's manifest."""
    d = cfg.data
    roots: list[Path] = []
    if d.source == "raw":
        corpus = Path(d.corpus_dir)
        roots.append(corpus if corpus.is_absolute() else settings.data / corpus)
    elif d.dataset:
        dataset = Path(d.dataset)
        roots.append(
            (dataset if dataset.exists() else settings.home / "datasets" / dataset) / "manifest.json"
        )
    roots += [Path(c) if Path(c).is_absolute() else settings.data / c for c in d.chat_sources]
    if cfg.report.eval_sets:  # the report measures the eval sets and the reference tokenizers
        roots.append(settings.data / "eval")
    if cfg.report.references:
        roots.append(settings.data / "tokenizers")
    return {str(r): stat_fingerprint(r) for r in roots}


def _log_outputs(
    out_dir: Path, report: dict[str, Any], sweep: dict[str, Any] | None, metrics: dict[str, float]
) -> None:
    """MLflow: the tokenizer files (tokenizer/), the sample (config/), the report and sweep (report/), the
    headline metrics, and the sweep as metric curves over vocab size (step = vocab size)."""
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        tracking.log_figure_file(out_dir / f, "tokenizer")
    tracking.log_figure_file(out_dir / "sample.json", "config")
    log_report_to_mlflow(report)
    tracking.log_metrics(metrics)
    if sweep is None:
        return
    for f in sweep["files"].values():
        tracking.log_figure_file(Path(f), "report")
    for vocab in sorted({r["vocab_size"] for r in sweep["rows"]}):
        tracking.log_metrics(
            {
                f"sweep/{r['eval_set']}/{r['tokenizer']}/{r['language']}/tokens": r["tokens"]
                for r in sweep["rows"]
                if r["vocab_size"] == vocab and r["tokenizer"] in (OURS_LABEL, BASELINE_NAME)
            },
            step=vocab,
        )


def _set_tag(key: str, value: str) -> None:
    """A tag known only after the run started (jobs.platform.tracking sets the standard ones at start)."""
    import mlflow

    mlflow.set_tag(key, value)


def _headline_metrics(report: dict[str, Any], name: str, train_s: float, total_s: float) -> dict[str, float]:
    rows = report["rows"]
    metrics = {
        k.replace(f"/{name}/", "/ours/"): v
        for k, v in flat_metrics(
            [r for r in rows if r.tokenizer in (name, BASELINE_NAME)], ("tokens",)
        ).items()
    }
    for r in rows:
        if r.tokenizer == name:
            metrics[f"{r.eval_set}/ours/{r.language}/bytes_per_token"] = r.bytes_per_token
            metrics[f"{r.eval_set}/ours/{r.language}/roundtrip_rate"] = r.roundtrip_rate
    ours = {(r.eval_set, r.language): r.tokens for r in rows if r.tokenizer == name}
    base = {(r.eval_set, r.language): r.tokens for r in rows if r.tokenizer == BASELINE_NAME}
    if base:
        metrics["beats_baseline_all"] = float(all(ours[k] < base[k] for k in base))
    metrics.update(target_metrics(report))
    metrics["train_seconds"] = train_s
    metrics["total_seconds"] = total_s
    return metrics


if __name__ == "__main__":
    main_entry("tokenizer", TokenizerJobConfig, main)
