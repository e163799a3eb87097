"""The preprocessing report: documents/bytes/tokens in and out per language and stage, drop reasons with
examples, files that were skipped or repaired, the mixture (planned vs achieved), as JSON and markdown.

Accounting is by SOURCE language (the language a file was declared as, or `auto`): for each one,
documents in = documents kept + documents dropped (summed over reasons). Documents that language ID moved to
another language are counted as kept by their source language and listed in `routing`; the output tables
(`output`, `mixture`) are by final language.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from jobs.prep.sources import FILE_REASON_STATUS, READ_REASONS, FileEntry

# Drop reasons by the stage that assigns them, in pipeline order.
STAGE_REASONS: dict[str, list[str]] = {
    "read": list(READ_REASONS),
    "normalize": ["empty"],
    "langid": ["language_mismatch", "language_other", "language_uncertain", "script_mismatch"],
    "quality": [
        "boilerplate",
        "too_short",
        "too_few_words",
        "too_many_words",
        "mean_word_length",
        "symbol_ratio",
        "digit_ratio",
        "alpha_words",
        "duplicate_lines",
        "repeated_ngrams",
        "duplicate_ngrams",
    ],
    "dedup": ["exact_duplicate", "near_duplicate"],
    "mixture": ["mixture_downsampled"],
}
REASON_STAGE = {r: s for s, rs in STAGE_REASONS.items() for r in rs}
REASON_ORDER = {r: i for i, r in enumerate(REASON_STAGE)}  # pipeline order, for sorting drop reasons


def present_reasons(rep: dict[str, Any]) -> list[str]:
    """The drop reasons that occur in a report, in pipeline order."""
    return [r for r in REASON_STAGE if any(r in e["dropped"] for e in rep["languages"].values())]


def build_report(
    *,
    name: str,
    files: list[FileEntry],
    groups: pd.DataFrame,
    examples: dict[str, list[dict[str, Any]]],
    languages: list[str],
    manifest: dict[str, Any] | None,
    mixture: dict[str, Any] | None,
    dedup_info: dict[str, Any],
    timings: dict[str, float],
) -> dict[str, Any]:
    """`groups`: counts summed over input records with the same (src_lang, lang, reason, repaired, file_id,
    split), as jobs.prep.blocks.group_counts makes them: docs, n_bytes_in, n_bytes, n_tokens, tokens_written,
    pii_email/phone/iban, n_fixes. No per-document data reaches the report."""
    g = groups
    unknown = sorted(set(g["reason"]) - set(REASON_STAGE) - {""})
    if unknown:
        raise RuntimeError(f"reasons without a stage: {unknown}")

    def n(d: pd.DataFrame, col: str = "docs") -> int:
        return int(d[col].sum())

    src_langs = sorted(
        set(g["src_lang"]),
        key=lambda x: (x not in languages, languages.index(x) if x in languages else 0, x),
    )
    by_lang: dict[str, Any] = {}
    stages: dict[str, Any] = {}
    for lang in src_langs:
        d = g[g["src_lang"] == lang]
        dropped = d[d["reason"] != ""]
        kept = d[d["reason"] == ""]
        reasons = {
            r: {"documents": n(x), "bytes": n(x, "n_bytes_in")}
            for r, x in dropped.groupby("reason", sort=False)
        }
        reasons = dict(sorted(reasons.items(), key=lambda kv: REASON_ORDER[kv[0]]))
        repaired = d[d["repaired"] != ""].groupby("repaired")["docs"].sum().sort_values(ascending=False)
        entry = {
            "in": {"documents": n(d), "bytes": n(d, "n_bytes_in")},
            "kept": {
                "documents": n(kept),
                "bytes": n(kept, "n_bytes"),
                "tokens": n(kept, "n_tokens"),
                "tokens_written": n(kept, "tokens_written"),
            },
            "dropped": reasons,
            "dropped_total": {"documents": n(dropped), "bytes": n(dropped, "n_bytes_in")},
            "repaired": {r: int(c) for r, c in repaired.items()},
            "pii_replaced": {k: n(d, f"pii_{k}") for k in ("email", "phone", "iban")},
            "lookalike_letters_fixed": n(d, "n_fixes"),
        }
        entry["balanced"] = (
            entry["in"]["documents"] == entry["kept"]["documents"] + entry["dropped_total"]["documents"]
        )
        by_lang[lang] = entry
        left_docs = n(d)  # documents left after each stage
        per_stage = []
        for stage, rs in STAGE_REASONS.items():
            gone = n(d[d["reason"].isin(rs)])
            left_docs -= gone
            per_stage.append({"stage": stage, "dropped": gone, "documents_out": left_docs})
        stages[lang] = per_stage
    passed_langid = g[
        ~g["reason"].isin(STAGE_REASONS["read"] + STAGE_REASONS["normalize"] + STAGE_REASONS["langid"])
    ]
    routing = {
        src: {dst: int(c) for dst, c in x.groupby("lang")["docs"].sum().sort_values(ascending=False).items()}
        for src, x in passed_langid.groupby("src_lang", sort=True)
    }
    counts = g.groupby("file_id")["docs"].sum().to_dict()
    drops = g[g["reason"] != ""].groupby(["file_id", "reason"])["docs"].sum()
    repairs = g[g["repaired"] != ""].groupby(["file_id", "repaired"])["docs"].sum()
    drops_by_file: dict[int, dict[str, int]] = {}
    for (fid, r), c in drops.items():
        drops_by_file.setdefault(int(fid), {})[r] = int(c)
    repairs_by_file: dict[int, dict[str, int]] = {}
    for (fid, r), c in repairs.items():
        repairs_by_file.setdefault(int(fid), {})[r] = int(c)
    file_rows = []
    for f in files:
        status, detail = f.status, f.detail
        found = [r for r in drops_by_file.get(f.file_id, {}) if r in FILE_REASON_STATUS]
        if status == "ok" and found:  # a problem the reading task found (object storage, mid-file corruption)
            status = FILE_REASON_STATUS[found[0]]
            detail = f"{found[0]} while reading (the examples show where)"
        file_rows.append(
            {
                "path": f.uri,
                "language": f.language,
                "format": f.format + (f"+{f.compression}" if f.compression else ""),
                "status": status,
                "detail": detail,
                "bytes": f.size,
                "documents_in": int(counts.get(f.file_id, 0)),
                "dropped": drops_by_file.get(f.file_id, {}),
                "repaired": repairs_by_file.get(f.file_id, {}),
            }
        )
    totals = {
        "files": len(files),
        "files_skipped": sum(f.status != "ok" for f in files),
        "files_with_read_problems": sum(
            f.status == "ok" and r["status"] != "ok" for f, r in zip(files, file_rows)
        ),
        "documents_in": n(g),
        "documents_kept": n(g[g["reason"] == ""]),
        "bytes_in": n(g, "n_bytes_in"),
    }
    return {
        "name": name,
        "totals": totals,
        "languages": by_lang,
        "stages": stages,
        "routing": routing,
        "output": manifest["counts"] if manifest else None,
        "mixture": mixture,
        "dedup": dedup_info,
        "files": file_rows,
        "examples": examples,
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
    }


def _fmt(n: float) -> str:
    return f"{n:,.0f}" if isinstance(n, int) or float(n).is_integer() else f"{n:,.3f}"


def _md_text(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ⏎ ")


def report_markdown(r: dict[str, Any]) -> str:
    out = [f"# Preprocessing report: {r['name']}", ""]
    t = r["totals"]
    out += [
        f"{t['files']} files ({t['files_skipped']} skipped, {t.get('files_with_read_problems', 0)} with problems found while "
        f"reading), {t['documents_in']:,} documents in "
        f"({t['bytes_in'] / 1e6:,.2f} MB), {t['documents_kept']:,} kept.",
        "",
        "## Per source language (documents in = kept + dropped)",
        "",
        "| language | docs in | MB in | kept | kept MB | kept tokens | tokens written | dropped | balanced |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for lang, e in r["languages"].items():
        out.append(
            f"| {lang} | {e['in']['documents']:,} | {e['in']['bytes'] / 1e6:,.2f} | {e['kept']['documents']:,} | "
            f"{e['kept']['bytes'] / 1e6:,.2f} | {e['kept']['tokens']:,} | {e['kept']['tokens_written']:,} | "
            f"{e['dropped_total']['documents']:,} | {'yes' if e['balanced'] else 'NO'} |"
        )
    reasons = present_reasons(r)
    if reasons:
        langs = list(r["languages"])
        out += ["", "## Dropped documents by reason", "", "| stage | reason | " + " | ".join(langs) + " |"]
        out.append("|---|---|" + "---:|" * len(langs))
        for reason in reasons:
            cells = [
                f"{r['languages'][lang]['dropped'].get(reason, {}).get('documents', 0):,}" for lang in langs
            ]
            out.append(f"| {REASON_STAGE[reason]} | {reason} | " + " | ".join(cells) + " |")
    out += ["", "## Documents left after each stage", ""]
    stages = list(next(iter(r["stages"].values()), []))
    if stages:
        out.append("| language | in | " + " | ".join(s["stage"] for s in stages) + " |")
        out.append("|---|---:|" + "---:|" * len(stages))
        for lang, rows in r["stages"].items():
            out.append(
                f"| {lang} | {r['languages'][lang]['in']['documents']:,} | "
                + " | ".join(f"{s['documents_out']:,}" for s in rows)
                + " |"
            )
    extra = []
    for lang, e in r["languages"].items():
        if e["repaired"] or any(e["pii_replaced"].values()) or e["lookalike_letters_fixed"]:
            extra.append(
                f"| {lang} | {', '.join(f'{k}: {v:,}' for k, v in e['repaired'].items()) or '-'} | "
                f"{e['pii_replaced']['email']:,} | {e['pii_replaced']['phone']:,} | {e['pii_replaced']['iban']:,} | "
                f"{e['lookalike_letters_fixed']:,} |"
            )
    if extra:
        out += [
            "",
            "## Repairs and PII",
            "",
            "| language | repaired documents | e-mails | phones | IBANs | look-alike letters fixed |",
        ]
        out += ["|---|---|---:|---:|---:|---:|", *extra]
    if r["routing"]:
        out += ["", "## Language routing (source -> final, documents past language ID)", ""]
        for src, dst in r["routing"].items():
            out.append(f"- {src}: " + ", ".join(f"{k} {v:,}" for k, v in dst.items()))
    if r.get("output"):
        out += [
            "",
            "## Output (final language)",
            "",
            "| split | language | documents | tokens | MB |",
            "|---|---|---:|---:|---:|",
        ]
        for split, per in r["output"].items():
            for lang, c in per.items():
                out.append(
                    f"| {split} | {lang} | {c['documents']:,} | {c['tokens']:,} | {c['bytes'] / 1e6:,.2f} |"
                )
    m = r.get("mixture")
    if m:
        out += [
            "",
            "## Mixture (train tokens)",
            "",
            "| language | target | achieved | available | planned | achieved tokens | epochs |",
        ]
        out.append("|---|---:|---:|---:|---:|---:|---:|")
        for lang in m["achieved"]:
            out.append(
                f"| {lang} | {m['target'].get(lang, 0):.3f} | {m['achieved'][lang]:.3f} | {m['available_tokens'][lang]:,} | "
                f"{m['planned_tokens'][lang]:,} | {m['achieved_tokens'][lang]:,} | {m['epochs'][lang]:.2f} |"
            )
    d = r.get("dedup") or {}
    if d:
        out += ["", f"Dedup: {', '.join(f'{k} {v}' for k, v in d.items())}."]
    problem_rows = []
    for f in r["files"]:
        read_drops = {k: v for k, v in f["dropped"].items() if k in STAGE_REASONS["read"]}
        if f["status"] == "ok" and not read_drops and not f["repaired"]:
            continue
        problem_rows.append(
            f"| {_md_text(f['path'])} | {f['status']} | {_md_text(f['detail'])} | {f['documents_in']:,} | "
            f"{', '.join(f'{k} {v}' for k, v in read_drops.items()) or '-'} | "
            f"{', '.join(f'{k} {v}' for k, v in f['repaired'].items()) or '-'} |"
        )
    if problem_rows:
        out += ["", "## Files with problems (skipped, or records dropped or repaired while reading)", ""]
        out += [
            "| file | status | detail | docs in | dropped at read | repaired |",
            "|---|---|---|---:|---|---|",
        ]
        out += problem_rows
    if r["examples"]:
        out += ["", "## Examples of dropped text", ""]
        for reason, rows in r["examples"].items():
            out.append(f"### {reason}")
            for ex in rows:
                loc = f"{ex['file'].rsplit('/', 1)[-1]}@{ex['offset']}"
                detail = f" ({ex['detail']})" if ex.get("detail") else ""
                out.append(f"- `{loc}` [{ex['language']}]{detail}: {_md_text(ex['text'])}")
                if "duplicate_of" in ex:
                    o = ex["duplicate_of"]
                    out.append(
                        f"  - duplicate of `{o['file'].rsplit('/', 1)[-1]}@{o['offset']}`: {_md_text(o['text'])}"
                    )
            out.append("")
    if r["timings_s"]:
        out += ["", "Timings (s): " + ", ".join(f"{k} {v}" for k, v in r["timings_s"].items())]
    if r.get("blocks"):
        b = r["blocks"]
        resumed = ", ".join(f"{k} {v}" for k, v in b["resumed"].items())
        out += ["", f"Blocks: {b['total']:,} (committed by an earlier run and skipped: {resumed})."]
    if r.get("memory"):
        m = r["memory"]
        workers = ", ".join(f"{k} {v:,.0f}" for k, v in m["worker_peak_rss_mb"].items())
        out += ["", f"Peak RSS (MB): driver {m['driver_peak_rss_mb']:,.0f}; workers by pass: {workers}."]
    return "\n".join(out) + "\n"
