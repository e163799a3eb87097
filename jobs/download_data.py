"""`make data`: download a kk/ru/en mix from the Hugging Face hub into the TULPAR_DATA layout.

    python -m jobs.download_data --config configs/data/hf-mix.yaml [max_mb_per_language=50 out_dir=/data]

Each source is a dataset repository and glob patterns of parquet files in it (FineWeb-2 `kaz_Cyrl`/`rus_Cyrl`,
FineWeb-Edu, Wikipedia, FLORES+). Files are streamed with `huggingface_hub.HfFileSystem`: parquet row groups are
fetched by HTTP range requests and only the text column is read, so a size cap stops the download early, and the
`datasets` library is not needed. Output, the same layout jobs.preprocess reads from TULPAR_DATA:

    corpus/<lang>/<source>.jsonl        {"text", "source"} per document (kind: corpus)
    eval/parallel/<source>/<lang>.txt   one segment per line (kind: parallel, e.g. FLORES+ devtest)
    SOURCES.downloaded.md, sources.downloaded.json   what was fetched: repo, revision, files, bytes, licence

A finished file is written atomically (temporary name, then rename) and skipped on the next run; re-run with
overwrite=true to fetch again. Set HF_TOKEN for gated datasets (FLORES+ asks you to accept its terms first).
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

from pydantic import Field

from jobs.platform.runtime import JobResult, Settings, main_entry
from llm_core.config import StrictModel
from llm_core.data import DataError
from llm_core.io import atomic_write_json, atomic_write_text

log = logging.getLogger("tulpar.download_data")


class HubSource(StrictModel):
    """Parquet files of one Hugging Face dataset repository."""

    name: str = Field(description="output name: corpus/<language>/<name>.jsonl or eval/parallel/<name>/")
    repo: str = Field(description="dataset repository, e.g. HuggingFaceFW/fineweb-2")
    revision: str = Field("main", description="branch, tag or commit (pin a commit for reproducibility)")
    files: list[str] = Field(min_length=1, description="glob patterns of parquet files inside the repository")
    language: str
    text_field: str = "text"
    kind: Literal["corpus", "parallel"] = "corpus"
    max_mb: float | None = Field(
        None, gt=0, description="cap for this source; default: its share of the language cap"
    )
    licence: str = ""
    description: str = ""


class DataConfig(StrictModel):
    """`make data`: which sources, how much text per language, where to."""

    out_dir: str | None = Field(None, description="default: TULPAR_DATA")
    max_mb_per_language: float = Field(100.0, gt=0, description="UTF-8 megabytes of corpus text per language")
    languages: list[str] | None = Field(None, description="only these languages (default: all sources)")
    overwrite: bool = False
    sources: list[HubSource] = Field(min_length=1)


# ------------------------------------------------------------------------------------------ pure helpers


def hub_root(repo: str, revision: str) -> str:
    """HfFileSystem path prefix of a dataset repository at a revision (refs/... revisions are URL-quoted)."""
    return f"datasets/{repo}@{quote(revision, safe='')}"


def match_files(listing: list[str], root: str, patterns: list[str]) -> list[str]:
    """Paths (relative to root) among `listing` that match any pattern, sorted, each once."""
    rels = sorted({p[len(root) :].lstrip("/") for p in listing if p.startswith(root)})
    return [r for r in rels if any(fnmatch.fnmatchcase(r, pat) for pat in patterns)]


def per_source_caps(cfg: DataConfig) -> dict[str, int]:
    """Byte cap of every corpus source: its own max_mb, else an equal share of its language's cap."""
    by_lang: dict[str, list[HubSource]] = {}
    for s in cfg.sources:
        if s.kind == "corpus":
            by_lang.setdefault(s.language, []).append(s)
    caps = {}
    for _lang, srcs in by_lang.items():
        fixed = sum(s.max_mb for s in srcs if s.max_mb)
        free = [s for s in srcs if not s.max_mb]
        share = max(0.0, cfg.max_mb_per_language - fixed) / len(free) if free else 0.0
        for s in srcs:
            caps[f"{s.name}/{s.language}"] = int((s.max_mb or share) * 1_000_000)
    return caps


def iter_parquet_texts(fs, path: str, text_field: str, batch_rows: int = 2048) -> Iterator[str]:
    """Non-empty strings of one column of a parquet file, streamed row group by row group."""
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        if text_field not in pf.schema_arrow.names:
            raise DataError(
                f"{path} has no column {text_field!r} (columns: {pf.schema_arrow.names}): set text_field"
            )
        for batch in pf.iter_batches(columns=[text_field], batch_size=batch_rows):
            for value in batch.column(0).to_pylist():
                if isinstance(value, str) and value.strip():
                    yield value


def output_path(out: Path, src: HubSource) -> Path:
    if src.kind == "corpus":
        return out / "corpus" / src.language / f"{src.name}.jsonl"
    return out / "eval" / "parallel" / src.name / f"{src.language}.txt"


def write_source(fs, root: str, src: HubSource, out: Path, cap_bytes: int | None) -> dict[str, Any]:
    """Stream the matching files of one source into its output file (atomically); returns what was fetched."""
    listing = (
        [str(p) for p in fs.glob(f"{root}/**", detail=False)] if any("**" in p for p in src.files) else []
    )
    if not listing:
        listing = sorted({str(p) for pat in src.files for p in fs.glob(f"{root}/{pat}", detail=False)})
    files = match_files(listing, root, src.files)
    if not files:
        raise DataError(
            f"{src.name}: no files in {src.repo}@{src.revision} match {src.files}: check the patterns"
        )
    target = output_path(out, src)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.part")
    n_docs = n_bytes = 0
    used: list[str] = []
    with open(tmp, "w", encoding="utf-8") as f:
        for rel in files:
            used.append(rel)
            for text in iter_parquet_texts(fs, f"{root}/{rel}", src.text_field):
                if src.kind == "corpus":
                    line = json.dumps({"text": text, "source": f"{src.repo}/{rel}"}, ensure_ascii=False)
                else:
                    line = " ".join(text.split())
                f.write(line + "\n")
                n_docs += 1
                n_bytes += len(text.encode("utf-8"))
                if cap_bytes is not None and n_bytes >= cap_bytes:
                    break
            if cap_bytes is not None and n_bytes >= cap_bytes:
                break
    os.replace(tmp, target)
    return {
        "name": src.name,
        "repo": src.repo,
        "revision": src.revision,
        "language": src.language,
        "kind": src.kind,
        "files": used,
        "documents": n_docs,
        "bytes": n_bytes,
        "path": str(target.relative_to(out)),
        "licence": src.licence,
        "description": src.description,
    }


def sources_markdown(entries: list[dict[str, Any]]) -> str:
    rows = [
        "# Downloaded sources (`make data`)",
        "",
        "| path | bytes | documents | lang | origin (repo @ revision : files) | licence | notes |",
        "|---|---:|---:|---|---|---|---|",
    ]
    for e in entries:
        files = ", ".join(e["files"][:3]) + (f" (+{len(e['files']) - 3} more)" if len(e["files"]) > 3 else "")
        rows.append(
            f"| {e['path']} | {e['bytes']:,} | {e['documents']:,} | {e['language']} | {e['repo']} @ {e['revision']} : "
            f"{files} | {e['licence']} | {e['description']} |"
        )
    return "\n".join(rows) + "\n"


def download(
    cfg: DataConfig, out: Path, fs=None, roots: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    """Fetch every source (or reuse its finished file). `fs`/`roots` replace the hub in tests."""
    if fs is None:
        from huggingface_hub import HfFileSystem

        fs = HfFileSystem(token=os.environ.get("HF_TOKEN"))
    caps = per_source_caps(cfg)
    manifest_path = out / "sources.downloaded.json"
    previous = {}
    if manifest_path.is_file():
        previous = {
            f"{e['name']}/{e['language']}": e for e in json.loads(manifest_path.read_text(encoding="utf-8"))
        }
    entries = []
    for src in cfg.sources:
        if cfg.languages and src.language not in cfg.languages:
            continue
        key = f"{src.name}/{src.language}"
        target = output_path(out, src)
        if target.is_file() and not cfg.overwrite and key in previous:
            log.info("%s: already downloaded (%s)", key, target)
            entries.append(previous[key])
            continue
        root = (roots or {}).get(src.name) or hub_root(src.repo, src.revision)
        cap = caps.get(key) if src.kind == "corpus" else None
        log.info("%s: %s@%s %s (cap %s bytes)", src.name, src.repo, src.revision, src.files, cap)
        entries.append(write_source(fs, root, src, out, cap))
    atomic_write_json(manifest_path, entries)
    atomic_write_text(out / "SOURCES.downloaded.md", sources_markdown(entries))
    return entries


def main(cfg: DataConfig, settings: Settings) -> JobResult:
    out = Path(cfg.out_dir).expanduser().resolve() if cfg.out_dir else settings.data
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ValueError(
            f"cannot write to {out} ({exc.strerror}): set out_dir=... or TULPAR_DATA to a writable directory"
        ) from None
    entries = download(cfg, out)
    metrics = {
        f"mb/{lang}": sum(e["bytes"] for e in entries if e["language"] == lang and e["kind"] == "corpus")
        / 1e6
        for lang in sorted({e["language"] for e in entries})
    }
    return JobResult(
        "download_data",
        outputs={"data_dir": str(out), "sources": [e["path"] for e in entries]},
        metrics=metrics,
        output_dir=None,
    )


if __name__ == "__main__":
    main_entry("download_data", DataConfig, main)
