"""Reading raw text documents from .txt / .jsonl files (optionally gzip-compressed), and language sampling."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from llm_core.data import DataError

TEXT_SUFFIXES = (".txt", ".jsonl", ".txt.gz", ".jsonl.gz")


def _open(path: Path) -> io.TextIOBase:
    if path.name.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return path.open(encoding="utf-8")


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) for each non-empty line of a .jsonl(.gz) file; a malformed line is a
    DataError naming the file and line."""
    path = Path(path)
    with _open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{path}:{lineno} is not valid JSON ({exc.msg}): fix or remove that line"
                ) from None


TxtMode = Literal["line", "blank_line", "paragraph", "auto"]


def detect_txt_mode(path: str | Path, max_lines: int = 5000) -> Literal["line", "paragraph"]:
    """`paragraph` for hard-wrapped prose (blank lines between paragraphs, every line broken at a fixed width,
    as in Project Gutenberg books), otherwise `line` (a document or sentence per line)."""
    lengths: list[int] = []
    blank = 0
    with _open(Path(path)) as f:
        for i, line in enumerate(f):
            if i >= max_lines:
                break
            text = line.rstrip("\r\n")
            if text.strip():
                lengths.append(len(text))
            else:
                blank += 1
    if len(lengths) < 20 or blank < 0.02 * (len(lengths) + blank):
        return "line"
    lengths.sort()
    p95 = lengths[int(0.95 * (len(lengths) - 1))]
    wrapped = sum(1 for n in lengths if n > 100) <= 0.01 * len(lengths) and p95 <= 80
    # paragraphs of several wrapped lines, not a list of short one-line documents with blank lines between
    return "paragraph" if wrapped and len(lengths) >= 1.5 * blank else "line"


def iter_documents(
    path: str | Path, *, text_field: str = "text", txt_mode: TxtMode = "line"
) -> Iterator[str]:
    """Documents of one file: the `text_field` of .jsonl; for .txt by `txt_mode`: a line (`line`), a
    blank-line-separated block with its line breaks (`blank_line`), a blank-line-separated block with its hard
    line wraps joined by spaces (`paragraph`, for hard-wrapped prose), or `auto` (`detect_txt_mode`)."""
    path = Path(path)
    name = path.name.removesuffix(".gz")
    if txt_mode == "auto" and not name.endswith(".jsonl"):
        txt_mode = detect_txt_mode(path)
    if txt_mode not in ("line", "blank_line", "paragraph", "auto"):
        raise ValueError(f"txt_mode {txt_mode!r} is not one of line, blank_line, paragraph, auto")
    if name.endswith(".jsonl"):
        for lineno, rec in iter_jsonl(path):
            text = rec.get(text_field) if isinstance(rec, dict) else None
            if not isinstance(text, str):
                raise DataError(f"{path}:{lineno} has no string field {text_field!r}: set text_field")
            yield text
        return
    with _open(path) as f:
        if txt_mode == "line":
            for line in f:
                if line.strip():
                    yield line.rstrip("\n")
        else:
            sep = "\n" if txt_mode == "blank_line" else " "
            block: list[str] = []
            for line in f:
                if line.strip():
                    block.append(line.rstrip("\n") if sep == "\n" else line.strip())
                elif block:
                    yield sep.join(block)
                    block = []
            if block:
                yield sep.join(block)


def text_files(directory: str | Path) -> list[Path]:
    d = Path(directory)
    if not d.is_dir():
        raise ValueError(f"text directory {str(d)!r} not found: check TULPAR_DATA or the configured path")
    files = sorted(p for p in d.rglob("*") if p.is_file() and p.name.endswith(TEXT_SUFFIXES))
    if not files:
        raise ValueError(f"no {'/'.join(TEXT_SUFFIXES)} files under {str(d)!r}")
    return files


def sample_language(directory: str | Path, max_chars: int, min_chars: int = 1) -> list[str]:
    """Documents from every file of a language directory, round-robin across files so that each source is
    represented, until `max_chars` characters are collected."""
    iters = [iter_documents(p) for p in text_files(directory)]
    docs: list[str] = []
    total = 0
    while iters and total < max_chars:
        for it in list(iters):
            doc = next(it, None)
            if doc is None:
                iters.remove(it)
                continue
            if len(doc) < min_chars:
                continue
            docs.append(doc)
            total += len(doc)
            if total >= max_chars:
                break
    return docs


def is_validation(text: str, val_fraction: float) -> bool:
    """Deterministic document-level split by content hash (stable across runs and machines)."""
    h = int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:8], "big")
    return (h % 1_000_000) < val_fraction * 1_000_000
