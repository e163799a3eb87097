"""Finding and reading raw text: .txt / .jsonl / .parquet, optionally gzip/zstd, local or s3:// (pyarrow.fs).

Planning runs on the driver and costs one listing per source, plus at most a few bytes per local file:

- `discover(cfg, data_root)` expands each source (file, directory tree, glob, `s3://` prefix) with ONE listing
  (a directory walk, or S3 ListObjectsV2 pages of 1,000 keys) that gives every file's size and modification
  time. Each file becomes a `FileEntry` whose `status` is one of `FILE_STATUSES` (ok | missing | unreadable |
  empty | binary | corrupt | unsupported). Where `read.sniff` says so (auto: local files) it also sniffs the first
  `read.sniff_bytes` (1 KiB, decompressed for .gz/.zst, from one read of at most 64 KiB) of each file and sets
  the status from it (`FileEntry.sniffed`); on object storage (auto) nothing is opened on the driver and the
  reading task sniffs instead (see below), so 5,000 S3 objects cost 5 list requests, not 10,000 HEAD/GETs.
- `plan_chunks(files, chunk_bytes)` cuts work items without opening anything: uncompressed line-oriented files
  larger than `chunk_bytes` into byte ranges, parquet files into byte ranges that each own the ROW GROUPS starting
  inside them (the reader takes them from the footer), compressed files whole.
- `input_sha256(files, mode)` fingerprints the inputs. `stat` (the default) hashes every file's URI, size,
  modification time (S3: LastModified) and status as listed by `discover` -- no extra I/O, fine for 100 GB; any
  rewrite, addition or removal of a file changes it. `content` hashes every byte on the driver (a full read of the
  corpus on every run, cached or not) for when modification times cannot be trusted.

Reading (`read_chunk`) runs in the workers and yields one `RawDoc` per record, including the broken ones, each
with a `reason` from `READ_REASONS`, so that every input record is accounted for in the report:

- per record: `malformed_json`, `missing_text_field` (also a null parquet value), `invalid_utf8` (only with
  `read.on_invalid_utf8: skip`; by default the bytes are replaced and the record carries `repaired`),
  `too_long`;
- per file (`FILE_REASONS`), ONE extra record with `text=""`, `n_bytes_in=0`,
  `doc_id = chunk.ordinal << 32 | 0xFFFFFFFF`, `offset` = the (decompressed) byte offset -- for parquet the row
  index -- where reading stopped, and a `detail` that names the file ("<what> at byte|row N of <uri>: <error>"):
  `file_missing` (deleted between listing and reading, e.g. an s3:// object), `corrupt_compression` (truncated or
  corrupt gzip/zstd), `corrupt_parquet` (unreadable footer or page), `read_error` (any other I/O error:
  permissions, network), and, when the reading task sniffed the file, `binary_file` / `empty_file` (offset 0,
  "binary|empty file <uri>: ..."). Records read before the problem are kept. Failures found when a file is
  opened or sniffed are reported by the chunk that starts at byte 0 only, so a file split into N chunks counts
  once. `FILE_REASON_STATUS` maps each to the file status it stands for, for the report's file table.

`READ_REASONS` lists every reason the read stage assigns, in report order (report.STAGE_REASONS["read"]). A file
is binary when its sniffed head has more than `read.max_control_ratio` (10%) non-text bytes (NUL, control
characters other than tab/newline/CR/FF, bytes of invalid UTF-8 sequences) or starts with a UTF-16 byte-order
mark. Isolated invalid UTF-8 in a text file is handled per record (`invalid_utf8`).

A byte range [start, end) owns the lines that START inside it: a reader skips the partial line at `start` and
finishes the line that crosses `end`. Document ids are `chunk_ordinal << 32 | index_in_chunk`, with chunks
numbered in (source, path, offset) order, so ids, and every decision that depends on input order, are the same
whatever the number of workers.
"""

from __future__ import annotations

import codecs
import fnmatch
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
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
SNIFF_RAW = 1 << 16  # compressed bytes fetched to sniff a .gz/.zst file
SNIFF_STEP = 256  # ... decompressed in steps this small, so a stream that breaks early still gives its head
EXAMPLE_BYTES = 400  # how much of a broken record is kept as an example for the report
ERROR_INDEX = 0xFFFFFFFF  # index_in_chunk of the record that reports a failure ending a chunk

FILE_STATUSES = ("ok", "missing", "unreadable", "empty", "binary", "corrupt", "unsupported")
# Reasons of records that stand for the unread rest of a file (see the module docstring).
FILE_REASONS = (
    "file_missing",
    "binary_file",
    "empty_file",
    "corrupt_compression",
    "corrupt_parquet",
    "read_error",
)
# The file status each of them stands for (a file whose head the reading task checked keeps status "ok").
FILE_REASON_STATUS = {
    "file_missing": "missing",
    "binary_file": "binary",
    "empty_file": "empty",
    "corrupt_compression": "corrupt",
    "corrupt_parquet": "corrupt",
    "read_error": "unreadable",
}
_STATUS_REASON = {
    "missing": "file_missing",
    "binary": "binary_file",
    "empty": "empty_file",
    "corrupt": "corrupt_compression",
    "unreadable": "read_error",
}
# Every reason the read stage gives a record, in report order (report.STAGE_REASONS["read"]).
READ_REASONS = (*FILE_REASONS, "malformed_json", "missing_text_field", "invalid_utf8", "too_long")

_COMPRESSION_ERROR = re.compile(r"compress|inflate|zlib|zstd|gzip|lz4|brotli|bz2", re.IGNORECASE)
# Errors of the storage rather than the bytes (network, permissions): `read_error`, never "corrupt".
_IO_ERROR = re.compile(
    r"AWS Error|curl|connection|timed out|timeout|network|broken pipe|reset by peer|permission|access denied",
    re.IGNORECASE,
)


@dataclass
class FileEntry:
    """One input file and what the driver found out about it (from the listing and a sniff of its head)."""

    file_id: int
    uri: str  # local absolute path, or scheme://...
    source: int  # index into config.sources
    language: str
    format: str  # txt | jsonl | parquet ("" when unsupported)
    compression: str | None
    size: int  # bytes on storage (compressed size for .gz/.zst)
    txt_mode: str = "line"
    text_field: str = "text"
    status: str = "ok"  # one of FILE_STATUSES
    detail: str = ""
    mtime_ns: int = 0  # modification time from the listing (S3: LastModified); 0 when unknown
    sniffed: bool = False  # the driver checked its head; else the reading task does (read.sniff)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Chunk:
    """A unit of reading work: a whole file (start=0, end=-1), a byte range of an uncompressed line-oriented
    file, or a byte range of a parquet file (the row groups that start inside it)."""

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
    reason: str = ""  # "" = fine so far; else why it is dropped (one of READ_REASONS)
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


Listed = tuple[str, int, int]  # (uri, size, mtime_ns)


def _list_local(root: str) -> tuple[list[Listed], list[tuple[str, str]]]:
    """Files under a local directory (following nothing outside it) and the paths that could not be read."""
    files: list[Listed] = []
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
                st = os.stat(p)
            except OSError as exc:  # broken symlink, permission
                errors.append((p, f"{type(exc).__name__}: {exc.strerror or exc}"))
                continue
            files.append((p, st.st_size, st.st_mtime_ns))
    return files, errors


def _list_remote(fs: pafs.FileSystem, root: str, prefix: str) -> list[Listed]:
    """One recursive listing (S3: ListObjectsV2 pages), sizes and modification times included."""
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    out = [
        (f"{prefix}{i.path}", int(i.size or 0), int(i.mtime_ns or 0))
        for i in infos
        if i.type == pafs.FileType.File
    ]
    return sorted(out)


def expand_source(spec: SourceSpec, data_root: Path) -> tuple[list[Listed], list[tuple[str, str]]]:
    """((uri, size, mtime_ns) of each file, unreadable paths with the error) for one source; paths sorted."""
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
            st = os.stat(uri)
            return [(uri, st.st_size, st.st_mtime_ns)], []
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
            return [(uri, int(info.size or 0), int(info.mtime_ns or 0))], []
        if info.type != pafs.FileType.Directory:
            return [], [(uri, "no such file or directory")]
        try:
            files, errors = _list_remote(fs, path, prefix), []
        except OSError as exc:
            return [], [(uri, f"{type(exc).__name__}: {exc}")]
    if has_glob:
        files = [f for f in files if fnmatch.fnmatchcase(f[0], uri)]
        errors = [e for e in errors if fnmatch.fnmatchcase(e[0], uri)]
        if not files and not errors:
            errors = [(uri, "glob matched no files")]
    elif not files and not errors:
        errors = [(uri, "directory has no files")]
    return files, errors


def _non_text_bytes(head: bytes) -> int:
    """NUL and control bytes (other than tab, newline, form feed, CR) plus bytes of invalid UTF-8 sequences.

    A multi-byte character cut at the end of `head` is not counted."""
    control = sum(1 for b in head if b < 32 and b not in (9, 10, 12, 13))
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    text = decoder.decode(head, final=False)
    replaced = text.count("\ufffd") - head.decode("utf-8", errors="ignore").count("\ufffd")
    return control + max(0, replaced)


def _read_head(uri: str, compression: str | None, size: int, n: int) -> bytes:
    """The first `n` bytes of a file, decompressed, with ONE read of storage (S3: a HEAD and one ranged GET): a
    compressed file's first `SNIFF_RAW` bytes are fetched and decompressed in memory. A stream that breaks after
    some bytes gives those bytes (the reader reports the break); one that gives none raises."""
    import pyarrow as pa

    fs, path = filesystem(uri)
    with fs.open_input_file(path) as f:
        raw = f.read(n if compression is None else min(size or SNIFF_RAW, SNIFF_RAW))
    if compression is None:
        return raw
    head = b""
    try:
        with pa.CompressedInputStream(pa.BufferReader(raw), compression) as stream:
            while len(head) < n:
                block = stream.read(min(SNIFF_STEP, n - len(head)))
                if not block:
                    break
                head += block
    except (OSError, ValueError, EOFError):
        if not head and len(raw) >= size:
            raise
        # bytes came out before the break, or the sniffed prefix simply ended: the reader sees the rest
    return head


def sniff(uri: str, fmt: str, compression: str | None, cfg: ReadConfig, size: int = 0) -> tuple[str, str]:
    """("ok", "") or (status, detail) after reading (decompressing) the first `cfg.sniff_bytes` of a file."""
    try:
        head = _read_head(uri, compression, size, cfg.sniff_bytes)
    except FileNotFoundError as exc:
        return "missing", f"deleted after it was listed ({type(exc).__name__}: {exc})"
    except (OSError, ValueError, EOFError) as exc:
        message = str(exc)
        if compression and _COMPRESSION_ERROR.search(message) and not _IO_ERROR.search(message):
            return "corrupt", f"{compression} stream cannot be decompressed: {exc}"
        return "unreadable", f"{type(exc).__name__}: {exc}"
    if not head:
        return "empty", "no bytes" + (f" after {compression} decompression" if compression else "")
    if fmt == "parquet":
        return ("ok", "") if head[:4] == b"PAR1" else ("binary", "not a parquet file (no PAR1 magic)")
    if head[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return "binary", "UTF-16 text (byte-order mark): convert it to UTF-8"
    bad = _non_text_bytes(head)
    if bad / len(head) > cfg.max_control_ratio:
        return "binary", (
            f"{bad} of the first {len(head)} bytes are not text (NUL, control or invalid UTF-8; "
            f"read.max_control_ratio={cfg.max_control_ratio})"
        )
    if not head.strip():
        return "empty", "only whitespace"
    return "ok", ""


def discover(cfg: PreprocessConfig, data_root: Path) -> list[FileEntry]:
    """Every file of every source, in (source, path) order, with its status (see the module docstring)."""
    entries: list[FileEntry] = []
    seen: set[str] = set()
    for si, spec in enumerate(cfg.sources):
        files, errors = expand_source(spec, data_root)
        for uri, size, mtime_ns in files:
            if uri in seen:  # listed by two sources: read once (by the first)
                continue
            seen.add(uri)
            fmt, comp = split_suffixes(uri)
            if spec.format != "auto":
                fmt = spec.format
            e = FileEntry(
                len(entries),
                uri,
                si,
                spec.language,
                fmt,
                comp,
                size,
                spec.txt_mode,
                spec.text_field,
                mtime_ns=mtime_ns,
            )
            if not fmt:
                e.status, e.detail = "unsupported", "extension is not .txt/.jsonl/.parquet (set format)"
            elif fmt == "parquet" and comp:
                e.status, e.detail = (
                    "unsupported",
                    f"{comp}-compressed parquet: parquet compresses its own pages, write it uncompressed "
                    "with compression='zstd' inside",
                )
            elif size == 0:
                e.status, e.detail = "empty", "0 bytes"
            entries.append(e)
        for uri, why in errors:
            fmt, comp = split_suffixes(uri)
            status = (
                "missing" if why in ("no such file or directory", "glob matched no files") else "unreadable"
            )
            entries.append(
                FileEntry(len(entries), uri, si, spec.language, fmt, comp, 0, status=status, detail=why)
            )
    todo = [e for e in entries if e.status == "ok" and sniffs_on_driver(e.uri, cfg.read)]
    remote = any(_is_object_store(e.uri) for e in todo)
    threads = min(cfg.read.sniff_threads, len(todo)) if remote else 1  # local reads: no waiting to overlap
    if threads > 1:
        with ThreadPoolExecutor(threads) as pool:
            results = list(pool.map(lambda e: sniff(e.uri, e.format, e.compression, cfg.read, e.size), todo))
    else:
        results = [sniff(e.uri, e.format, e.compression, cfg.read, e.size) for e in todo]
    for e, (status, detail) in zip(todo, results, strict=True):
        e.status, e.detail, e.sniffed = status, detail, True
    return entries


def _is_object_store(uri: str) -> bool:
    return is_uri(uri) and not uri.startswith("file://")


def sniffs_on_driver(uri: str, cfg: ReadConfig) -> bool:
    """Whether `discover` sniffs this file (else the reading task does, see `read.sniff`)."""
    return cfg.sniff == "driver" or (cfg.sniff == "auto" and not _is_object_store(uri))


def plan_chunks(files: list[FileEntry], chunk_bytes: int) -> list[Chunk]:
    """Reading work items for the readable files, numbered in input order; nothing is opened."""
    chunks: list[Chunk] = []
    for f in files:
        if f.status != "ok":
            continue
        splittable = f.compression is None and (
            f.format in ("jsonl", "parquet") or (f.format == "txt" and f.txt_mode == "line")
        )
        if splittable and f.size > chunk_bytes:
            for start in range(0, f.size, chunk_bytes):
                chunks.append(Chunk(len(chunks), f.file_id, start, min(start + chunk_bytes, f.size)))
        else:
            chunks.append(Chunk(len(chunks), f.file_id, 0, -1))
    return chunks


def input_sha256(files: list[FileEntry], mode: str = "stat") -> str:
    """Fingerprint of the inputs: every file's URI, size and status, plus its modification time from the listing
    (mode "stat": no I/O) or the sha256 of its bytes (mode "content": reads the whole corpus)."""
    if mode not in ("stat", "content"):
        raise ValueError(f"input hash mode {mode!r}: use 'stat' or 'content'")
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.uri}\0{f.size}\0{f.status}\0".encode())
        if f.status != "ok":
            continue
        if mode == "stat":
            h.update(f"{f.mtime_ns}\0".encode())
            continue
        fs, path = filesystem(f.uri)
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


class _Progress:
    """Where a chunk's reading stands, for the record that reports a failure: the (decompressed) byte offset or
    parquet row reached, and whether the failure happened while opening the file."""

    def __init__(self, start: int):
        self.position = start
        self.opened = False


def _read_lines(chunk: Chunk, f_entry: FileEntry, cfg: ReadConfig, progress: _Progress) -> Iterator[RawDoc]:
    fs, path = filesystem(f_entry.uri)
    maker = _DocMaker(chunk, cfg)
    kind = "jsonl" if f_entry.format == "jsonl" else "txt"
    if chunk.end < 0:
        stream = fs.open_input_stream(path, compression=f_entry.compression)
        start, end = 0, None
        progress.opened = True
    else:
        stream = fs.open_input_file(path)
        start, end = chunk.start, chunk.end
        progress.opened = True
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
    progress.position = start
    with stream:

        def read() -> bytes:
            block = stream.read(BLOCK)
            progress.position += len(block)
            return block

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


def _row_group_start(rg) -> int:
    """Byte offset where a row group's data begins (its first column chunk's dictionary or first data page)."""
    col = rg.column(0)
    if col.has_dictionary_page and col.dictionary_page_offset:
        return int(col.dictionary_page_offset)
    return int(col.data_page_offset)


def _read_parquet(chunk: Chunk, f_entry: FileEntry, cfg: ReadConfig, progress: _Progress) -> Iterator[RawDoc]:
    """The rows of the row groups that start inside the chunk's byte range (all of them for a whole-file chunk)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, path = filesystem(f_entry.uri)
    maker = _DocMaker(chunk, cfg)
    with fs.open_input_file(path) as raw:
        pf = pq.ParquetFile(raw)
        meta = pf.metadata
        first_rows = [0]
        for i in range(meta.num_row_groups):
            first_rows.append(first_rows[-1] + meta.row_group(i).num_rows)
        if chunk.end < 0:
            groups = list(range(meta.num_row_groups))
        else:
            # each row group belongs to the one range its first byte falls in
            starts = [_row_group_start(meta.row_group(i)) for i in range(meta.num_row_groups)]
            groups = [i for i, b in enumerate(starts) if chunk.start <= min(b, f_entry.size - 1) < chunk.end]
        progress.opened = True
        progress.position = first_rows[groups[0]] if groups else 0
        names = pf.schema_arrow.names
        field_ok = f_entry.text_field in names and (
            pa.types.is_string(pf.schema_arrow.field(f_entry.text_field).type)
            or pa.types.is_large_string(pf.schema_arrow.field(f_entry.text_field).type)
        )
        for g in groups:
            row = progress.position = first_rows[g]
            if not field_ok:
                for row in range(first_rows[g], first_rows[g + 1]):
                    doc = RawDoc(
                        chunk.ordinal << 32 | maker.n, chunk.file_id, row, "", 0, "missing_text_field"
                    )
                    doc.detail = f"no string column {f_entry.text_field!r} (columns: {names[:8]})"
                    maker.n += 1
                    yield doc
                continue
            for batch in pf.iter_batches(batch_size=1024, row_groups=[g], columns=[f_entry.text_field]):
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
                progress.position = row


def _failure(exc: BaseException, entry: FileEntry) -> tuple[str, str]:
    """(reason, what) for an exception that ended the reading of a chunk."""
    if isinstance(exc, FileNotFoundError):
        return "file_missing", "file deleted after it was listed"
    message = str(exc)
    if isinstance(exc, PermissionError | ConnectionError) or _IO_ERROR.search(message):
        return "read_error", "reading failed"
    if entry.format == "parquet":
        return "corrupt_parquet", "parquet file cannot be decoded"
    if entry.compression and _COMPRESSION_ERROR.search(message):
        return "corrupt_compression", f"{entry.compression} stream broken"
    return "read_error", "reading failed"


def read_chunk(chunk: Chunk, entry: FileEntry, cfg: ReadConfig) -> Iterator[RawDoc]:
    """Every record of one chunk as a RawDoc (broken ones carry a reason). A failure that ends the chunk -- file
    deleted, corrupt compression or parquet, I/O error -- becomes ONE record after the records read before it
    (see the module docstring); a failure while opening is reported by the file's first chunk only."""
    if not entry.sniffed and entry.status == "ok":
        status, detail = sniff(entry.uri, entry.format, entry.compression, cfg, entry.size)
        if status != "ok":
            if chunk.start == 0:  # one record per file, from its first chunk
                yield RawDoc(
                    chunk.ordinal << 32 | ERROR_INDEX,
                    chunk.file_id,
                    0,
                    "",
                    0,
                    _STATUS_REASON[status],
                    detail=f"{status} file {entry.uri}: {detail}",
                )
            return
    progress = _Progress(chunk.start)
    try:
        if entry.format == "parquet":
            yield from _read_parquet(chunk, entry, cfg, progress)
        else:
            yield from _read_lines(chunk, entry, cfg, progress)
    except (OSError, ValueError, EOFError) as exc:
        if not progress.opened and chunk.start > 0:
            return  # the chunk at byte 0 of the same file reports it
        reason, what = _failure(exc, entry)
        unit = "row" if entry.format == "parquet" else "byte"
        yield RawDoc(
            chunk.ordinal << 32 | ERROR_INDEX,
            chunk.file_id,
            progress.position,
            "",
            0,
            reason,
            detail=f"{what} at {unit} {progress.position} of {entry.uri}: {type(exc).__name__}: {exc}",
        )
