"""Finding and reading raw text: .txt / .jsonl / .parquet, optionally gzip/zstd, local or s3:// (pyarrow.fs).

Planning runs on the driver: `discover` expands each source into files, sniffs each file (missing, unreadable,
empty, binary) and `plan_chunks` cuts large uncompressed line-oriented files into byte ranges so that several
workers share one big file. Reading (`read_chunk`) runs in the workers and yields one `RawDoc` per record,
including the broken ones (malformed JSON, missing text field, invalid UTF-8, too long), each with a reason, so
that every input record is accounted for in the report.

A byte range [start, end) owns the lines that START inside it: a reader skips the partial line at `start` and
finishes the line that crosses `end`. Document ids are `chunk_ordinal << 32 | index_in_chunk`, with chunks
numbered in (source, path, offset) order, so ids, and every decision that depends on input order, are the same
whatever the number of workers.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow.fs as pafs

from jobs.prep.config import PreprocessConfig, ReadConfig, SourceSpec

COMPRESSION = {".gz": "gzip", ".gzip": "gzip", ".zst": "zstd", ".zstd": "zstd"}
FORMATS = {
    ".txt": "txt",
    ".text": "txt",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".parquet": "parquet",
}
GLOB_CHARS = set("*?[")
BLOCK = 1 << 20
EXAMPLE_BYTES = 400  # how much of a broken record is kept as an example for the report


@dataclass
class FileEntry:
    """One input file and what the driver found out about it."""

    file_id: int
    uri: str  # local absolute path, or scheme://...
    source: int  # index into config.sources
    language: str
    format: str  # txt | jsonl | parquet ("" when unsupported)
    compression: str | None
    size: int
    txt_mode: str = "line"
    text_field: str = "text"
    status: str = "ok"  # ok | missing | unreadable | empty | binary | unsupported
    detail: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Chunk:
    """A unit of reading work: a whole file (start=0, end=-1) or a byte range of an uncompressed file."""

    ordinal: int
    file_id: int
    start: int
    end: int  # -1: to the end of the file


@dataclass
class RawDoc:
    doc_id: int
    file_id: int
    offset: int  # byte offset of the record in the (decompressed) file; row index for parquet
    text: str
    n_bytes_in: int
    reason: str = ""  # "" = fine so far; else why it is dropped
    repaired: str = ""  # "" or a repair that was applied (invalid_utf8, truncated)
    detail: str = field(default="", repr=False)


# ------------------------------------------------------------------------------------------ filesystems


def is_uri(path: str) -> bool:
    return "://" in path


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for a local path or a URI such as s3://bucket/key."""
    if is_uri(uri):
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def join_uri(base: str, rel: str) -> str:
    return f"{base.rstrip('/')}/{rel}" if is_uri(base) else str(Path(base) / rel)


def split_suffixes(name: str) -> tuple[str, str | None]:
    """(format, compression) from a file name such as `x.jsonl.zst`; format "" when unsupported."""
    lower = name.lower()
    compression = None
    for ext, comp in COMPRESSION.items():
        if lower.endswith(ext):
            compression, lower = comp, lower[: -len(ext)]
            break
    fmt = next((f for ext, f in FORMATS.items() if lower.endswith(ext)), "")
    return fmt, compression


def _list_local(root: str) -> tuple[list[tuple[str, int]], list[tuple[str, str]]]:
    """Files under a local directory (following nothing outside it) and the paths that could not be read."""
    files: list[tuple[str, int]] = []
    errors: list[tuple[str, str]] = []

    def onerror(exc: OSError) -> None:
        errors.append(
            (getattr(exc, "filename", None) or root, f"{type(exc).__name__}: {exc.strerror or exc}")
        )

    for dirpath, dirnames, filenames in os.walk(root, onerror=onerror, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames):
            p = os.path.join(dirpath, name)
            try:
                files.append((p, os.stat(p).st_size))
            except OSError as exc:  # broken symlink, permission
                errors.append((p, f"{type(exc).__name__}: {exc.strerror or exc}"))
    return files, errors


def _list_remote(fs: pafs.FileSystem, root: str, prefix: str) -> list[tuple[str, int]]:
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    out = [(f"{prefix}{i.path}", int(i.size or 0)) for i in infos if i.type == pafs.FileType.File]
    return sorted(out)


def expand_source(spec: SourceSpec, data_root: Path) -> tuple[list[tuple[str, int]], list[tuple[str, str]]]:
    """(files with sizes, unreadable paths with the error) for one source; paths sorted."""
    raw = spec.path
    uri = raw if is_uri(raw) or os.path.isabs(raw) else str(data_root / raw)
    scheme = uri.split("://", 1)[0] + "://" if is_uri(uri) else ""
    has_glob = any(c in uri for c in GLOB_CHARS)
    base = uri
    if has_glob:
        cut = min(uri.index(c) for c in GLOB_CHARS if c in uri)
        base = uri[:cut].rsplit("/", 1)[0] or "/"
    if not scheme:
        if not has_glob and os.path.isfile(uri):
            return [(uri, os.path.getsize(uri))], []
        if not os.path.isdir(base):
            reason = "no such file or directory" if not os.path.lexists(base) else "not readable"
            return [], [(uri, reason)]
        files, errors = _list_local(base)
    else:
        fs, path = filesystem(base)
        prefix = scheme if not base.startswith("file://") else "file://"
        try:
            info = fs.get_file_info(path)
        except OSError as exc:
            return [], [(uri, f"{type(exc).__name__}: {exc}")]
        if info.type == pafs.FileType.File and not has_glob:
            return [(uri, int(info.size or 0))], []
        if info.type != pafs.FileType.Directory:
            return [], [(uri, "no such file or directory")]
        files, errors = _list_remote(fs, path, prefix), []
    if has_glob:
        files = [f for f in files if fnmatch.fnmatchcase(f[0], uri)]
        errors = [e for e in errors if fnmatch.fnmatchcase(e[0], uri)]
        if not files and not errors:
            errors = [(uri, "glob matched no files")]
    elif not files and not errors:
        errors = [(uri, "directory has no files")]
    return files, errors


def sniff(uri: str, fmt: str, compression: str | None, cfg: ReadConfig) -> tuple[str, str]:
    """("ok", "") or (status, detail) after reading the first bytes of a file."""
    try:
        fs, path = filesystem(uri)
        with fs.open_input_stream(path, compression=compression) as f:
            head = f.read(cfg.sniff_bytes)
    except (OSError, ValueError) as exc:
        return "unreadable", f"{type(exc).__name__}: {exc}"
    if not head:
        return "empty", "no bytes"
    if fmt == "parquet":
        return ("ok", "") if head[:4] == b"PAR1" else ("binary", "not a parquet file (no PAR1 magic)")
    if b"\x00" in head:
        return "binary", "NUL bytes (binary or UTF-16 file): convert it to UTF-8 text"
    control = sum(1 for b in head if b < 32 and b not in (9, 10, 12, 13))
    if control / len(head) > cfg.max_control_ratio:
        return "binary", f"{control} control bytes in the first {len(head)}"
    if not head.strip():
        return "empty", "only whitespace"
    return "ok", ""


def discover(cfg: PreprocessConfig, data_root: Path) -> list[FileEntry]:
    """Every file of every source, in (source, path) order, with its status."""
    entries: list[FileEntry] = []
    seen: set[str] = set()
    for si, spec in enumerate(cfg.sources):
        files, errors = expand_source(spec, data_root)
        for uri, size in files:
            if uri in seen:  # listed by two sources: read once (by the first)
                continue
            seen.add(uri)
            fmt, comp = split_suffixes(uri)
            if spec.format != "auto":
                fmt = spec.format
            e = FileEntry(
                len(entries), uri, si, spec.language, fmt, comp, size, spec.txt_mode, spec.text_field
            )
            if not fmt:
                e.status, e.detail = "unsupported", "extension is not .txt/.jsonl/.parquet (set format)"
            elif size == 0:
                e.status, e.detail = "empty", "0 bytes"
            else:
                e.status, e.detail = sniff(uri, fmt, comp, cfg.read)
            entries.append(e)
        for uri, why in errors:
            fmt, comp = split_suffixes(uri)
            status = (
                "missing" if why in ("no such file or directory", "glob matched no files") else "unreadable"
            )
            entries.append(
                FileEntry(len(entries), uri, si, spec.language, fmt, comp, 0, status=status, detail=why)
            )
    return entries


def plan_chunks(files: list[FileEntry], chunk_bytes: int) -> list[Chunk]:
    """Reading work items for the readable files, numbered in input order."""
    chunks: list[Chunk] = []
    for f in files:
        if f.status != "ok":
            continue
        splittable = f.compression is None and (
            f.format == "jsonl" or (f.format == "txt" and f.txt_mode == "line")
        )
        if splittable and f.size > chunk_bytes:
            for start in range(0, f.size, chunk_bytes):
                chunks.append(Chunk(len(chunks), f.file_id, start, min(start + chunk_bytes, f.size)))
        else:
            chunks.append(Chunk(len(chunks), f.file_id, 0, -1))
    return chunks


def input_sha256(files: list[FileEntry], mode: str = "content") -> str:
    """Fingerprint of the inputs: every file's URI, size and content hash (mode "content") or modification
    time (mode "metadata", for corpora too large to hash on every run)."""
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.uri}\0{f.size}\0{f.status}\0".encode())
        if f.status != "ok":
            continue
        fs, path = filesystem(f.uri)
        if mode == "metadata":
            h.update(str(fs.get_file_info(path).mtime_ns).encode())
            continue
        with fs.open_input_stream(path) as stream:
            while block := stream.read(1 << 22):
                h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- reading


def iter_lines(read: Callable[[], bytes], start: int, max_bytes: int) -> Iterator[tuple[int, bytes, int]]:
    """(offset, line without newline, full length) for each line of a byte stream starting at `start`.

    A line longer than `max_bytes` is never held whole: only its first `max_bytes` bytes are kept and the full
    length is reported, so the caller can skip or truncate a 50 MB line with bounded memory."""
    buf = b""
    offset = start  # file offset of buf[0]
    while True:
        nl = buf.find(b"\n")
        if nl >= 0:
            yield offset, buf[:nl], nl
            buf = buf[nl + 1 :]
            offset += nl + 1
            continue
        if len(buf) > max_bytes:  # overlong line: keep the head, count and discard the rest
            head, length = buf[:max_bytes], len(buf)
            buf = b""
            while True:
                block = read()
                if not block:
                    yield offset, head, length
                    return
                nl = block.find(b"\n")
                if nl < 0:
                    length += len(block)
                    continue
                length += nl
                yield offset, head, length
                offset += length + 1
                buf = block[nl + 1 :]
                break
            continue
        block = read()
        if not block:
            if buf:
                yield offset, buf, len(buf)
            return
        buf += block


def _decode(raw: bytes, policy: str) -> tuple[str | None, bool]:
    """(text, repaired) or (None, False) when the bytes are invalid and the policy is skip."""
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        if policy == "skip":
            return None, False
        return raw.decode("utf-8", errors="replace"), True


def _clean_surrogates(text: str) -> tuple[str, bool]:
    """JSON can encode lone surrogates (\\ud800) that are not valid UTF-8: replace them."""
    try:
        text.encode("utf-8")
        return text, False
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace"), True


class _DocMaker:
    """Numbers the documents of one chunk and applies the bad-input policies."""

    def __init__(self, chunk: Chunk, cfg: ReadConfig):
        self.chunk, self.cfg, self.n = chunk, cfg, 0

    def make(self, offset: int, raw: bytes, length: int, *, kind: str, text_field: str = "text") -> RawDoc:
        doc = RawDoc(self.chunk.ordinal << 32 | self.n, self.chunk.file_id, offset, "", length)
        self.n += 1
        too_long = length > self.cfg.max_doc_bytes
        if too_long and (self.cfg.on_long_document == "skip" or kind == "jsonl"):
            doc.reason, doc.detail = (
                "too_long",
                f"{length} bytes > read.max_doc_bytes={self.cfg.max_doc_bytes}",
            )
            doc.text = raw[:EXAMPLE_BYTES].decode("utf-8", errors="replace")
            return doc
        if too_long:  # cut at a character boundary
            cut = self.cfg.max_doc_bytes
            while cut > 0 and (raw[cut] & 0xC0) == 0x80:
                cut -= 1
            raw = raw[:cut]
            doc.repaired = "truncated"
        text, repaired = _decode(raw, self.cfg.on_invalid_utf8)
        if text is None:
            doc.reason, doc.detail = "invalid_utf8", "bytes that are not UTF-8 (read.on_invalid_utf8=skip)"
            doc.text = raw[:EXAMPLE_BYTES].decode("utf-8", errors="replace")
        else:
            if repaired:
                doc.repaired = doc.repaired or "invalid_utf8"
            if kind == "jsonl":
                self._parse_json(doc, text, text_field)
            else:
                doc.text = text.rstrip("\r")
        return doc

    def _parse_json(self, doc: RawDoc, line: str, text_field: str) -> None:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            doc.reason, doc.detail, doc.text = (
                "malformed_json",
                f"{exc.msg} at column {exc.colno}",
                line[:EXAMPLE_BYTES],
            )
            return
        value = rec.get(text_field) if isinstance(rec, dict) else None
        if not isinstance(value, str):
            doc.reason = "missing_text_field"
            doc.detail = f"no string field {text_field!r} (set the source's text_field)"
            doc.text = line[:EXAMPLE_BYTES]
            return
        doc.text, fixed = _clean_surrogates(value)
        if fixed:
            doc.repaired = doc.repaired or "invalid_utf8"


def _read_lines(chunk: Chunk, f_entry: FileEntry, cfg: ReadConfig) -> Iterator[RawDoc]:
    fs, path = filesystem(f_entry.uri)
    maker = _DocMaker(chunk, cfg)
    kind = "jsonl" if f_entry.format == "jsonl" else "txt"
    if chunk.end < 0:
        stream = fs.open_input_stream(path, compression=f_entry.compression)
        start, end = 0, None
    else:
        stream = fs.open_input_file(path)
        start, end = chunk.start, chunk.end
        if start > 0:  # skip the line that started in the previous chunk
            stream.seek(start - 1)
            skip = 0
            while True:
                block = stream.read(BLOCK)
                nl = block.find(b"\n")
                if nl >= 0:
                    skip += nl
                    break
                skip += len(block)
                if not block or start - 1 + skip >= end:  # the line runs past this chunk: nothing is ours
                    stream.close()
                    return
            start = start + skip  # first byte after the newline (start - 1 + skip + 1)
            if start >= end:
                stream.close()
                return
            stream.seek(start)
    with stream:

        def read() -> bytes:
            return stream.read(BLOCK)

        if kind == "txt" and f_entry.txt_mode == "blank_line":
            yield from _blank_line_docs(iter_lines(read, start, cfg.max_doc_bytes), maker, cfg)
            return
        for offset, raw, length in iter_lines(read, start, cfg.max_doc_bytes):
            if end is not None and offset >= end:
                return
            if not raw.strip():
                continue
            yield maker.make(offset, raw, length, kind=kind, text_field=f_entry.text_field)


def _blank_line_docs(lines, maker: _DocMaker, cfg: ReadConfig) -> Iterator[RawDoc]:
    block: list[bytes] = []
    block_offset, block_len = 0, 0
    for offset, raw, length in lines:
        if raw.strip():
            if not block:
                block_offset, block_len = offset, 0
            block.append(raw)
            block_len += length + (1 if len(block) > 1 else 0)
            continue
        if block:
            yield maker.make(block_offset, b"\n".join(block), block_len, kind="txt")
            block = []
    if block:
        yield maker.make(block_offset, b"\n".join(block), block_len, kind="txt")


def _read_parquet(chunk: Chunk, f_entry: FileEntry, cfg: ReadConfig) -> Iterator[RawDoc]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, path = filesystem(f_entry.uri)
    maker = _DocMaker(chunk, cfg)
    with fs.open_input_file(path) as raw:
        pf = pq.ParquetFile(raw)
        names = pf.schema_arrow.names
        field_ok = f_entry.text_field in names and (
            pa.types.is_string(pf.schema_arrow.field(f_entry.text_field).type)
            or pa.types.is_large_string(pf.schema_arrow.field(f_entry.text_field).type)
        )
        if not field_ok:
            for row in range(pf.metadata.num_rows):
                doc = RawDoc(chunk.ordinal << 32 | maker.n, chunk.file_id, row, "", 0, "missing_text_field")
                doc.detail = f"no string column {f_entry.text_field!r} (columns: {names[:8]})"
                maker.n += 1
                yield doc
            return
        row = 0
        for batch in pf.iter_batches(columns=[f_entry.text_field], batch_size=1024):
            for value in batch.column(0).to_pylist():
                if value is None:
                    doc = RawDoc(
                        chunk.ordinal << 32 | maker.n, chunk.file_id, row, "", 0, "missing_text_field"
                    )
                    doc.detail = "null value"
                    maker.n += 1
                    yield doc
                else:
                    data = value.encode("utf-8", "surrogatepass")
                    yield maker.make(row, data, len(data), kind="txt")
                row += 1


def read_chunk(chunk: Chunk, entry: FileEntry, cfg: ReadConfig) -> Iterator[RawDoc]:
    """Every record of one chunk as a RawDoc (broken ones carry a reason); I/O errors become one record."""
    try:
        if entry.format == "parquet":
            yield from _read_parquet(chunk, entry, cfg)
        else:
            yield from _read_lines(chunk, entry, cfg)
    except (OSError, ValueError, EOFError) as exc:  # e.g. a corrupt gzip stream half-way through
        yield RawDoc(
            chunk.ordinal << 32 | 0xFFFFFFFF,
            chunk.file_id,
            chunk.start,
            "",
            0,
            "read_error",
            detail=f"{type(exc).__name__}: {exc}",
        )
