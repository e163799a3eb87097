"""Results on registered model versions (tags), the per-model markdown report, and the comparison table across
versions (markdown + PNG)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

TAG = "tulpar.eval"
MAX_TAG_VALUE = 5000  # MLflow's limit for model version tag values


def eval_tags(suite: str, suite_sha: str, run_id: str, metrics: dict[str, float]) -> dict[str, str]:
    """Model version tags holding one suite's results: tulpar.eval.<suite>.<metric> = repr(value)."""
    tags = {f"{TAG}.{suite}.suite_sha256": suite_sha, f"{TAG}.{suite}.run_id": run_id}
    for k, v in metrics.items():
        tags[f"{TAG}.{suite}.{k}"] = repr(float(v))
    return tags


def metrics_from_tags(
    tags: dict[str, str], suite: str, suite_sha: str | None = None
) -> dict[str, float] | None:
    """A version's results for `suite` (None when it has none, or they came from a different suite config)."""
    prefix = f"{TAG}.{suite}."
    if f"{prefix}suite_sha256" not in tags:
        return None
    if suite_sha is not None and tags[f"{prefix}suite_sha256"] != suite_sha:
        return None
    out = {}
    for k, v in tags.items():
        if k.startswith(prefix) and k[len(prefix) :] not in ("suite_sha256", "run_id"):
            try:
                out[k[len(prefix) :]] = float(v)
            except ValueError:
                continue
    return out


def set_version_tags(name: str, version: str, tags: dict[str, str]) -> None:
    from mlflow import MlflowClient

    client = MlflowClient()
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k, str(v)[:MAX_TAG_VALUE])


# ------------------------------------------------------------------ formatting


def fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.{digits}f}" if abs(v) < 1e5 else f"{v:.3g}"
    return str(v)


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def model_report(
    label: str,
    uri: str,
    suite: str,
    text_results: list[dict],
    mc_results: list[dict],
    gen_records: list[dict],
    gen_metrics: dict[str, float],
    lm_eval_metrics: dict[str, float],
    gate: dict | None,
    scoring: dict,
) -> str:
    parts = [f"# Evaluation of {label} — suite `{suite}`", "", f"Model: `{uri}`", ""]
    if text_results:
        parts += [
            "## Bits-per-byte and perplexity",
            "",
            f"Each document is scored after `<|endoftext|>`; window {scoring['window']} tokens, stride "
            f"{scoring['stride']} ({'disjoint windows' if scoring['window'] == scoring['stride'] else 'sliding window'}). "
            "bpb = sum of token NLLs / UTF-8 bytes / ln 2; ppl is per token.",
            "",
            md_table(
                ["set", "lang", "docs", "bytes", "tokens", "bytes/token", "bpb", "ppl"],
                [
                    [
                        r["set"],
                        r["language"],
                        r["docs"],
                        r["bytes"],
                        r["tokens"],
                        r["bytes"] / max(r["tokens"], 1),
                        r["bpb"],
                        r["ppl"],
                    ]
                    for r in text_results
                ],
            ),
            "",
        ]
    if mc_results:
        parts += [
            "## Multiple choice (log-likelihood)",
            "",
            md_table(
                ["suite", "lang", "format", "shots", "n", "acc", "acc_norm", "random"],
                [
                    [
                        r["suite"],
                        r["language"],
                        r["format"],
                        r["num_fewshot"],
                        r["n"],
                        r["acc"],
                        r["acc_norm"],
                        r["random"],
                    ]
                    for r in mc_results
                ],
            ),
            "",
        ]
    if gen_records:
        langs = sorted({r["lang"] for r in gen_records}) + ["all"]
        parts += [
            "## Generation checks",
            "",
            md_table(
                ["lang", "mean tokens", "truncated", "refusal rate", "language consistency", "undetected"],
                [
                    [
                        lang,
                        gen_metrics.get(f"gen/{lang}/mean_tokens"),
                        gen_metrics.get(f"gen/{lang}/truncated_rate"),
                        gen_metrics.get(f"gen/{lang}/refusal_rate"),
                        gen_metrics.get(f"gen/{lang}/lang_consistency"),
                        gen_metrics.get(f"gen/{lang}/undetected_rate"),
                    ]
                    for lang in langs
                ],
            ),
            "",
            "Samples:",
            "",
        ]
        parts += [
            f"- [{r['lang']}→{r['detected'] or '?'}] {r['prompt']} → {r['answer'][:160]!r}"
            for r in gen_records[:12]
        ]
        parts.append("")
    if lm_eval_metrics:
        parts += [
            "## lm-evaluation-harness",
            "",
            md_table(["metric", "value"], [[k, v] for k, v in sorted(lm_eval_metrics.items())]),
            "",
        ]
    if gate:
        parts += [
            f"## Gate `@{gate['alias']}`: {'PASS' if gate['passed'] else 'FAIL'}"
            + (" — promoted" if gate["promoted"] else ""),
            "",
            f"Baseline: {gate['baseline_uri'] or 'none'}",
            "",
            md_table(
                ["metric", "value", "baseline", "ok", "reason"],
                [
                    [c["metric"], c["value"], c["baseline"], "yes" if c["passed"] else "NO", c["reason"]]
                    for c in gate["checks"]
                ],
            ),
            "",
        ]
    return "\n".join(parts)


# ------------------------------------------------------------------ comparison across versions


def default_columns(metric_names: list[str]) -> list[str]:
    """bpb per set and language, MC accuracies, generation rates, then passkey accuracy, in the suite's order."""
    bpb = [m for m in metric_names if m.startswith("bpb/") and not m.endswith("/avg")]
    acc = [m for m in metric_names if m.startswith("mc/") and m.endswith("/acc")]
    gen = [m for m in ("gen/all/lang_consistency", "gen/all/refusal_rate") if m in metric_names]
    passkey = [
        m for m in metric_names if m.startswith("passkey/") and m.count("/") == 2 and m.endswith("/acc")
    ]
    return bpb + acc + gen + passkey


def version_rows(name: str, suite: str, suite_sha: str, max_versions: int) -> list[dict]:
    """Registered versions of `name` with results for this suite config, newest last."""
    from mlflow import MlflowClient

    client = MlflowClient()
    versions = client.search_model_versions(f"name='{name}'")
    aliases: dict[str, list[str]] = {}  # search results do not carry aliases in every store
    for alias, v in client.get_registered_model(name).aliases.items():
        aliases.setdefault(str(v), []).append(alias)
    rows = []
    for mv in sorted(versions, key=lambda v: int(v.version)):
        metrics = metrics_from_tags(dict(mv.tags), suite, suite_sha)
        if metrics is None:
            continue
        rows.append(
            {
                "version": str(mv.version),
                "stage": mv.tags.get("tulpar.stage", ""),
                "aliases": sorted(aliases.get(str(mv.version), [])),
                "metrics": metrics,
                "tags": dict(mv.tags),
            }
        )
    return rows[-max_versions:]


def comparison_markdown(name: str, rows: list[dict], columns: list[str], gate_alias: str) -> str:
    header = ["version", "stage", "aliases", *columns, f"gate @{gate_alias}"]
    body = []
    for r in rows:
        gate = r["tags"].get(f"tulpar.gate.{gate_alias}", "")
        body.append(
            [
                f"{name}/{r['version']}",
                r["stage"],
                " ".join(f"@{a}" for a in r["aliases"]),
                *[r["metrics"].get(c) for c in columns],
                gate or "—",
            ]
        )
    mc_random = [c.replace("/acc", "/random") for c in columns]
    if any(c.startswith("mc/") for c in columns) and rows:
        randoms = rows[-1]["metrics"]
        body.append(
            [
                "random guess",
                "",
                "",
                *[randoms.get(m) if c.startswith("mc/") else None for c, m in zip(columns, mc_random)],
                "",
            ]
        )
    return md_table(header, body)


def comparison_png(name: str, rows: list[dict], columns: list[str], path: Path, title: str) -> Path:
    """Grouped bars: bpb per set/language (lower is better) and MC accuracy with the random-guess line."""
    import numpy as np

    from jobs.reporting.plots import pyplot

    plt = pyplot()

    panels = [
        ("bits per byte (lower is better)", [c for c in columns if c.startswith("bpb/")]),
        ("accuracy (higher is better)", [c for c in columns if c.startswith("mc/")]),
        ("generation (rates)", [c for c in columns if c.startswith("gen/")]),
    ]
    panels = [p for p in panels if p[1]]
    fig, axes = plt.subplots(
        len(panels) or 1,
        1,
        figsize=(max(7.0, 1.2 * max((len(p[1]) for p in panels), default=1) + 3), 3.4 * max(len(panels), 1)),
        dpi=120,
        squeeze=False,
    )
    for ax, (ylabel, cols) in zip(axes[:, 0], panels):
        x = np.arange(len(cols))
        width = 0.8 / max(len(rows), 1)
        for k, r in enumerate(rows):
            vals = [r["metrics"].get(c, np.nan) for c in cols]
            label = f"v{r['version']}" + (
                f" ({', '.join('@' + a for a in r['aliases'])})" if r["aliases"] else ""
            )
            ax.bar(x + (k - (len(rows) - 1) / 2) * width, vals, width, label=label)
        if cols[0].startswith("mc/") and rows:
            for i, c in enumerate(cols):
                rnd = rows[-1]["metrics"].get(c.replace("/acc", "/random"))
                if rnd is not None:
                    ax.hlines(
                        rnd,
                        i - 0.45,
                        i + 0.45,
                        colors="k",
                        linestyles="dashed",
                        lw=1,
                        label="random" if i == 0 else None,
                    )
        if not cols[0].startswith("bpb/"):
            ax.set_ylim(0, 1.05)
        ax.set_xticks(x)
        ax.set_xticklabels([c.split("/", 1)[1] for c in cols], rotation=20, ha="right", fontsize=8)
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    axes[0, 0].set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
