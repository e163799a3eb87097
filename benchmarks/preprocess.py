"""Throughput of corpus preprocessing: the Ray Data pipeline (jobs.preprocess) vs a single-process Python loop
doing the same steps (jobs/prep/reference.py), and the pipeline's scaling from 1 to 2 workers.

All variants process the same config (default: the whole shared corpus, configs/preprocess/kk-ru-en.yaml) with
the same tokenizer, trained once beforehand on a raw sample and not timed. MB are the input bytes read
(decompressed). For each variant the script reports wall time and MB/s, MB/s per CPU used (the loop uses one,
the pipeline `num_workers`), and whether the shards are byte-identical to the loop's. The pipeline's wall time is
the whole job after Ray is up: planning, the three Ray passes, driver-side dedup/mixture, and MLflow logging.

    python benchmarks/preprocess.py                         # loop, then the pipeline with 1 and 2 workers
    python benchmarks/preprocess.py --config configs/preprocess/tiny.yaml --no-append

Results are printed and appended as a dated section to docs/benchmarks.md (skip with --no-append).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from machine import BENCHMARKS_DOC, append_section, cpu_model  # noqa: E402  (benchmarks/machine.py, beside this script)

from jobs.platform.configfile import load_config  # noqa: E402
from jobs.platform.runtime import Settings  # noqa: E402
from jobs.prep.config import PreprocessConfig  # noqa: E402
from jobs.prep.reference import run_loop  # noqa: E402
from jobs.preprocess import resolve_tokenizer_path  # noqa: E402
from llm_core.shards import read_manifest  # noqa: E402
from llm_core.text import sample_language  # noqa: E402
from llm_core.tokenizer import Tokenizer, train_bpe  # noqa: E402

DOC = BENCHMARKS_DOC


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/preprocess/kk-ru-en.yaml")
    p.add_argument("--override", action="append", default=[], help="extra config override key=value")
    p.add_argument("--workers", default="1,2", help="comma list of Ray worker counts")
    p.add_argument(
        "--vocab", type=int, default=4096, help="BPE trained for the run when the config trains one"
    )
    p.add_argument("--skip-loop", action="store_true")
    p.add_argument("--no-append", action="store_true", help=f"do not append to {DOC.relative_to(REPO_ROOT)}")
    return p.parse_args(argv)


def cpu_seconds() -> float:
    """User + system CPU time of this process and all its descendants (a local Ray's GCS, raylet and workers
    are children of the driver), so the pipeline's cost is measured even on a machine shared with other jobs."""
    import psutil

    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            total += sum(child.cpu_times()[:2])
    return total


def warm_up(cfg: PreprocessConfig, tokenizer_path: str) -> None:
    """Load what every process loads once (lingua's models, MinHash permutations, character tables, the
    tokenizer), so that neither variant is charged for one-off start-up work."""
    from jobs.prep import clean, dedup, langid

    for text in (
        "Қазақстан — Орталық Азиядағы мемлекет, астанасы Астана қаласы.",
        "Москва — столица России.",
        "Hello world, this is English.",
    ):
        langid.detect(text * 3, cfg.langid)
        clean.normalize_text(text, cfg.normalize)
        clean.quality_verdict(text, cfg.quality)
    dedup.permutations(cfg.dedup.num_perm, cfg.dedup.seed)
    dedup.lsh_params(cfg.dedup.threshold, cfg.dedup.num_perm)
    Tokenizer.from_dir(tokenizer_path).encode("warm up")


def shard_hashes(manifest: dict) -> list[str]:
    return [s["sha256"] for s in manifest["shards"]]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    settings = Settings.from_env()
    tmp = Path(tempfile.mkdtemp(prefix="tulpar-bench-prep-"))
    base = load_config(PreprocessConfig, REPO_ROOT / args.config, args.override)
    try:
        tok_path = str(resolve_tokenizer_path(base.tokenizer.path, settings))
    except ValueError:  # no tokenizer stage output here: train one once, outside the timings
        texts = []
        for lang in base.languages:
            texts += sample_language(settings.require_data("corpus", lang), 1_000_000)
        tok_dir = tmp / "tokenizer"
        train_bpe(texts, args.vocab).save(tok_dir)
        tok_path = str(tok_dir)
    tokenizer = Tokenizer.from_dir(tok_path)

    def cfg_for(name: str, n_workers: int | None) -> PreprocessConfig:
        data = base.model_dump(mode="json")
        data["tokenizer"] = {"path": tok_path, "batch_size": base.tokenizer.batch_size}
        data["output"].update({"dir": str(tmp / name), "reuse": False})
        data["execution"].update({"num_workers": n_workers, "progress_bars": False})
        return PreprocessConfig.model_validate(data)

    load_before = os.getloadavg()
    rows = []
    loop_manifest = None
    mb = None
    if not args.skip_loop:
        warm_up(base, tok_path)
        print("single-process loop ...", flush=True)
        t0, c0 = time.perf_counter(), cpu_seconds()
        res = run_loop(cfg_for("loop", 1), settings.data, tokenizer, tmp / "loop")
        wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
        mb = res.bytes_in / 1e6
        loop_manifest = res.manifest
        timings = {k: round(v, 2) for k, v in res.timings.items()}
        rows.append(
            {"variant": "Python loop (1 process)", "cpus": 1, "wall": wall, "cpu": cpu, "mb": mb}
            | {"same": "reference", "timings": timings}
        )
        print(f"  {wall:.1f} s, {cpu:.1f} CPU s, {mb / wall:.3f} MB/s, timings {timings}", flush=True)

    import ray

    from jobs.preprocess import main as run_job_main

    t0 = time.perf_counter()
    if not ray.is_initialized():
        ray.init(num_cpus=max(workers), include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    ray_start = time.perf_counter() - t0
    warm = ray.remote(num_cpus=1)(warm_up)  # every worker process, before timing
    ray.get([warm.remote(base, tok_path) for _ in range(4 * max(workers))])
    os.environ["TULPAR_HOME"] = str(tmp / "home")
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    settings = Settings.from_env()
    for n in workers:
        print(f"Ray Data pipeline, {n} worker(s) ...", flush=True)
        cfg = cfg_for(f"ray-{n}", n)
        t0, c0 = time.perf_counter(), cpu_seconds()
        result = run_job_main(cfg, settings)
        wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
        out = Path(result.outputs["dataset_dir"])
        rep = json.loads((out / "report.json").read_text())
        mb_in = rep["totals"]["bytes_in"] / 1e6
        mb = mb or mb_in
        same = (
            "n/a"
            if loop_manifest is None
            else ("yes" if shard_hashes(read_manifest(out)) == shard_hashes(loop_manifest) else "NO")
        )
        rows.append(
            {
                "variant": "Ray Data pipeline",
                "cpus": n,
                "wall": wall,
                "cpu": cpu,
                "mb": mb_in,
                "same": same,
                "timings": rep["timings_s"],
            }
        )
        print(
            f"  {wall:.1f} s, {cpu:.1f} CPU s, {mb_in / wall:.3f} MB/s, identical: {same}, {rep['timings_s']}",
            flush=True,
        )
    load_after = os.getloadavg()

    loop = rows[0] if not args.skip_loop else None
    lines = [
        "| variant | workers | wall (s) | MB/s | MB/s per worker | vs loop, per worker | CPU s (all processes) | MB per CPU s | vs loop, per CPU s | shards identical to loop |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        rate, per_cpu_s = r["mb"] / r["wall"], r["mb"] / r["cpu"]
        rel = f"{rate / r['cpus'] / (loop['mb'] / loop['wall']):.2f}x" if loop else "-"
        rel_cpu = f"{per_cpu_s / (loop['mb'] / loop['cpu']):.2f}x" if loop else "-"
        lines.append(
            f"| {r['variant']} | {r['cpus']} | {r['wall']:.1f} | {rate:.3f} | {rate / r['cpus']:.3f} | {rel} | "
            f"{r['cpu']:.1f} | {per_cpu_s:.3f} | {rel_cpu} | {r['same']} |"
        )
    ray_rows = [r for r in rows if r["variant"].startswith("Ray")]
    scaling = ""
    if len(ray_rows) >= 2:
        a, b = ray_rows[0], ray_rows[-1]
        scaling = f"Scaling {a['cpus']} -> {b['cpus']} workers: {a['wall'] / b['wall']:.2f}x faster."
    breakdown = [
        f"- {r['variant']}, {r['cpus']} worker(s): " + ", ".join(f"{k} {v}" for k, v in r["timings"].items())
        for r in rows
    ]
    cmd = "python benchmarks/preprocess.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    import ray as _ray

    section = [
        "",
        f"## Corpus preprocessing: Ray Data pipeline vs single-process loop ({datetime.now().strftime('%Y-%m-%d %H:%M')})",
        "",
        f"- command: `{cmd.strip()}` (config `{args.config}`, {mb:.2f} MB of input, tokenizer vocab {tokenizer.vocab_size})",
        f"- machine: {cpu_model()}, {os.cpu_count()} CPUs visible, Python {platform.python_version()}, Ray {_ray.__version__}; "
        f"load average {load_before[0]:.1f} before / {load_after[0]:.1f} after (the machine is shared)",
        f"- local Ray start (not in the walls): {ray_start:.1f} s; the tokenizer was trained beforehand (not timed). "
        "CPU s: user + system time of the benchmark process and all its children (Ray's GCS, raylet, workers), "
        "the fairer per-core measure when other jobs share the machine",
        "",
        *lines,
        "",
        scaling,
        "Time per phase (s; the loop's first phase reads, cleans and deduplicates document by document):",
        *breakdown,
        "",
    ]
    text = "\n".join(section)
    print(text)
    if not args.no_append:
        append_section(text)
        print(f"appended to {DOC.relative_to(REPO_ROOT)}")


if __name__ == "__main__":
    main()
