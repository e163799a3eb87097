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

from jobs.prep.sources import READ_REASONS, FileEntry

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
    docs: pd.DataFrame,
    languages: list[str],
    manifest: dict[str, Any] | None,
    mixture: dict[str, Any] | None,
    dedup_info: dict[str, Any],
    timings: dict[str, float],
    examples_per_reason: int,
    example_chars: int,
) -> dict[str, Any]:
    """`docs`: one row per input record with doc_id, file_id, offset, src_lang, lang, reason, repaired,
    detail, n_bytes_in, n_bytes, n_tokens, copies, pii_*, n_fixes, snippet, dup_of (doc_id or -1)."""
    unknown = sorted(set(docs["reason"]) - set(REASON_STAGE) - {""})
    if unknown:
        raise RuntimeError(f"reasons without a stage: {unknown}")
    src_langs = sorted(
        set(docs["src_lang"]),
        key=lambda x: (x not in languages, languages.index(x) if x in languages else 0, x),
    )
    by_lang: dict[str, Any] = {}
    stages: dict[str, Any] = {}
    for lang in src_langs:
        d = docs[docs["src_lang"] == lang]
        dropped = d[d["reason"] != ""]
        kept = d[d["reason"] == ""]
        reasons = {
            r: {"documents": int(len(g)), "bytes": int(g["n_bytes_in"].sum())}
            for r, g in dropped.groupby("reason", sort=False)
        }
        reasons = dict(sorted(reasons.items(), key=lambda kv: REASON_ORDER[kv[0]]))
        entry = {
            "in": {"documents": int(len(d)), "bytes": int(d["n_bytes_in"].sum())},
            "kept": {
                "documents": int(len(kept)),
                "bytes": int(kept["n_bytes"].sum()),
                "tokens": int(kept["n_tokens"].sum()),
                "tokens_written": int((kept["n_tokens"] * kept["copies"]).sum()),
            },
            "dropped": reasons,
            "dropped_total": {"documents": int(len(dropped)), "bytes": int(dropped["n_bytes_in"].sum())},
            "repaired": {r: int(n) for r, n in d[d["repaired"] != ""]["repaired"].value_counts().items()},
            "pii_replaced": {k: int(d[f"pii_{k}"].sum()) for k in ("email", "phone", "iban")},
            "lookalike_letters_fixed": int(d["n_fixes"].sum()),
        }
        entry["balanced"] = (
            entry["in"]["documents"] == entry["kept"]["documents"] + entry["dropped_total"]["documents"]
        )
        by_lang[lang] = entry
        # documents left after each stage
        left_docs = len(d)
        per_stage = []
        for stage, rs in STAGE_REASONS.items():
            gone = d[d["reason"].isin(rs)]
            left_docs -= len(gone)
            per_stage.append({"stage": stage, "dropped": int(len(gone)), "documents_out": int(left_docs)})
        stages[lang] = per_stage
    passed_langid = docs[
        ~docs["reason"].isin(STAGE_REASONS["read"] + STAGE_REASONS["normalize"] + STAGE_REASONS["langid"])
    ]
    routing = {
        src: {dst: int(n) for dst, n in g["lang"].value_counts().items()}
        for src, g in passed_langid.groupby("src_lang", sort=True)
    }
    file_rows = []
    counts = docs.groupby("file_id").size().to_dict()
    drops = docs[docs["reason"] != ""].groupby(["file_id", "reason"]).size()
    repairs = docs[docs["repaired"] != ""].groupby(["file_id", "repaired"]).size()
    for f in files:
        file_rows.append(
            {
                "path": f.uri,
                "language": f.language,
                "format": f.format + (f"+{f.compression}" if f.compression else ""),
                "status": f.status,
                "detail": f.detail,
                "bytes": f.size,
                "documents_in": int(counts.get(f.file_id, 0)),
                "dropped": {r: int(n) for (fid, r), n in drops.items() if fid == f.file_id},
                "repaired": {r: int(n) for (fid, r), n in repairs.items() if fid == f.file_id},
            }
        )
    examples: dict[str, list[dict[str, Any]]] = {}
    if examples_per_reason:
        where = {f.file_id: f.uri for f in files}
        by_id = docs.set_index("doc_id")
        for reason, g in docs[docs["reason"] != ""].groupby("reason", sort=False):
            rows = []
            for _, r in g.head(examples_per_reason).iterrows():
                ex = {
                    "file": where.get(int(r["file_id"]), "?"),
                    "offset": int(r["offset"]),
                    "language": r["src_lang"],
                    "text": str(r["snippet"])[:example_chars],
                }
                if r["detail"]:
                    ex["detail"] = r["detail"]
                if int(r["dup_of"]) >= 0 and int(r["dup_of"]) in by_id.index:
                    o = by_id.loc[int(r["dup_of"])]
                    ex["duplicate_of"] = {
                        "file": where.get(int(o["file_id"]), "?"),
                        "offset": int(o["offset"]),
                        "text": str(o["snippet"])[:example_chars],
                    }
                rows.append(ex)
            examples[reason] = rows
        examples = dict(sorted(examples.items(), key=lambda kv: REASON_ORDER[kv[0]]))
    totals = {
        "files": len(files),
        "files_skipped": sum(f.status != "ok" for f in files),
        "documents_in": int(len(docs)),
        "documents_kept": int((docs["reason"] == "").sum()),
        "bytes_in": int(docs["n_bytes_in"].sum()),
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
        f"{t['files']} files ({t['files_skipped']} skipped), {t['documents_in']:,} documents in "
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
    return "\n".join(out) + "\n"
