"""Atomic file and directory writes: readers see the old content or the new, never a half-written one.

A directory is written to a temporary directory beside its final place, its files fsynced, then renamed over the
old one. When the disk is full (ENOSPC, EDQUOT) the temporary directory is removed, the previous directory stays
as it was, and the error (`StorageFullError`) names the path, the space the write needed and the space free.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class StorageFullError(OSError, ValueError):
    """No space left to write `path`: an OSError (errno ENOSPC/EDQUOT) that is also a user error (a ValueError:
    the CLI prints it and exits 2), since only freeing space or choosing another place fixes it."""


def storage_full_error(
    path: Path, needed_bytes: int | None, cause: OSError | None = None
) -> StorageFullError:
    where = path.parent if path.parent.exists() else Path(path.anchor or ".")
    try:
        free = f"{shutil.disk_usage(where).free / 1e6:,.1f} MB free"
    except OSError:
        free = "free space unknown"
    need = f"about {needed_bytes / 1e6:,.1f} MB needed" if needed_bytes is not None else "size unknown"
    reason = f" ({cause.strerror})" if cause is not None and cause.strerror else ""
    return StorageFullError(
        cause.errno if cause is not None else errno.ENOSPC,
        f"no space left to write {path}{reason}: {need}, {free} on {where}; the previous {path.name} is "
        "unchanged. Free space there, or point TULPAR_HOME / TULPAR_STORAGE at a larger disk",
    )


def fsync_tree(root: Path) -> None:
    """fsync every file under `root` and the directories themselves, so a rename publishes durable data."""
    for item in sorted(root.rglob("*"), reverse=True):
        if item.is_file() and not item.is_symlink():
            with open(item, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(root)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | Path, merge: bool = False, expected_bytes: int | None = None) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; on success its files are fsynced and it replaces `path` in one
    rename.

    With merge=True the files written are moved one by one (each atomically) into an existing `path`, keeping
    its other files. On an exception the temporary directory is removed and `path` is untouched. A full disk
    raises StorageFullError naming `path` and `expected_bytes` (the caller's estimate of what it writes), before
    anything is written when the disk already has less free space than that.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if expected_bytes is not None and shutil.disk_usage(path.parent).free < expected_bytes:
        raise storage_full_error(path, expected_bytes)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        yield tmp
        fsync_tree(tmp)
        if merge and path.is_dir():
            for item in tmp.iterdir():
                target = path / item.name
                if item.is_dir() and target.exists():
                    shutil.rmtree(target)
                os.replace(item, target)
            tmp.rmdir()
        else:
            replace_dir(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        if exc.errno in DISK_FULL_ERRNOS and not isinstance(exc, StorageFullError):
            raise storage_full_error(path, expected_bytes, exc) from exc
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a (nested) state dict: the estimate of what saving it writes."""
    if hasattr(obj, "element_size") and hasattr(obj, "nelement"):
        return obj.element_size() * obj.nelement()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def replace_dir(src: str | Path, path: str | Path) -> None:
    """Put directory `src` at `path` (same filesystem): the old `path`, if any, is renamed aside first and put
    back if the swap fails, so readers find the old directory or the new one."""
    src, path = Path(src), Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        os.replace(src, path)
        return
    old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(path, old)
    try:
        os.replace(src, path)
    except BaseException:
        os.replace(old, path)  # put the previous one back
        raise
    shutil.rmtree(old, ignore_errors=True)
