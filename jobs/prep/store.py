"""A run's work directory: a local directory or an object-store prefix (s3://, file://) where preprocessing
commits each finished block of work, so that a killed run resumes where it stopped.

Every file appears whole or not at all: locally it is written under a temporary name and renamed; on an object
store a single PUT (or a completed multipart upload) publishes it. `exists(rel)` is therefore the test of "this
block is done". Nothing here imports Ray: the block functions in `jobs.prep.blocks` run inside Ray tasks and
open the store from its root string.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from jobs.prep.sources import filesystem, is_uri, join_uri


class Store:
    """Files under one root, addressed by relative paths such as `clean/000003.parquet`."""

    def __init__(self, root: str):
        self.root = root if is_uri(root) else str(Path(root).expanduser().resolve())
        self.remote = is_uri(root)
        self.fs, self.base = filesystem(self.root)

    def uri(self, rel: str) -> str:
        return join_uri(self.root, rel)

    def _path(self, rel: str) -> str:
        return f"{self.base.rstrip('/')}/{rel}"

    def local_path(self, rel: str) -> Path:
        if self.remote:
            raise RuntimeError(f"{self.root} is not a local directory")
        return Path(self._path(rel))

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self._path(rel)).type == pafs.FileType.File

    def size(self, rel: str) -> int:
        """Bytes of the file at `rel` (FileNotFoundError when it is missing)."""
        info = self.fs.get_file_info(self._path(rel))
        if info.type != pafs.FileType.File:
            raise FileNotFoundError(self.uri(rel))
        return int(info.size)

    def list(self, rel_dir: str) -> list[str]:
        """Names of the files directly under `rel_dir` (sorted); [] when it does not exist."""
        sel = pafs.FileSelector(self._path(rel_dir), allow_not_found=True)
        return sorted(i.base_name for i in self.fs.get_file_info(sel) if i.type == pafs.FileType.File)

    @contextlib.contextmanager
    def writing(self, rel: str) -> Iterator[Path]:
        """Yield a local temporary path to write; on success it becomes `rel` in one step."""
        name = rel.rsplit("/", 1)[-1]
        if not self.remote:
            final = self.local_path(rel)
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = final.parent / f".{name}.tmp-{uuid.uuid4().hex[:8]}"
            try:
                yield tmp
                os.replace(tmp, final)
            finally:
                tmp.unlink(missing_ok=True)
            return
        with tempfile.TemporaryDirectory(prefix="tulpar-store-") as d:
            tmp = Path(d) / name
            yield tmp
            self.upload(tmp, rel)

    def upload(self, local: Path, rel: str) -> None:
        """Copy a local file to `rel` (for a local store: move it, atomically)."""
        if not self.remote:
            final = self.local_path(rel)
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
            shutil.copyfile(local, tmp)
            os.replace(tmp, final)
            return
        path = self._path(rel)
        self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with open(local, "rb") as src, self.fs.open_output_stream(path) as dst:
            shutil.copyfileobj(src, dst, 1 << 22)

    def write_bytes(self, rel: str, data: bytes) -> None:
        with self.writing(rel) as tmp:
            tmp.write_bytes(data)

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_file(self._path(rel)) as f:
            return f.read()

    def write_table(self, rel: str, table: pa.Table, row_group_size: int = 65536) -> None:
        with self.writing(rel) as tmp:
            pq.write_table(table, tmp, row_group_size=row_group_size, compression="zstd")

    def read_table(self, rel: str, columns: list[str] | None = None, filters=None) -> pa.Table:
        if filters is None:
            with self.fs.open_input_file(self._path(rel)) as f:
                return pq.read_table(f, columns=columns)
        return pq.read_table(self._path(rel), columns=columns, filters=filters, filesystem=self.fs)

    def parquet_rows(self, rel: str) -> int:
        with self.fs.open_input_file(self._path(rel)) as f:
            return pq.ParquetFile(f).metadata.num_rows

    def read_into(self, rel: str, buf: io.BufferedIOBase) -> None:
        with self.fs.open_input_stream(self._path(rel)) as f:
            shutil.copyfileobj(f, buf, 1 << 22)

    def remove(self) -> None:
        """Delete the whole root (best effort for object stores)."""
        if not self.remote:
            shutil.rmtree(self.root, ignore_errors=True)
            return
        with contextlib.suppress(FileNotFoundError, OSError):
            self.fs.delete_dir(self.base)
