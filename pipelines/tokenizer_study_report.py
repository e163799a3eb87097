"""The tokenizer study's report: per-variant figures with seed statistics, ties, the markdown report and the plots.

Input: one summary per variant (`pipelines.tokenizer_study` writes them), each holding the tokenizer figures
(tokens per byte and per word on the eval text, embedding share, vocabulary, Kazakh share) and, per budget and
seed, the model's bits-per-byte per eval set and language, training and generation bytes per second.

Statistics over seeds: the mean, a 95% confidence interval (Student's t, n-1 degrees of freedom; none from one
seed) and the seed-to-seed spread (largest minus smallest value). Two variants' means that differ by no more than
the larger of their spreads are a tie; with one seed there is no spread, so no difference is called (the report
says "one seed: not tested").
"""

from __future__ import annotations

import math
from pathlib import Path
from statistics import mean, stdev
from typing import Any

from jobs.reporting.plots import save_png

# Student's t 0.975 quantiles by degrees of freedom (scipy.stats.t.ppf(0.975, df)); beyond 30: the normal 1.96
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
BUDGET_TITLES = {
    "flops": "same training FLOPs",
    "bytes": "same training bytes",
}


def t975(df: int) -> float:
    if df in T975:
        return T975[df]
    return 2.042 if df <= 30 else 1.96


class Stat:
    """Values of one metric over seeds: mean, 95% CI half-width (None from one seed) and spread (max - min)."""

    def __init__(self, values: list[float]):
        if not values:
            raise ValueError("a statistic needs at least one value")
        self.values = values
        self.n = len(values)
        self.mean = mean(values)
        self.spread = max(values) - min(values) if self.n > 1 else None
        self.ci95 = t975(self.n - 1) * stdev(values) / math.sqrt(self.n) if self.n > 1 else None

    def fmt(self, digits: int = 3) -> str:
        if self.ci95 is None:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.ci95:.{digits}f}"


def compare(a: Stat, b: Stat) -> str:
    """'tie' when |mean a - mean b| <= the larger seed-to-seed spread, 'untested' with one seed, else 'lower' or
    'higher' (a against b)."""
    if a.spread is None or b.spread is None:
        return "untested"
    if abs(a.mean - b.mean) <= max(a.spread, b.spread):
        return "tie"
    return "lower" if a.mean < b.mean else "higher"


# ------------------------------------------------------------------ tables


def bpb_stat(summary: dict, budget: str, eval_set: str, lang: str) -> Stat | None:
    values = [
        run["bpb"][eval_set][lang]
        for run in summary["runs"]
        if run["budget"] == budget and lang in run["bpb"].get(eval_set, {})
    ]
    return Stat(values) if values else None


def run_stat(summary: dict, budget: str, key: str, lang: str | None = None) -> Stat | None:
    values = [
        (run[key][lang] if lang is not None else run[key])
        for run in summary["runs"]
        if run["budget"] == budget and (lang is None or lang in run[key])
    ]
    values = [v for v in values if v is not None]
    return Stat(values) if values else None


def ranking(summaries: list[dict], budget: str, eval_set: str, lang: str) -> str:
    """The variant with the lowest mean bpb and how each other variant compares with it."""
    stats = [(s["name"], bpb_stat(s, budget, eval_set, lang)) for s in summaries]
    stats = [(n, st) for n, st in stats if st is not None]
    if not stats:
        return "no runs"
    best_name, best = min(stats, key=lambda x: x[1].mean)
    parts = []
    for name, st in stats:
        if name == best_name:
            continue
        verdict = compare(st, best)
        word = {"tie": "tie", "higher": "worse", "untested": "one seed: not tested", "lower": "better"}[
            verdict
        ]
        parts.append(f"{name} {st.mean - best.mean:+.3f} ({word})")
    return f"**{best_name}** {best.fmt()}" + (f"; {', '.join(parts)}" if parts else "")


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def seeds_sentence(summaries: list[dict]) -> str:
    counts = {s["name"]: len({r["seed"] for r in s["runs"]}) for s in summaries}
    if all(n > 1 for n in counts.values()):
        return (
            f"Seeds per variant: {min(counts.values())}-{max(counts.values())}; means ± 95% CI (Student's t); a "
            "difference no larger than the seed-to-seed spread is a **tie**."
        )
    if all(n == 1 for n in counts.values()):
        return (
            "One seed per variant: no confidence intervals, and no difference is tested (a tie cannot be told "
            "from a real difference without the seed-to-seed spread)."
        )
    single = ", ".join(n for n, c in counts.items() if c == 1)
    return (
        "Means ± 95% CI (Student's t) where a variant has several seeds; a difference no larger than the "
        f"seed-to-seed spread is a **tie**. One seed only (no CI; their differences are not tested): {single}."
    )


def render_markdown(study: dict, summaries: list[dict], plots: dict[str, str]) -> str:
    langs, sets, budgets = study["languages"], study["eval_sets"], study["budgets"]
    lines = [
        f"# Tokenizer study: {study['name']}",
        "",
        study.get("description", "").strip(),
        "",
        f"Model: `{study['model']['name']}` shape (dim {study['model']['dim']}, {study['model']['num_layers']} "
        "layers), embedding and head sized to each tokenizer's vocabulary. " + seeds_sentence(summaries),
        "",
        "Budgets (from the reference variant "
        f"`{study['reference']}` at {study['reference_steps']} steps of {study['tokens_per_step']:,} tokens): "
        f"same training FLOPs = {study['budget_flops']:.3g} FLOPs; same training bytes = "
        f"{study['budget_bytes']:,.0f} bytes of text.",
        "",
        "## Eval text",
        "",
        "Every variant's bits-per-byte (and tokens per byte and per word) were computed on these documents "
        "(sha256 of the documents, each followed by a NUL byte):",
        "",
    ]
    rows = []
    for es in sets:
        for lang in langs:
            t = study["eval_text"][es][lang]
            rows.append([es, lang, str(t["docs"]), f"{t['bytes']:,}", f"`{t['text_sha256'][:16]}`"])
    lines += md_table(["eval set", "language", "documents", "bytes", "sha256"], rows)
    lines += ["", "## Tokenizers", ""]
    header = ["variant", "kind", "vocabulary", "kk share", "embedding share"]
    header += [f"tokens/byte {lang}" for lang in langs] + [f"tokens/word {lang}" for lang in langs]
    rows = []
    for s in summaries:
        tok = s["tokenizer"]
        share = "-" if tok["kk_share"] is None else f"{tok['kk_share']:.2f}"
        row = [s["name"], tok["kind"], f"{tok['vocab_size']:,}", share, f"{tok['embedding_share']:.1%}"]
        row += [f"{tok['tokens_per_byte'][lang]:.3f}" for lang in langs]
        row += [f"{tok['fertility'][lang]:.2f}" for lang in langs]
        rows.append(row)
    lines += md_table(header, rows)
    lines += [
        "",
        "Tokens per byte and per word (fertility: tokens per whitespace-separated word) are over all eval sets "
        "together. Embedding share: embedding (and untied head) parameters over all parameters.",
    ]
    for budget in budgets:
        lines += ["", f"## Bits per byte: {BUDGET_TITLES[budget]}", ""]
        header = ["variant", "steps", "training bytes"] + [f"{es} {lang}" for es in sets for lang in langs]
        rows = []
        for s in summaries:
            runs = [r for r in s["runs"] if r["budget"] == budget]
            if not runs:
                continue
            row = [s["name"], str(runs[0]["steps"]), f"{runs[0]['training_bytes']:,.0f}"]
            for es in sets:
                for lang in langs:
                    st = bpb_stat(s, budget, es, lang)
                    row.append(st.fmt() if st else "-")
            rows.append(row)
        lines += md_table(header, rows)
        lines += ["", "Lowest bits-per-byte and the others against it:", ""]
        for es in sets:
            for lang in langs:
                lines.append(f"- {es} {lang}: {ranking(summaries, budget, es, lang)}")
    lines += ["", "## Speed", ""]
    header = ["variant", "budget", "training bytes/s"] + [f"generation bytes/s {lang}" for lang in langs]
    header += [f"generation tokens/s {lang}" for lang in langs]
    header += [f"tokens/s ÷ tokens/byte {lang}" for lang in langs]
    rows = []
    for s in summaries:
        for budget in budgets:
            train = run_stat(s, budget, "training_bytes_per_s")
            if train is None:
                continue
            row = [s["name"], budget, train.fmt(0)]
            for key in ("generation_bytes_per_s", "generation_tokens_per_s"):
                for lang in langs:
                    st = run_stat(s, budget, key, lang)
                    row.append(st.fmt(0) if st else "-")
            for lang in langs:
                st = run_stat(s, budget, "generation_tokens_per_s", lang)
                tpb = s["tokenizer"]["tokens_per_byte"][lang]
                row.append(f"{st.mean / tpb:.0f}" if st else "-")
            rows.append(row)
    lines += md_table(header, rows)
    lines += [
        "",
        "Training bytes/s: the trainer's tokens/s (median of its logging windows after the first) times the "
        "training data's bytes per token. Generation: one prompt at a time, greedy, on the eval machine; bytes "
        "of the decoded answers over the wall time (`jobs.eval`'s `gen/<lang>/bytes_per_s`): what the model wrote, "
        "which for a barely trained model is not text like the eval text. tokens/s ÷ tokens/byte: the bytes/s the "
        "same decoding speed gives on text tokenized like the eval text (the tokenizer's compression at work).",
        "",
        "## Plots",
        "",
    ]
    for title, path in plots.items():
        lines += [f"![{title}]({Path(path).name})", ""]
    return "\n".join(lines).rstrip() + "\n"


# ------------------------------------------------------------------ plots


def _errorbar(ax: Any, xs: list[float], stats: list[Stat], **kw: Any) -> None:
    ys = [s.mean for s in stats]
    err = [s.ci95 or 0.0 for s in stats]
    ax.errorbar(xs, ys, yerr=err if any(err) else None, marker="o", capsize=3, **kw)


def plot_bpb_against(
    summaries: list[dict], study: dict, x_key: str, x_label: str, path: Path, log2: bool = False
) -> Path | None:
    """bpb (one panel per language) against a tokenizer figure (vocabulary size or Kazakh share) over the
    variants of that sweep; one line per eval set and budget."""
    from jobs.reporting.plots import pyplot

    chosen = [s for s in summaries if s["name"] in study["sweeps"][x_key]]
    if len(chosen) < 2:
        return None
    plt = pyplot()
    langs = study["languages"]
    fig, axes = plt.subplots(1, len(langs), figsize=(4.2 * len(langs), 3.6), dpi=110, squeeze=False)
    for ax, lang in zip(axes[0], langs):
        for budget in study["budgets"]:
            for es, style in zip(study["eval_sets"], ("-", "--", ":")):
                pts = []
                for s in chosen:
                    st = bpb_stat(s, budget, es, lang)
                    if st is not None:
                        pts.append((s["tokenizer"][x_key], st))
                pts.sort(key=lambda p: p[0])
                if pts:
                    _errorbar(ax, [p[0] for p in pts], [p[1] for p in pts], ls=style, label=f"{es}, {budget}")
        if log2:
            ax.set_xscale("log", base=2)
        ax.set_title(lang)
        ax.set_xlabel(x_label)
        ax.set_ylabel("bits per byte")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{study['name']}: bits per byte against {x_label}")
    return save_png(fig, path)


def plot_generation_speed(summaries: list[dict], study: dict, path: Path) -> Path | None:
    """Generation bytes/s against tokens per byte, one point per variant and language (same-FLOPs budget when
    it ran, else the first budget)."""
    from jobs.reporting.plots import pyplot

    budget = "flops" if "flops" in study["budgets"] else study["budgets"][0]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=110)
    any_point = False
    for lang, marker in zip(study["languages"], "os^Dv"):
        xs, ys, names = [], [], []
        for s in summaries:
            st = run_stat(s, budget, "generation_bytes_per_s", lang)
            if st is None:
                continue
            xs.append(s["tokenizer"]["tokens_per_byte"][lang])
            ys.append(st.mean)
            names.append(s["name"])
        if xs:
            any_point = True
            ax.scatter(xs, ys, marker=marker, label=lang)
            for x, y, n in zip(xs, ys, names):
                ax.annotate(n, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    if not any_point:
        pyplot().close(fig)
        return None
    ax.set_xlabel("tokens per byte on the eval text (lower: more text per token)")
    ax.set_ylabel("generation bytes/s")
    ax.set_title(f"{study['name']}: generation speed ({BUDGET_TITLES[budget]})")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_png(fig, path)


def write_plots(summaries: list[dict], study: dict, out_dir: Path) -> dict[str, str]:
    made = {
        "bpb vs vocabulary size": plot_bpb_against(
            summaries, study, "vocab_size", "vocabulary size", out_dir / "bpb_vs_vocab.png", log2=True
        ),
        "bpb vs Kazakh share": plot_bpb_against(
            summaries,
            study,
            "kk_share",
            "Kazakh share of tokenizer training text",
            out_dir / "bpb_vs_kk_share.png",
        ),
        "generation bytes/s vs tokens per byte": plot_generation_speed(
            summaries, study, out_dir / "generation_speed.png"
        ),
    }
    return {k: str(v) for k, v in made.items() if v is not None}
