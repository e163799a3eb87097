"""Driver-side planning cost of many small input files: discover (list + sniff) + plan_chunks + input_sha256, for
a local directory tree and an S3 prefix on a local moto server, with the current jobs.prep.sources and, for
comparison in the same run, the version at a given git commit (`--baseline`, default fb78a74: sequential 8 KiB
sniffs and content hashing by default). The current code runs with its defaults (read.sniff auto: the
driver sniffs local files only) and with read.sniff=driver.

    .venv/bin/python -m benchmarks.source_discovery --files 5000 [--baseline fb78a74] [--no-s3]

Prints one line per (storage, code) with seconds and the storage requests the driver made (moto's log).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from jobs.prep import sources as current
from jobs.prep.config import PreprocessConfig

REPO = Path(__file__).resolve().parent.parent


def load_baseline(commit: str):
    """jobs.prep.sources as it was at `commit`, imported under another name."""
    code = subprocess.run(
        ["git", "show", f"{commit}:jobs/prep/sources.py"],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "sources_baseline.py"
    path.write_text(code)
    spec = importlib.util.spec_from_file_location("sources_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def body(i: int) -> bytes:
    return (json.dumps({"text": f"document {i}: " + "a short line of corpus text " * 8}) + "\n").encode()


def measure(module, uri: str, read: dict) -> tuple[float, int]:
    cfg = PreprocessConfig.model_validate(
        {
            "name": "bench",
            "languages": ["en"],
            "sources": [{"path": uri, "language": "en"}],
            "read": {k: v for k, v in read.items() if k != "input_hash"},
            "tokenizer": {"path": "unused"},
        }
    )
    input_hash = read["input_hash"]
    t0 = time.perf_counter()
    files = module.discover(cfg, Path("/"))
    chunks = module.plan_chunks(files, 8 << 20)
    module.input_sha256(files, input_hash)
    seconds = time.perf_counter() - t0
    assert sum(f.status == "ok" for f in files) == len(chunks)
    return seconds, len(chunks)


def settings(read: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in read.items())


def requests(log: Path, since: int) -> str:
    lines = log.read_text().splitlines()[since:]
    counts = Counter(x.split('"')[1].split()[0] for x in lines if '"' in x)
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=5000)
    ap.add_argument("--baseline", default="fb78a74")
    ap.add_argument("--no-s3", action="store_true")
    args = ap.parse_args(argv)
    baseline = load_baseline(args.baseline)
    runs = [
        ("current", current, {"input_hash": "stat"}),
        ("current", current, {"input_hash": "stat", "sniff": "driver"}),
        (f"{args.baseline}", baseline, {"input_hash": "content"}),
    ]
    work = Path(tempfile.mkdtemp(prefix="source-discovery-"))
    tree = work / "tree"
    for i in range(args.files):
        d = tree / f"part-{i // 500:03d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"shard-{i:06d}.jsonl").write_bytes(body(i))
    for name, module, read in runs:
        seconds, n = measure(module, str(tree), read)
        print(f"local  {name:>8}  {settings(read):<34}  {n} files  {seconds:7.2f} s")
    if args.no_s3:
        return
    import boto3

    from tests import stack

    with stack.s3_server(work) as url:
        os.environ.update(
            AWS_ENDPOINT_URL=url,
            AWS_ACCESS_KEY_ID="bench",
            AWS_SECRET_ACCESS_KEY="bench",
            AWS_DEFAULT_REGION="us-east-1",
            AWS_EC2_METADATA_DISABLED="true",
        )
        client = boto3.client("s3")
        client.create_bucket(Bucket="bench-corpus")
        with ThreadPoolExecutor(16) as pool:
            list(
                pool.map(
                    lambda i: client.put_object(
                        Bucket="bench-corpus", Key=f"many/shard-{i:06d}.jsonl", Body=body(i)
                    ),
                    range(args.files),
                )
            )
        log = work / "s3.log"
        for name, module, read in runs:
            since = len(log.read_text().splitlines())
            seconds, n = measure(module, "s3://bench-corpus/many", read)
            print(
                f"s3     {name:>8}  {settings(read):<34}  {n} files  {seconds:7.2f} s  "
                f"requests: {requests(log, since)}"
            )


if __name__ == "__main__":
    sys.exit(main())
