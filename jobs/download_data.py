"""`make data`: download a kk/ru/en mix from the Hugging Face hub (or copy one from a directory or an s3://
prefix) into the TULPAR_DATA layout.

    python -m jobs.download_data --config configs/data/hf-mix.yaml [max_mb_per_language=50 out_dir=/data
        shard_mb=256 compression=zstd]

Each source is a dataset repository (or a `root`: local directory or s3:// prefix) and glob patterns of its
files, parquet or jsonl (plain, .gz, .zst), e.g. the many shards of FineWeb-2 `kaz_Cyrl`/`rus_Cyrl`, FineWeb-Edu,
Wikipedia, FLORES+. Files are streamed one at a time (hub: `huggingface_hub.HfFileSystem`, parquet row groups by
HTTP range requests, only the text column), so a size cap stops the download early and memory does not grow with
the corpus; the `datasets` library is not needed. Output, the same layout jobs.preprocess reads from TULPAR_DATA:

    corpus/<lang>/<source>.jsonl        {"text", "source"} per document (kind: corpus), or with shard_mb set:
    corpus/<lang>/<source>/part-00000.jsonl[.zst|.gz] ...   shards of at most shard_mb MB of jsonl each
    eval/parallel/<source>/<lang>.txt   one segment per line (kind: parallel, e.g. FLORES+ devtest)
    SOURCES.downloaded.md, sources.downloaded.json   what was fetched: repo, revision, files, bytes, licence

A file of a source that cannot be read (corrupt parquet or compression, a line that is not JSON, no text column)
does not stop the download: the records read before the problem are kept, and the file, the error and the number
of skipped lines are listed under `failed_files` / `malformed_lines` in sources.downloaded.json and the markdown.
A source none of whose files yields a document is an error.

A finished file or shard is written atomically (temporary name, then rename); a source whose output is complete
is skipped on the next run (an interrupted sharded source is redone from its first shard); overwrite=true fetches
again. Set HF_TOKEN for gated datasets (FLORES+ asks you to accept its terms first).
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

from pydantic import Field, model_validator

from jobs.platform.runtime import JobResult, Settings, main_entry
from jobs.prep.sources import split_suffixes
from llm_core.config import StrictModel
from llm_core.data import DataError
from llm_core.io import atomic_write_json, atomic_write_text

log = logging.getLogger("tulpar.download_data")


class HubSource(StrictModel):
    """Parquet files of one Hugging Face dataset repository."""

    name: str = Field(description="output name: corpus/<language>/<name>.jsonl or eval/parallel/<name>/")
    repo: str = Field(description="dataset repository, e.g. HuggingFaceFW/fineweb-2")
    revision: str = Field("main", description="branch, tag or commit (pin a commit for reproducibility)")
    root: str | None = Field(
        None,
        description="read the files from this local directory or s3:// prefix instead of the hub repository",
    )
    files: list[str] = Field(
        min_length=1,
        description="glob patterns of the files to read: parquet, or jsonl (.jsonl/.ndjson, plain, .gz or .zst)",
    )
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
    shard_mb: float | None = Field(
        None,
        gt=0,
        description="write each corpus source as shards corpus/<lang>/<name>/part-NNNNN.jsonl of at most this many "
        "MB (before compression); null: one file corpus/<lang>/<name>.jsonl",
    )
    compression: Literal["none", "zstd", "gzip"] = Field(
        "none", description="compression of the shards (with shard_mb): zstd writes part-NNNNN.jsonl.zst"
    )
    sources: list[HubSource] = Field(min_length=1)

    @model_validator(mode="after")
    def _compression_needs_shards(self) -> DataConfig:
        if self.compression != "none" and self.shard_mb is None:
            raise ValueError(f"compression={self.compression} applies to shards: set shard_mb too (e.g. 256)")
        return self


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


def iter_jsonl_texts(
    fs, path: str, text_field: str, compression: str | None, malformed: list[int]
) -> Iterator[str]:
    """Non-empty string `text_field`s of a jsonl file (plain, gzip or zstd), streamed; lines that are not JSON
    objects with that string field are counted in `malformed[0]` and skipped."""
    import pyarrow as pa

    with fs.open(path, "rb") as f:
        stream = pa.input_stream(f, compression=compression)
        rest = b""
        while True:
            block = stream.read(1 << 16)  # small: a stream that breaks loses little
            lines = (rest + block).split(b"\n")
            rest = lines.pop() if block else b""
            for line in lines:
                if not line.strip():
                    continue
                try:
                    value = json.loads(line).get(text_field)
                except (ValueError, AttributeError):
                    value = None
                if not isinstance(value, str):
                    malformed[0] += 1
                elif value.strip():
                    yield value
            if not block:
                return


def iter_texts(fs, path: str, text_field: str, malformed: list[int]) -> Iterator[str]:
    """The texts of one source file, by its suffix: parquet, or jsonl / .ndjson (plain, .gz, .zst)."""
    fmt, compression = split_suffixes(path)
    if fmt == "parquet" and compression is None:
        return iter_parquet_texts(fs, path, text_field)
    if fmt == "jsonl":
        return iter_jsonl_texts(fs, path, text_field, compression, malformed)
    raise DataError(f"{path}: not parquet or jsonl(.gz/.zst): narrow the source's files patterns")


def output_path(out: Path, src: HubSource, sharded: bool = False) -> Path:
    """The output file, or with `sharded` the directory of a corpus source's shards."""
    if src.kind == "corpus":
        return out / "corpus" / src.language / (src.name if sharded else f"{src.name}.jsonl")
    return out / "eval" / "parallel" / src.name / f"{src.language}.txt"


class CorpusWriter:
    """Lines into one file, or into shards `part-NNNNN.jsonl[.zst|.gz]` of at most `shard_bytes` (before
    compression) in a directory. Every file is written under a temporary name and renamed when complete."""

    def __init__(self, target: Path, shard_bytes: int | None = None, compression: str = "none"):
        self.target, self.shard_bytes, self.compression = target, shard_bytes, compression
        self.done: list[Path] = []
        self._stream: Any = None
        self._tmp: Path | None = None
        self._final: Path | None = None
        self._size = 0
        if shard_bytes is None:
            target.parent.mkdir(parents=True, exist_ok=True)
        else:  # shards of an interrupted run are replaced
            target.mkdir(parents=True, exist_ok=True)
            for old in [*target.glob("part-*.jsonl*"), *target.glob(".part-*.jsonl*")]:
                old.unlink()

    def _open(self) -> None:
        import pyarrow as pa

        if self.shard_bytes is None:
            self._final = self.target
        else:
            suffix = {"none": "", "zstd": ".zst", "gzip": ".gz"}[self.compression]
            self._final = self.target / f"part-{len(self.done):05d}.jsonl{suffix}"
        self._tmp = self._final.with_name(f".{self._final.name}.part")
        if self.shard_bytes is not None and self.compression != "none":
            self._stream = pa.CompressedOutputStream(str(self._tmp), self.compression)
        else:
            self._stream = open(self._tmp, "wb")  # noqa: SIM115 (closed in _finish)
        self._size = 0

    def _finish(self) -> None:
        self._stream.close()
        os.replace(self._tmp, self._final)
        self.done.append(self._final)
        self._stream = None

    def write(self, line: str) -> None:
        data = line.encode("utf-8") + b"\n"
        if self._stream is not None and self.shard_bytes and self._size + len(data) > self.shard_bytes:
            self._finish()
        if self._stream is None:
            self._open()
        self._stream.write(data)
        self._size += len(data)

    def close(self) -> list[Path]:
        """The finished files (an empty source still gets its one file, or one empty shard)."""
        if self._stream is None and not self.done:
            self._open()
        if self._stream is not None:
            self._finish()
        return self.done


def write_source(
    fs,
    root: str,
    src: HubSource,
    out: Path,
    cap_bytes: int | None,
    shard_bytes: int | None = None,
    compression: str = "none",
) -> dict[str, Any]:
    """Stream the matching files of one source into its output (atomically); returns what was fetched. A file
    that fails half-way keeps the documents read before the failure and is listed in `failed_files`."""
    listing = (
        [str(p) for p in fs.glob(f"{root}/**", detail=False)] if any("**" in p for p in src.files) else []
    )
    if not listing:
        listing = sorted({str(p) for pat in src.files for p in fs.glob(f"{root}/{pat}", detail=False)})
    files = match_files(listing, root, src.files)
    if not files:
        raise DataError(
            f"{src.name}: no files in {src.root or f'{src.repo}@{src.revision}'} match {src.files}: "
            "check the patterns"
        )
    sharded = src.kind == "corpus" and shard_bytes is not None
    target = output_path(out, src, sharded)
    writer = CorpusWriter(target, shard_bytes if sharded else None, compression if sharded else "none")
    n_docs = n_bytes = 0
    used: list[str] = []
    failed: list[dict[str, Any]] = []
    malformed = [0]
    origin = src.root or src.repo
    for rel in files:
        used.append(rel)
        before = n_docs
        try:
            for text in iter_texts(fs, f"{root}/{rel}", src.text_field, malformed):
                if src.kind == "corpus":
                    line = json.dumps({"text": text, "source": f"{origin}/{rel}"}, ensure_ascii=False)
                else:
                    line = " ".join(text.split())
                writer.write(line)
                n_docs += 1
                n_bytes += len(text.encode("utf-8"))
                if cap_bytes is not None and n_bytes >= cap_bytes:
                    break
        except (OSError, ValueError, EOFError) as exc:  # corrupt parquet/compression, no text column, I/O
            failed.append(
                {"file": rel, "error": f"{type(exc).__name__}: {exc}", "documents": n_docs - before}
            )
            log.warning("%s: %s failed after %d documents: %s", src.name, rel, n_docs - before, exc)
        if cap_bytes is not None and n_bytes >= cap_bytes:
            break
    if n_docs == 0 and failed:
        raise DataError(
            f"{src.name}: no file yielded a document; first failure: {failed[0]['file']}: "
            f"{failed[0]['error']}"
        )
    written = writer.close()
    entry = {
        "name": src.name,
        "repo": src.root or src.repo,
        "revision": "" if src.root else src.revision,
        "language": src.language,
        "kind": src.kind,
        "files": used,
        "documents": n_docs,
        "bytes": n_bytes,
        "path": str(target.relative_to(out)),
        "licence": src.licence,
        "description": src.description,
        "failed_files": failed,
        "malformed_lines": malformed[0],
    }
    if sharded:
        entry["shards"] = [str(p.relative_to(out)) for p in written]
    return entry


def is_complete(out: Path, src: HubSource, entry: dict[str, Any] | None, sharded: bool) -> bool:
    """Whether a previous run's entry describes this source's finished output, as it would be written now."""
    if entry is None or entry.get("path") != str(output_path(out, src, sharded).relative_to(out)):
        return False
    return all((out / p).is_file() for p in entry.get("shards") or [entry["path"]])


def source_filesystem(src: HubSource):
    """(fsspec filesystem, root path in it) of a source with a `root`: a local directory or an s3:// prefix."""
    import fsspec

    assert src.root is not None
    if "://" in src.root and not src.root.startswith("file://"):
        import pyarrow.fs as pafs
        from fsspec.implementations.arrow import ArrowFSWrapper

        arrow_fs, path = pafs.FileSystem.from_uri(src.root)
        return ArrowFSWrapper(arrow_fs), path.rstrip("/")
    local = src.root.removeprefix("file://")
    return fsspec.filesystem("file"), str(Path(local).expanduser().resolve())


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
    problems = [(e, f) for e in entries for f in e.get("failed_files", [])]
    skipped = [e for e in entries if e.get("malformed_lines")]
    if problems or skipped:
        rows += [
            "",
            "## Files that could not be read in full",
            "",
            "| source | file | documents kept | error |",
            "|---|---|---:|---|",
        ]
        rows += [f"| {e['name']} | {f['file']} | {f['documents']:,} | {f['error']} |" for e, f in problems]
        rows += [
            f"| {e['name']} | (lines without a string text field) | skipped: {e['malformed_lines']:,} | |"
            for e in skipped
        ]
    return "\n".join(rows) + "\n"


def download(
    cfg: DataConfig, out: Path, fs=None, roots: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    """Fetch every source (or reuse its finished file). `fs`/`roots` replace the hub in tests."""
    if fs is None and any(s.root is None for s in cfg.sources):
        from huggingface_hub import HfFileSystem

        fs = HfFileSystem(token=os.environ.get("HF_TOKEN"))
    caps = per_source_caps(cfg)
    manifest_path = out / "sources.downloaded.json"
    previous = {}
    if manifest_path.is_file():
        previous = {
            f"{e['name']}/{e['language']}": e for e in json.loads(manifest_path.read_text(encoding="utf-8"))
        }
    shard_bytes = int(cfg.shard_mb * 1_000_000) if cfg.shard_mb else None
    entries = []
    for src in cfg.sources:
        if cfg.languages and src.language not in cfg.languages:
            continue
        key = f"{src.name}/{src.language}"
        sharded = src.kind == "corpus" and shard_bytes is not None
        if not cfg.overwrite and is_complete(out, src, previous.get(key), sharded):
            log.info("%s: already downloaded (%s)", key, output_path(out, src, sharded))
            entries.append(previous[key])
            continue
        if src.root is not None:
            src_fs, root = source_filesystem(src)
        else:
            src_fs, root = fs, (roots or {}).get(src.name) or hub_root(src.repo, src.revision)
        cap = caps.get(key) if src.kind == "corpus" else None
        log.info(
            "%s: %s %s (cap %s bytes)", src.name, src.root or f"{src.repo}@{src.revision}", src.files, cap
        )
        entries.append(write_source(src_fs, root, src, out, cap, shard_bytes, cfg.compression))
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
