"""A job decides whether its output is current; the pipeline only asks.

A stage's output is current when a result stored under the same key exists and everything it points at is still
there. The key is the job's own identity of the work:

- the resolved config (presets included, after the job derived what it derives, e.g. the vocabulary),
- the hashes of its inputs (corpus files, the tokenizer, the dataset manifest, the parent model version),
- the code version: the sha256 of every Python source file of `llm_core` and `jobs`.

So editing a model preset changes pretraining's resolved config, which gives a new model version, which changes
the parent of SFT, and so on: exactly the affected stages run again. `--rerun` (or TULPAR_RERUN=1) ignores a stored
result. Results are stored in $TULPAR_HOME/cache/<stage>/<key>.json, written atomically after the job succeeded.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jobs.platform.results import ResultError, StageResult, parse_result
from jobs.platform.runtime import REPO_ROOT, JobResult, Settings
from llm_core.io import atomic_write_json
from llm_core.shards import file_sha256

log = logging.getLogger("tulpar.cache")

CODE_PACKAGES = ("llm_core", "jobs")


@functools.cache
def code_sha256() -> str:
    """The code version: sha256 over the relative path and content of every .py file of llm_core and jobs."""
    h = hashlib.sha256()
    for package in CODE_PACKAGES:
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            h.update(str(path.relative_to(REPO_ROOT)).encode())
            h.update(b"\0")
            h.update(path.read_bytes())
            h.update(b"\0")
    return h.hexdigest()


def files_sha256(paths: list[Path]) -> str:
    """One hash over several input files (relative order fixed by sorting, content hashed)."""
    h = hashlib.sha256()
    for p in sorted(Path(x) for x in paths):
        h.update(str(p).encode())
        h.update(file_sha256(p).encode())
    return h.hexdigest()


def stat_fingerprint(root: Path) -> list[tuple[str, int, int]]:
    """(relative path, size, modification time in ns) of a file or of every file under a directory: a cheap
    identity for large inputs, as make uses (a missing path gives an empty list, which the job then reports)."""
    if root.is_file():
        st = root.stat()
        return [(root.name, st.st_size, st.st_mtime_ns)]
    if not root.is_dir():
        return []
    out = []
    for p in sorted(root.rglob("*")):
        if p.is_file():
            st = p.stat()
            out.append((str(p.relative_to(root)), st.st_size, st.st_mtime_ns))
    return out


def cache_key(stage: str, identity: dict[str, Any]) -> str:
    blob = json.dumps(
        {"stage": stage, "identity": identity, "code": code_sha256()},
        sort_keys=True,
        separators=(",", ":"),
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


class StageCache:
    """The stored result of one stage for one identity (see the module docstring)."""

    def __init__(self, settings: Settings, stage: str, identity: dict[str, Any]):
        self.settings, self.stage = settings, stage
        self.key = cache_key(stage, identity)
        self.path = settings.home / "cache" / stage / f"{self.key}.json"

    def lookup(self, still_there: Callable[[StageResult], bool] | None = None) -> JobResult | None:
        """The stored result when it is current, else None (also with --rerun). `still_there` checks what the
        result points at outside the file system (e.g. the registered model version)."""
        if self.settings.rerun or not self.path.is_file():
            return None
        try:
            stored = parse_result(self.stage, json.loads(self.path.read_text(encoding="utf-8")))
        except (ValueError, ResultError) as exc:  # a result from an older contract: redo the work
            log.warning("ignoring the stored %s result %s: %s", self.stage, self.path, exc)
            return None
        missing = [p for p in _local_paths(stored.outputs.model_dump()) if not Path(p).exists()]
        if missing:
            log.info("stored %s result %s is stale: %s is gone", self.stage, self.key[:12], missing[0])
            return None
        if still_there is not None and not still_there(stored):
            return None
        log.info("%s output is current (key %s): reusing it", self.stage, self.key[:12])
        return JobResult(
            self.stage,
            outputs=stored.outputs,
            metrics=stored.metrics,
            mlflow_run_id=stored.mlflow_run_id,
            cache_key=self.key,
            reused=True,
        )

    def store(self, result: JobResult) -> JobResult:
        result.cache_key = self.key
        atomic_write_json(self.path, result.to_dict())
        return result


def model_version_still_registered(settings: Settings) -> Callable[[StageResult], bool]:
    """For `StageCache.lookup`: a stored training result is current only while its model version is still in the
    registry. An unreachable registry is an error, not "gone" (fail closed: never silently retrain or reuse)."""

    def check(stored: StageResult) -> bool:
        uri = getattr(stored.outputs, "model_uri", None)
        if uri is None:
            return True
        from jobs.platform.registry import NoSuchVersion, resolve

        try:
            resolve(uri, settings)
        except NoSuchVersion:
            log.info("stored result names %s, which is no longer registered: running again", uri)
            return False
        return True

    return check


_PATH_FIELDS = ("tokenizer_dir", "tokenizer_json", "dataset_dir", "hf_dir", "best_checkpoint", "output_dir")


def _local_paths(outputs: dict[str, Any]) -> list[str]:
    """The local files and directories a result's outputs name (URIs are checked by their stage, if at all)."""
    return [
        v for k, v in outputs.items() if k in _PATH_FIELDS and isinstance(v, str) and v and "://" not in v
    ]
