"""Data at scale (issue 15): one entry point for the measurements in benchmarks/datascale/.

    python benchmarks/data_scale.py corpus --size-gb 0.5 --out /tmp/corpus-0.5gb     # planted duplicates
    python benchmarks/data_scale.py preprocess --corpus /tmp/corpus-0.5gb --tokenizer DIR --workers 1,2
    python benchmarks/data_scale.py stages                 # per-stage MB/s vs tokenizer alone, one process
    python benchmarks/data_scale.py sampler                # 2B-token dataset: first batch latency, worker RSS
    python benchmarks/data_scale.py datatrove --corpus DIR --tokenizer DIR   # the peer, side by side
    python benchmarks/data_scale.py dedup-diff --config CONFIG --dataset DIR  # vs the sequential dedup

Each prints its table and appends a dated section to docs/benchmarks.md unless told not to.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(1, str(REPO_ROOT / "benchmarks"))

COMMANDS = {
    "corpus": "benchmarks.datascale.corpus",
    "preprocess": "benchmarks.datascale.scale",
    "stages": "benchmarks.datascale.stages",
    "sampler": "benchmarks.datascale.sampler",
    "datatrove": "benchmarks.datascale.datatrove_peer",
    "dedup-diff": "benchmarks.datascale.dedup_diff",
}


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in COMMANDS:
        print(__doc__)
        raise SystemExit(2)
    importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
