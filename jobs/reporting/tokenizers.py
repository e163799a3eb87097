"""Tokenizer comparison, as a library: which tokenizers and eval sets (`TokenizerRef`, `EvalSetSpec`, the
FLORES-200/NTREX-128 presets), the measurements (`compute_metrics`, per `llm_core.tokenizer_eval`), targets, and
the report written from them (report.md, metrics.csv, report.json, one PNG per eval set). Used by the stages
`jobs.tokenizer_report` (any tokenizers) and `jobs.tokenizer` (the report next to a trained tokenizer).
"""

from __future__ import annotations

import csv
import io
import logging
import math
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator
from tqdm.auto import tqdm

from jobs.platform import tracking
from jobs.platform.runtime import Settings
from jobs.reporting.plots import png_bytes, pyplot
from llm_core.config import StrictModel
from llm_core.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from llm_core.tokenizer_eval import (
    EvalText,
    LoadedTokenizer,
    TokenizerMetrics,
    add_parity,
    load_parallel,
    load_tokenizer,
    measure,
)

log = logging.getLogger("tulpar.reporting.tokenizers")

# File names of the parallel eval sets shipped in TULPAR_DATA/eval/parallel, per language code.
FLORES_CODES = {
    "kk": "kaz_Cyrl",
    "ru": "rus_Cyrl",
    "en": "eng_Latn",
    "uz": "uzn_Latn",
    "ky": "kir_Cyrl",
    "tt": "tat_Cyrl",
    "tr": "tur_Latn",
    "uk": "ukr_Cyrl",
    "de": "deu_Latn",
    "zh": "zho_Hans",
}
NTREX_CODES = {
    "kk": "kaz",
    "ru": "rus",
    "en": "eng",
    "uz": "uzb",
    "ky": "kir",
    "tt": "tat",
    "tr": "tur",
    "uk": "ukr",
    "de": "deu",
    "zh": "zho-CN",
}
PRESETS: dict[str, tuple[str, dict[str, str]]] = {
    "flores200_devtest": (
        "eval/parallel/flores200_devtest",
        {lang: f"{code}.devtest" for lang, code in FLORES_CODES.items()},
    ),
    "ntrex128": (
        "eval/parallel/ntrex128",
        {lang: f"ntrex128.{code}.txt" for lang, code in NTREX_CODES.items()},
    ),
}


class TokenizerRef(StrictModel):
    """One tokenizer to compare. `path`: a tokenizer.json or a directory, absolute or relative to the working
    directory, $TULPAR_HOME/tokenizers or $TULPAR_DATA/tokenizers (so `qwen3` is the shipped reference and
    `kk-ru-en-32k` a tokenizer trained by jobs.tokenizer). `hub_id`: a Hugging Face repo, loaded with
    transformers.AutoTokenizer (online only). A plain string is shorthand for {name: <it>, path: <it>}."""

    name: str = Field(min_length=1)
    path: str | None = None
    hub_id: str | None = None
    revision: str | None = Field(None, description="hub revision (branch, tag or commit)")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, v: Any) -> Any:
        if isinstance(v, str):
            return {"name": v.rstrip("/").split("/")[-1] or v, "path": v}
        return v

    @model_validator(mode="after")
    def _one_source(self) -> TokenizerRef:
        if (self.path is None) == (self.hub_id is None):
            raise ValueError(f"tokenizer {self.name!r}: set exactly one of path or hub_id")
        return self

    def load(self, settings: Settings) -> LoadedTokenizer:
        dirs = [settings.home / "tokenizers", settings.data / "tokenizers"]
        return load_tokenizer(self.name, self.path, self.hub_id, revision=self.revision, search_dirs=dirs)


class EvalSetSpec(StrictModel):
    """Parallel eval text: one file per language in `dir` (relative to TULPAR_DATA unless absolute). A plain
    string names a preset: flores200_devtest or ntrex128."""

    name: str = Field(min_length=1)
    dir: str
    files: dict[str, str] = Field(description="language -> file name in dir")

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, v: Any) -> Any:
        if isinstance(v, str):
            if v not in PRESETS:
                raise ValueError(
                    f"unknown eval set {v!r}: use one of {sorted(PRESETS)} or give {{name, dir, files}}"
                )
            d, files = PRESETS[v]
            return {"name": v, "dir": d, "files": files}
        return v

    def load(self, settings: Settings, languages: list[str]) -> EvalText:
        root = Path(self.dir) if Path(self.dir).is_absolute() else settings.data / self.dir
        if not root.is_dir():
            raise ValueError(
                f"eval set {self.name!r}: directory {root} not found (TULPAR_DATA={settings.data}): set "
                "TULPAR_DATA or the eval set's dir"
            )
        files = {}
        for lang in languages:
            if lang not in self.files:
                raise ValueError(
                    f"eval set {self.name!r} has no eval file for language {lang!r} (it has "
                    f"{sorted(self.files)}): add files.{lang} or drop {lang!r} from languages"
                )
            files[lang] = root / self.files[lang]
        return load_parallel(self.name, files)


def check_target_keys(
    targets: dict[str, dict[str, int]], eval_sets: list[EvalSetSpec], languages: list[str]
) -> None:
    """Targets must name configured eval sets and languages (a typo would silently check nothing)."""
    names = [e.name for e in eval_sets]
    for set_name, per_lang in targets.items():
        if set_name not in names:
            raise ValueError(f"targets: eval set {set_name!r} is not one of eval_sets {names}")
        unknown = sorted(set(per_lang) - set(languages))
        if unknown:
            raise ValueError(f"targets.{set_name}: languages {unknown} are not in languages {languages}")


# ------------------------------------------------------------------ the report


def compute_metrics(
    tokenizers: list[LoadedTokenizer],
    texts: list[EvalText],
    languages: list[str],
    pivot: str,
    show_progress: bool = True,
) -> list[TokenizerMetrics]:
    """Every tokenizer on every language of every eval text; parity on parallel texts that have the pivot."""
    rows: list[TokenizerMetrics] = []
    jobs = [(t, x, lang) for x in texts for t in tokenizers for lang in languages if lang in x.lines]
    for tok, text, lang in tqdm(jobs, desc="measuring", unit="set", leave=False, disable=not show_progress):
        rows.append(measure(tok, text, lang))
    add_parity([r for r in rows if _is_parallel(texts, r.eval_set) and pivot in languages], pivot)
    return rows


def _is_parallel(texts: list[EvalText], name: str) -> bool:
    return next(t.parallel for t in texts if t.name == name)


def _fmt(v: float | int | None, kind: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if kind == "int":
        return f"{int(v):,}"
    if kind == "pct":
        return f"{100 * v:.1f}%"
    return f"{v:.{2 if kind == 'f2' else 3}f}"


TABLE_COLUMNS = [
    ("tokens", "tokens", "int"),
    ("fertility", "tokens/word", "f2"),
    ("chars_per_token", "chars/token", "f2"),
    ("bytes_per_token", "bytes/token", "f2"),
    ("parity", "parity vs pivot", "f2"),
    ("byte_fallback_share", "byte tokens", "pct"),
    ("split_3plus_share", "words in ≥3 tokens", "pct"),
    ("roundtrip_rate", "round-trip", "pct"),
    ("vocab_used", "vocab used", "int"),
    ("vocab_used_share", "vocab used %", "pct"),
]


def check_targets(
    rows: list[TokenizerMetrics], targets: dict[str, dict[str, int]], subject: str | None
) -> dict[str, dict[str, Any]]:
    """{"<set>/<lang>": {"target", "tokens", "met"}} for the subject tokenizer."""
    out: dict[str, dict[str, Any]] = {}
    if subject is None:
        return out
    for set_name, per_lang in targets.items():
        for lang, limit in per_lang.items():
            row = next(
                (r for r in rows if r.eval_set == set_name and r.language == lang and r.tokenizer == subject),
                None,
            )
            if row is not None:
                out[f"{set_name}/{lang}"] = {
                    "target": limit,
                    "tokens": row.tokens,
                    "met": row.tokens <= limit,
                }
    return out


def render_markdown(
    title: str,
    rows: list[TokenizerMetrics],
    texts: list[EvalText],
    tokenizers: list[LoadedTokenizer],
    languages: list[str],
    pivot: str,
    targets: dict[str, dict[str, Any]],
    plots: dict[str, str],
) -> str:
    """The report: totals per eval set (tokenizer x language), then every metric per language."""
    out = [f"# {title}", ""]
    out.append("Tokens are counted per line with no special tokens. Tokenizers:")
    out.append("")
    for t in tokenizers:
        out.append(f"- **{t.name}**: vocabulary {t.vocab_size:,}; {t.source}")
    out.append("")
    for text in texts:
        langs = [lang for lang in languages if lang in text.lines]
        if text.parallel:
            head = f"{len(next(iter(text.lines.values()))):,} lines, parallel"
        else:
            head = (
                ", ".join(f"{lang} {len(text.lines[lang]):,}" for lang in langs) + " documents, not parallel"
            )
        out += [f"## {text.name} ({head})", ""]
        out.append("| tokenizer | " + " | ".join(f"{lang} tokens" for lang in langs) + " |")
        out.append("|---|" + "---:|" * len(langs))
        for t in tokenizers:
            cells = []
            for lang in langs:
                r = _row(rows, text.name, t.name, lang)
                cell = _fmt(r.tokens, "int")
                if r.parity is not None and lang != pivot:
                    cell += f" ({r.parity:.2f}×)"
                cells.append(cell)
            out.append(f"| {t.name} | " + " | ".join(cells) + " |")
        out.append("")
        if text.parallel:
            out.append(f"(×: parity, tokens relative to {pivot} on the same lines)")
            out.append("")
        if text.name in plots:
            out += [f"![{text.name}]({plots[text.name]})", ""]
        for lang in langs:
            out += [f"### {text.name} · {lang}", ""]
            out.append("| tokenizer | " + " | ".join(h for _, h, _ in TABLE_COLUMNS) + " |")
            out.append("|---|" + "---:|" * len(TABLE_COLUMNS))
            for t in tokenizers:
                r = _row(rows, text.name, t.name, lang)
                out.append(
                    f"| {t.name} | "
                    + " | ".join(_fmt(getattr(r, k), kind) for k, _, kind in TABLE_COLUMNS)
                    + " |"
                )
            out.append("")
    if targets:
        out += [
            "## Targets",
            "",
            "| eval set / language | target (≤ tokens) | tokens | met |",
            "|---|---:|---:|---|",
        ]
        for key, v in targets.items():
            out.append(f"| {key} | {v['target']:,} | {v['tokens']:,} | {'yes' if v['met'] else '**no**'} |")
        out.append("")
    return "\n".join(out)


def _row(rows: list[TokenizerMetrics], eval_set: str, tokenizer: str, lang: str) -> TokenizerMetrics:
    return next(r for r in rows if r.eval_set == eval_set and r.tokenizer == tokenizer and r.language == lang)


def render_csv(rows: list[TokenizerMetrics]) -> str:
    buf = io.StringIO()
    fields = list(rows[0].to_dict()) if rows else []
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in r.to_dict().items()})
    return buf.getvalue()


def plot_eval_set(
    rows: list[TokenizerMetrics], text: EvalText, tokenizers: list[str], languages: list[str], pivot: str
) -> bytes:
    """PNG: grouped bars of total tokens per language per tokenizer, and parity next to it."""
    plt = pyplot()
    langs = [lang for lang in languages if lang in text.lines]
    with_parity = text.parallel and pivot in langs
    fig, axes = plt.subplots(1, 2 if with_parity else 1, figsize=(11 if with_parity else 6.5, 4), dpi=100)
    axes = list(axes) if with_parity else [axes]
    width = 0.8 / max(1, len(tokenizers))
    for panel, (ax, metric) in enumerate(zip(axes, ["tokens", "parity"])):
        for i, name in enumerate(tokenizers):
            xs = [j + (i - (len(tokenizers) - 1) / 2) * width for j in range(len(langs))]
            vals = [getattr(_row(rows, text.name, name, lang), metric) or 0.0 for lang in langs]
            bars = ax.bar(xs, vals, width, label=name)
            if metric == "tokens":
                ax.bar_label(
                    bars, labels=[f"{v / 1000:.1f}k" for v in vals], fontsize=6, rotation=90, padding=2
                )
        ax.set_xticks(range(len(langs)), langs)
        ax.grid(axis="y", alpha=0.3)
        if panel == 0:
            ax.set_ylabel("tokens (total, no special tokens)")
            ax.set_title(f"{text.name}: tokens per language")
            ax.margins(y=0.15)
        else:
            ax.axhline(1.0, color="k", lw=0.8)
            ax.set_ylabel(f"parity (tokens / {pivot} tokens)")
            ax.set_title("parity vs " + pivot)
    axes[-1].legend(fontsize=8)
    return png_bytes(fig)


def build_report(
    tokenizers: list[LoadedTokenizer],
    texts: list[EvalText],
    out_dir: Path,
    *,
    languages: list[str],
    pivot: str = "en",
    targets: dict[str, dict[str, int]] | None = None,
    subject: str | None = None,
    title: str = "Tokenizer comparison",
    show_progress: bool = True,
) -> dict[str, Any]:
    """Measure, then write report.md, metrics.csv, report.json and <eval set>.png into out_dir.
    Returns {"rows", "targets", "files"}."""
    rows = compute_metrics(tokenizers, texts, languages, pivot, show_progress)
    checked = check_targets(rows, targets or {}, subject)
    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    plots: dict[str, str] = {}
    names = [t.name for t in tokenizers]
    for text in texts:
        png = out_dir / f"{text.name}.png"
        atomic_write_bytes(png, plot_eval_set(rows, text, names, languages, pivot))
        plots[text.name] = png.name
        files[f"plot_{text.name}"] = str(png)
    md = render_markdown(title, rows, texts, tokenizers, languages, pivot, checked, plots)
    files["markdown"] = str(atomic_write_text(out_dir / "report.md", md))
    files["csv"] = str(atomic_write_text(out_dir / "metrics.csv", render_csv(rows)))
    payload = {
        "tokenizers": [{"name": t.name, "source": t.source, "vocab_size": t.vocab_size} for t in tokenizers],
        "eval_sets": [{"name": x.name, "parallel": x.parallel, "files": x.files} for x in texts],
        "pivot": pivot,
        "metrics": [r.to_dict() for r in rows],
        "targets": checked,
    }
    files["json"] = str(atomic_write_json(out_dir / "report.json", payload))
    return {"rows": rows, "targets": checked, "files": files}


def print_summary(report: dict[str, Any], texts: list[EvalText], languages: list[str]) -> None:
    """Print a report's short table (`summary_lines`) and whether each target is met."""
    for line in summary_lines(report["rows"], texts, languages):
        print(line, flush=True)
    for key, v in report["targets"].items():
        print(
            f"target {key}: {v['tokens']:,} <= {v['target']:,}: {'met' if v['met'] else 'NOT met'}",
            flush=True,
        )


def target_metrics(report: dict[str, Any]) -> dict[str, float]:
    """How many of the report's targets are met, of how many."""
    checked = report["targets"].values()
    return {"targets_met": float(sum(v["met"] for v in checked)), "targets_total": float(len(checked))}


def summary_lines(rows: list[TokenizerMetrics], texts: list[EvalText], languages: list[str]) -> list[str]:
    """A short printed table: total tokens per tokenizer x language for each eval set."""
    lines = []
    for text in texts:
        langs = [lang for lang in languages if lang in text.lines]
        lines.append(f"{text.name}: " + " / ".join(langs) + " tokens")
        for name in dict.fromkeys(r.tokenizer for r in rows if r.eval_set == text.name):
            vals = [_row(rows, text.name, name, lang) for lang in langs]
            cells = "  ".join(f"{v.tokens:>9,}" for v in vals)
            rt = min(v.roundtrip_rate for v in vals)
            lines.append(f"  {name:<22} {cells}   round-trip {100 * rt:.1f}%")
    return lines


def flat_metrics(
    rows: list[TokenizerMetrics], keys: tuple[str, ...] = ("tokens", "fertility", "parity")
) -> dict:
    """MLflow-style metrics: <eval set>/<tokenizer>/<language>/<metric>."""
    out: dict[str, float] = {}
    for r in rows:
        for k in keys:
            v = getattr(r, k)
            if v is not None:
                out[f"{r.eval_set}/{r.tokenizer}/{r.language}/{k}"] = float(v)
    return out


def log_report_to_mlflow(report: dict[str, Any], artifact_path: str = "report") -> None:
    for f in report["files"].values():
        tracking.log_figure_file(Path(f), artifact_path)
    tracking.log_metrics(flat_metrics(report["rows"]))
