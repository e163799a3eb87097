"""Exclusive use of a directory by one job at a time: a `.lock` file holding an advisory lock (flock) and its
holder's pid, host and start time.

The kernel drops the lock when its process exits, however it exits (a crash, SIGKILL, a lost node's reboot), so a
lock is never stale and nothing has to be cleaned up. A job takes the lock before it starts work and keeps it until
`run_job` returns (`release_all`); taking a lock this process already holds is a no-op. A second job finds the lock
held and fails at once with a user error naming the directory and the holder. flock is exact for processes on one
machine and for local filesystems; on network filesystems it depends on the server (NFSv4 supports it).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

LOCK_FILE = ".lock"
_HELD: dict[Path, int] = {}  # directory -> the open descriptor that holds its lock


class DirectoryBusy(ValueError):
    """Another process holds the directory's lock (a user error: wait for it, or use another directory)."""


def hold(directory: Path, what: str, fix: str) -> None:
    """Take `directory`'s lock for this process, or raise DirectoryBusy("<what> <directory> is in use by ...:
    <fix>")."""
    key = directory.resolve()
    if key in _HELD:
        return
    key.mkdir(parents=True, exist_ok=True)
    fd = os.open(key / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _describe(os.pread(fd, 4096, 0))
        os.close(fd)
        raise DirectoryBusy(f"{what} {directory} is in use by {holder}: {fix}") from None
    except BaseException:
        os.close(fd)
        raise
    record = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    _HELD[key] = fd


def _describe(raw: bytes) -> str:
    try:
        rec = json.loads(raw.decode("utf-8"))
        return f"process {rec['pid']} on {rec['host']} (since {rec['since']})"
    except (ValueError, KeyError, TypeError):  # the holder has not written its record yet
        return "another process"


def release(directory: Path) -> None:
    fd = _HELD.pop(directory.resolve(), None)
    if fd is not None:
        os.close(fd)  # closing the only descriptor drops the flock


def release_all() -> None:
    for directory in list(_HELD):
        release(directory)
