"""Tokenized dataset shards: the format `jobs.preprocess` writes and training reads.

A dataset directory (`$TULPAR_HOME/datasets/<name>/`, or any path under TULPAR_STORAGE) holds::

    manifest.json   what is in the shards, how it was made (config, input and tokenizer hashes), counts
    shards/         <split>-<lang>-<index:05d>.bin        flat token ids, little-endian uint16/uint32
                    <split>-<lang>-<index:05d>.docs.npy   int64 cumulative document end offsets
    report.md, report.json, result.json

Each shard holds ONE split ("train" or "val") of ONE language. Documents follow each other, each one's tokens
followed by the tokenizer's eos id, so document i of a shard is `tokens[ends[i-1]:ends[i]]` (with ends[-1] = 0)
and ends with eos. `num_bytes` of a shard is the UTF-8 size of the text of its documents, so
`bytes_per_token` turns a loss in nats/token into bits per byte.

This module has no Ray imports: a training worker, a notebook or a test read datasets with `TokenDataset`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from llm_core.data import DataError, TokenStream, token_dtype
from llm_core.io import atomic_write_bytes

FORMAT_VERSION = 1
SPLITS = ("train", "val")
MANIFEST = "manifest.json"
SHARD_DIR = "shards"
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
_REQUIRED_KEYS = (
    "format_version",
    "name",
    "created",
    "config",
    "config_sha256",
    "input_sha256",
    "tokenizer",
    "dtype",
    "languages",
    "counts",
    "shards",
    "mixture",
)


def dtype_name(vocab_size: int) -> str:
    """The shard dtype name: uint16 when every id fits in 16 bits (vocab_size <= 65536), else uint32."""
    return token_dtype(vocab_size).name


def shard_stem(split: str, language: str, index: int, part: int | None = None) -> str:
    """File name stem of a shard: `<split>-<lang>-<index:05d>`, or `<split>-<lang>-<index:05d>-<part:03d>` when
    one unit of work (a preprocessing block) writes several shards of the same split and language."""
    stem = f"{split}-{language}-{index:05d}"
    return stem if part is None else f"{stem}-{part:03d}"


@dataclass(frozen=True)
class ShardInfo:
    """One manifest `shards` entry; paths are relative to the dataset directory."""

    path: str
    docs_path: str
    split: str
    language: str
    num_tokens: int
    num_documents: int
    num_bytes: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_SHARD_KEYS = tuple(f.name for f in fields(ShardInfo))  # what a manifest's shard entry must hold


class ShardWriter:
    """Writes one shard, streaming tokens to disk; `close()` publishes `.bin` and `.docs.npy` atomically.

    >>> w = ShardWriter(dataset_dir, "train", "kk", 0, dtype="uint16", eos_id=0)
    >>> w.add_document([5, 6, 7], num_bytes=12)   # written as 5 6 7 <eos>
    >>> info = w.close()

    Until `close()` succeeds nothing appears under the final names; `abort()` (or an exception inside a
    `with` block) removes the partial file.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        language: str,
        index: int,
        *,
        dtype: str,
        eos_id: int,
        vocab_size: int | None = None,
        part: int | None = None,
    ):
        if split not in SPLITS:
            raise ValueError(f"shard split {split!r} must be one of {SPLITS}")
        if dtype not in DTYPES:
            raise ValueError(f"shard dtype {dtype!r} must be one of {sorted(DTYPES)}")
        self.root = Path(root)
        self.split, self.language, self.index = split, language, index
        self.dtype = DTYPES[dtype]
        self.eos_id = int(eos_id)
        self.limit = int(vocab_size) if vocab_size is not None else int(np.iinfo(self.dtype).max) + 1
        if not 0 <= self.eos_id < self.limit:
            raise ValueError(f"eos id {eos_id} does not fit dtype {dtype} / vocab_size {self.limit}")
        stem = shard_stem(split, language, index, part)
        self.rel_bin = f"{SHARD_DIR}/{stem}.bin"
        self.rel_docs = f"{SHARD_DIR}/{stem}.docs.npy"
        (self.root / SHARD_DIR).mkdir(parents=True, exist_ok=True)
        fd, self._tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=".tmp", dir=self.root / SHARD_DIR)
        self._f = os.fdopen(fd, "wb")
        self._sha = hashlib.sha256()
        self._ends: list[int] = []
        self.num_tokens = 0
        self.num_bytes = 0
        self._closed = False

    def add_document(self, ids: Iterable[int] | np.ndarray, num_bytes: int) -> None:
        """Append one document: its token ids (without eos; eos is appended here) and its UTF-8 size."""
        arr = np.asarray(ids, dtype=np.int64)
        if arr.ndim != 1:
            raise ValueError(f"document token ids must be 1-D, got shape {arr.shape}")
        if arr.size and (arr.min() < 0 or arr.max() >= self.limit):
            raise DataError(
                f"token ids outside [0, {self.limit}) in shard {self.rel_bin}: wrong tokenizer or dtype"
            )
        self._write(np.append(arr, self.eos_id).astype(self.dtype), num_bytes)

    def add_tokens_with_eos(self, tokens: np.ndarray, num_bytes: int) -> None:
        """Append one document whose token array already ends with eos (checked)."""
        if tokens.size == 0 or int(tokens[-1]) != self.eos_id:
            raise ValueError(f"document for {self.rel_bin} does not end with eos id {self.eos_id}")
        self._write(np.asarray(tokens).astype(self.dtype, copy=False), num_bytes)

    def _write(self, toks: np.ndarray, num_bytes: int) -> None:
        data = np.ascontiguousarray(toks).tobytes()
        self._f.write(data)
        self._sha.update(data)
        self.num_tokens += int(toks.size)
        self.num_bytes += int(num_bytes)
        self._ends.append(self.num_tokens)

    def close(self) -> ShardInfo:
        """Flush, publish both files atomically and return the manifest entry."""
        if self._closed:
            raise RuntimeError("shard already closed")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        buf = io.BytesIO()
        np.save(buf, np.asarray(self._ends, dtype=np.int64))
        atomic_write_bytes(self.root / self.rel_docs, buf.getvalue())
        os.replace(self._tmp, self.root / self.rel_bin)
        self._closed = True
        return ShardInfo(
            path=self.rel_bin,
            docs_path=self.rel_docs,
            split=self.split,
            language=self.language,
            num_tokens=self.num_tokens,
            num_documents=len(self._ends),
            num_bytes=self.num_bytes,
            sha256=self._sha.hexdigest(),
        )

    def abort(self) -> None:
        if not self._closed:
            self._f.close()
            Path(self._tmp).unlink(missing_ok=True)
            self._closed = True

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def write_shard(
    root: str | Path,
    split: str,
    language: str,
    index: int,
    documents: Iterable[tuple[Iterable[int] | np.ndarray, int]],
    *,
    dtype: str,
    eos_id: int,
    vocab_size: int | None = None,
) -> ShardInfo:
    """Write one shard from (token ids without eos, utf-8 byte count) pairs; returns its manifest entry."""
    with ShardWriter(root, split, language, index, dtype=dtype, eos_id=eos_id, vocab_size=vocab_size) as w:
        for ids, nbytes in documents:
            w.add_document(ids, nbytes)
        return w.close()


def build_manifest(
    *,
    name: str,
    created: str,
    config: dict[str, Any],
    config_sha256: str,
    input_sha256: str,
    tokenizer: dict[str, Any],
    languages: list[str],
    shards: list[ShardInfo | dict[str, Any]],
    mixture: dict[str, Any],
) -> dict[str, Any]:
    """The manifest dict (format_version 1) with `counts` summed from the shard entries; validated."""
    entries = [s.to_dict() if isinstance(s, ShardInfo) else dict(s) for s in shards]
    entries.sort(key=lambda s: (SPLITS.index(s["split"]), languages.index(s["language"]), s["path"]))
    counts = {
        split: {lang: {"documents": 0, "tokens": 0, "bytes": 0} for lang in languages} for split in SPLITS
    }
    for s in entries:
        c = counts[s["split"]][s["language"]]
        c["documents"] += int(s["num_documents"])
        c["tokens"] += int(s["num_tokens"])
        c["bytes"] += int(s["num_bytes"])
    manifest = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "created": created,
        "config": config,
        "config_sha256": config_sha256,
        "input_sha256": input_sha256,
        "tokenizer": tokenizer,
        "dtype": dtype_name(int(tokenizer["vocab_size"])),
        "languages": list(languages),
        "counts": counts,
        "shards": entries,
        "mixture": mixture,
    }
    return validate_manifest(manifest, "new manifest")


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- reading


def _manifest_path(path: str | Path) -> Path:
    p = Path(path)
    return p / MANIFEST if p.is_dir() or p.suffix != ".json" else p


def validate_manifest(m: Any, where: str = "manifest.json") -> dict[str, Any]:
    """Check the manifest's structure; raise DataError naming the first problem."""
    if not isinstance(m, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(m).__name__}: re-run preprocessing")
    missing = [k for k in _REQUIRED_KEYS if k not in m]
    if missing:
        raise DataError(f"{where}: missing keys {missing}: the dataset is incomplete, re-run preprocessing")
    if m["format_version"] != FORMAT_VERSION:
        raise DataError(
            f"{where}: format_version {m['format_version']!r} is not supported (this code reads "
            f"{FORMAT_VERSION}): re-run preprocessing with this version of Tulpar"
        )
    if m["dtype"] not in DTYPES:
        raise DataError(f"{where}: dtype {m['dtype']!r} must be one of {sorted(DTYPES)}")
    tok = m["tokenizer"]
    if not isinstance(tok, dict) or any(k not in tok for k in ("path", "sha256", "vocab_size", "eos_id")):
        raise DataError(f"{where}: tokenizer must have path, sha256, vocab_size and eos_id")
    if m["dtype"] != dtype_name(int(tok["vocab_size"])):
        raise DataError(f"{where}: dtype {m['dtype']} does not match vocab_size {tok['vocab_size']}")
    if not isinstance(m["shards"], list):
        raise DataError(f"{where}: shards must be a list")
    for i, s in enumerate(m["shards"]):
        if not isinstance(s, dict) or any(k not in s for k in _SHARD_KEYS):
            raise DataError(f"{where}: shards[{i}] lacks one of {list(_SHARD_KEYS)}")
        if s["split"] not in SPLITS:
            raise DataError(f"{where}: shards[{i}].split {s['split']!r} must be one of {SPLITS}")
        if s["language"] not in m["languages"]:
            raise DataError(f"{where}: shards[{i}].language {s['language']!r} is not in languages")
    return m


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The validated manifest of a dataset directory (or of a manifest.json path)."""
    mp = _manifest_path(path)
    if not mp.is_file():
        raise DataError(
            f"no dataset manifest at {str(mp)!r}: run `make preprocess CONFIG=<name>` (python -m "
            "jobs.preprocess) first, or point at the dataset directory that holds manifest.json"
        )
    try:
        m = json.loads(mp.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(
            f"{mp} is corrupt ({exc}): delete the dataset directory and re-run preprocessing"
        ) from None
    return validate_manifest(m, str(mp))


class TokenDataset:
    """Read access to a preprocessed dataset: token streams per split and language, documents, bytes/token.

    >>> ds = TokenDataset.open(".tulpar/datasets/tiny")
    >>> train = ds.tokens("train")            # all languages, in manifest order: a TokenStream over the shards
    >>> window = train[1000:2025]             # reads these tokens only (ndarray), across shard boundaries
    >>> ds.num_tokens("train")                # from the manifest
    >>> bpb = loss_nats / math.log(2) / ds.bytes_per_token("val", "kk")
    """

    def __init__(self, root: Path, manifest: dict[str, Any]):
        self.root = root
        self.manifest = manifest
        self.dtype = DTYPES[manifest["dtype"]]

    @classmethod
    def open(cls, path: str | Path, verify: bool = False) -> TokenDataset:
        """Open a dataset directory; check that every shard file exists with the size the manifest says.
        verify=True also checks each shard's sha256 and its document offsets."""
        mp = _manifest_path(path)
        ds = cls(mp.parent, read_manifest(mp))
        for s in ds.manifest["shards"]:
            ds._check_shard(s, verify)
        return ds

    def _check_shard(self, s: dict[str, Any], verify: bool) -> None:
        p = self.root / s["path"]
        if not p.is_file():
            raise DataError(f"shard {p} listed in the manifest is missing: re-run preprocessing")
        expected = int(s["num_tokens"]) * self.dtype.itemsize
        if p.stat().st_size != expected:
            raise DataError(
                f"shard {p} has {p.stat().st_size} bytes, manifest says {expected}: re-run preprocessing"
            )
        if not (self.root / s["docs_path"]).is_file():
            raise DataError(f"document index {self.root / s['docs_path']} is missing: re-run preprocessing")
        if verify:
            digest = file_sha256(p)
            if digest != s["sha256"]:
                raise DataError(f"shard {p} is corrupt: sha256 {digest} != manifest {s['sha256']}")
            ends = self._ends(s)
            ok = len(ends) == int(s["num_documents"]) and (
                len(ends) == 0 or int(ends[-1]) == int(s["num_tokens"])
            )
            if not ok or (len(ends) > 1 and np.any(np.diff(ends) <= 0)):
                raise DataError(f"document index {s['docs_path']} does not match shard {s['path']}")

    # ------------------------------------------------------------------ metadata
    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def tokenizer_sha256(self) -> str:
        return self.manifest["tokenizer"]["sha256"]

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["tokenizer"]["vocab_size"])

    @property
    def eos_id(self) -> int:
        return int(self.manifest["tokenizer"]["eos_id"])

    @property
    def languages(self) -> list[str]:
        return list(self.manifest["languages"])

    @property
    def counts(self) -> dict[str, dict[str, dict[str, int]]]:
        return self.manifest["counts"]

    def shards(self, split: str, language: str | None = None) -> list[dict[str, Any]]:
        """Manifest entries of one split (and language), languages in manifest order, then shard index."""
        if split not in SPLITS:
            raise ValueError(f"split {split!r} must be one of {SPLITS}")
        if language is not None and language not in self.languages:
            raise ValueError(f"language {language!r} is not in this dataset: choose one of {self.languages}")
        langs = [language] if language is not None else self.languages
        chosen = [s for s in self.manifest["shards"] if s["split"] == split and s["language"] in langs]
        return sorted(chosen, key=lambda s: (langs.index(s["language"]), s["path"]))

    def num_tokens(self, split: str, language: str | None = None) -> int:
        """Tokens of a split (and language), summed from the manifest: no shard is read."""
        return sum(int(s["num_tokens"]) for s in self.shards(split, language))

    # ------------------------------------------------------------------ data
    def _memmap(self, s: dict[str, Any]) -> np.ndarray:
        if int(s["num_tokens"]) == 0:
            return np.zeros(0, dtype=self.dtype)
        return np.memmap(self.root / s["path"], dtype=self.dtype, mode="r")

    def _ends(self, s: dict[str, Any]) -> np.ndarray:
        return np.load(self.root / s["docs_path"], allow_pickle=False)

    def tokens(self, split: str, language: str | None = None) -> TokenStream:
        """All tokens of a split (one language, or all languages in manifest order, each language's shards in
        index order) as one `TokenStream` over the shard files: its length comes from the manifest and
        `stream[a:b]` reads only those tokens, across shard boundaries, so nothing is loaded into memory whatever
        the dataset's size. For a count alone, `num_tokens()` reads nothing at all."""
        return TokenStream(
            [(self.root / s["path"], int(s["num_tokens"])) for s in self.shards(split, language)], self.dtype
        )

    def documents(self, split: str, language: str | None = None) -> Iterator[np.ndarray]:
        """Each document's tokens (ending with eos), in shard order."""
        for s in self.shards(split, language):
            toks, start = self._memmap(s), 0
            for end in self._ends(s).tolist():
                yield toks[start:end]
                start = end

    def num_documents(self, split: str, language: str | None = None) -> int:
        return sum(int(s["num_documents"]) for s in self.shards(split, language))

    def bytes_per_token(self, split: str, language: str | None = None) -> float:
        """UTF-8 bytes of text per token (eos included in the token count) over the chosen shards."""
        chosen = self.shards(split, language)
        n_tok = sum(int(s["num_tokens"]) for s in chosen)
        if n_tok == 0:
            raise DataError(
                f"no {split} tokens{f' for {language}' if language else ''} in dataset {self.name}"
            )
        return sum(int(s["num_bytes"]) for s in chosen) / n_tok

    def __repr__(self) -> str:
        return f"TokenDataset({str(self.root)!r}, languages={self.languages}, dtype={self.dtype.name})"
