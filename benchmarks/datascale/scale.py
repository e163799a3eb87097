"""Preprocessing at scale: MB/s per core, peak RSS of driver and workers, and planted duplicates found.

For each worker count, `python -m jobs.preprocess` runs as its own process (its own local Ray, fresh
TULPAR_HOME) over a corpus directory (`benchmarks/data_scale.py corpus` writes one with planted duplicates);
the job's report gives the time per pass and the peak RSS of the driver and of every pass's workers. In the
same invocation, Hugging Face `tokenizers` alone encodes a sample of the same documents on one thread: the
floor the issue compares the whole pipeline with.

- steady state, MB/s per core = input MB / (time of the passes: clean + dedup + mixture + write) / workers
- end to end, MB/s per core = input MB / (the job process's wall time, Ray start-up included) / workers

    python benchmarks/data_scale.py preprocess --corpus /tmp/corpus-0.5gb --tokenizer $TULPAR_HOME/tokenizers/kk-ru-en-32k \
        --workers 1,2 [--ground-truth /tmp/corpus-0.5gb/planted.parquet]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
PASSES = ("clean", "dedup", "mixture", "write")


def corpus_config(corpus: Path, languages: list[str]) -> dict:
    """A preprocessing config over the corpus: the `sources:` its sources.yaml lists (the generator writes one),
    else its <lang>/ directories; no mixture, Jaccard threshold 0.8 (the issue's), 1% validation, the language ID
    of the shipped configs."""
    listed = corpus / "sources.yaml"
    if listed.is_file():
        sources = yaml.safe_load(listed.read_text())["sources"]
    else:
        sources = [{"path": str(corpus / x), "language": x} for x in languages if (corpus / x).is_dir()]
    if not sources:
        raise ValueError(f"{corpus} has no sources.yaml and no {languages} subdirectories")
    return {
        "name": "data-scale",
        "languages": languages,
        "sources": sources,
        "mixture": {"target": None},
        "split": {"val_fraction": 0.01},
        "dedup": {"threshold": 0.8},
        # the language ID of the shipped configs (configs/preprocess/kk-ru-en.yaml): fastText, lingua where unsure
        "langid": yaml.safe_load((REPO_ROOT / "configs/preprocess/kk-ru-en.yaml").read_text())["langid"],
        "tokenizer": {"path": ""},
        "output": {"shard_max_tokens": 50_000_000},
    }


def documents_sample(corpus: Path, max_bytes: int) -> list[str]:
    """Texts from the start of every .jsonl/.txt file of the corpus (plain, .gz or .zst), an equal share of
    max_bytes of UTF-8 from each, so every language is in the sample."""
    import io

    import pyarrow as pa

    files = sorted(
        p
        for p in corpus.rglob("*")
        if p.is_file() and (".jsonl" in p.name or p.name.endswith((".txt", ".txt.gz", ".txt.zst")))
    )
    out: list[str] = []
    for path in files:
        comp = "zstd" if path.name.endswith(".zst") else "gzip" if path.name.endswith(".gz") else None
        total = 0
        with pa.input_stream(str(path), compression=comp) as raw:
            for line in io.TextIOWrapper(raw, encoding="utf-8", errors="replace"):
                text = json.loads(line).get("text", "") if ".jsonl" in path.name else line.rstrip("\n")
                out.append(text)
                total += len(text.encode("utf-8"))
                if total >= max_bytes / len(files):
                    break
    return out


def tokenizer_alone_mb_s(tokenizer_dir: str, texts: list[str], batch: int = 256) -> float:
    """Single-thread MB/s of `tokenizers` encode_batch (the fast path our pipeline uses) over `texts`."""
    code = (
        "import os, sys, json, time\n"
        "os.environ['TOKENIZERS_PARALLELISM']='false'\n"
        "os.environ['RAYON_NUM_THREADS']='1'\n"
        "from tokenizers import Tokenizer\n"
        "tk=Tokenizer.from_file(sys.argv[1])\n"
        "texts=json.load(open(sys.argv[2]))\n"
        f"b={batch}\n"
        "tk.encode_batch(texts[:b], add_special_tokens=False)\n"
        "t0=time.perf_counter()\n"
        "for i in range(0,len(texts),b): tk.encode_batch(texts[i:i+b], add_special_tokens=False)\n"
        "dt=time.perf_counter()-t0\n"
        "print(sum(len(t.encode()) for t in texts)/1e6/dt)\n"
    )
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(texts, f)
    try:
        tok_json = str(Path(tokenizer_dir) / "tokenizer.json")
        env = {**os.environ, "RAYON_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        r = subprocess.run(
            [sys.executable, "-c", code, tok_json, f.name], capture_output=True, text=True, env=env
        )
        if r.returncode:
            raise RuntimeError(r.stderr[-2000:])
        return float(r.stdout.strip().splitlines()[-1])
    finally:
        os.unlink(f.name)


def run_job(cfg: dict, workers: int, tokenizer: str, out: Path, home: Path) -> dict:
    cfg = json.loads(json.dumps(cfg))
    cfg["tokenizer"]["path"] = tokenizer
    cfg["output"].update({"dir": str(out), "reuse": False})
    cfg["execution"] = {
        **cfg.get("execution", {}),
        "num_workers": workers,
        "local_num_cpus": workers,
        "progress_bars": False,
    }
    path = out.parent / f"cfg-{workers}.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    env = {**os.environ, "TULPAR_HOME": str(home), "RAY_ADDRESS": ""}
    env.pop("MLFLOW_TRACKING_URI", None)
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-m", "jobs.preprocess", "--config", str(path)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - t0
    if r.returncode:
        raise RuntimeError(f"jobs.preprocess failed (exit {r.returncode}):\n{r.stderr[-4000:]}")
    rep = json.loads((out / "report.json").read_text())
    return {"workers": workers, "wall": wall, "report": rep}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", required=True, type=Path)
    p.add_argument("--tokenizer", required=True, help="tokenizer directory (tokenizer.json)")
    p.add_argument("--workers", default="1,2")
    p.add_argument("--languages", default="kk,ru,en")
    p.add_argument(
        "--ground-truth", type=Path, help="planted pairs (benchmarks/data_scale.py corpus writes them)"
    )
    p.add_argument("--sample-mb", type=float, default=32.0, help="documents the tokenizer-alone run encodes")
    p.add_argument("--keep", action="store_true", help="keep the datasets written")
    p.add_argument("--no-append", action="store_true")
    args = p.parse_args(argv)
    cfg = corpus_config(args.corpus, args.languages.split(","))
    texts = documents_sample(args.corpus, int(args.sample_mb * 1e6))
    sample_mb = sum(len(t.encode()) for t in texts) / 1e6
    # the reference of each row: the tokenizer alone measured just before and just after its run, averaged (on a
    # cloud VM the same measurement drifts by 10-15% over minutes, so one figure at the start is not enough)
    tok_before = tokenizer_alone_mb_s(args.tokenizer, texts)
    print(f"tokenizer alone, 1 thread: {tok_before:.3f} MB/s on {sample_mb:.1f} MB", flush=True)
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="tulpar-data-scale-"))
    for w in [int(x) for x in args.workers.split(",")]:
        print(f"jobs.preprocess with {w} worker(s) ...", flush=True)
        row = run_job(cfg, w, args.tokenizer, tmp / f"ds-{w}", tmp / f"home-{w}")
        rep = row["report"]
        mb = rep["totals"]["bytes_in"] / 1e6
        steady = sum(rep["timings_s"].get(k, 0.0) for k in PASSES)
        row |= {
            "mb": mb,
            "steady_mb_s_core": mb / steady / w,
            "clean_mb_s_core": mb / rep["timings_s"]["clean"] / w,
            "e2e_mb_s_core": mb / row["wall"] / w,
            "driver_rss": rep["memory"]["driver_peak_rss_mb"],
            "worker_rss": max(rep["memory"]["worker_peak_rss_mb"].values()),
        }
        tok_after = tokenizer_alone_mb_s(args.tokenizer, texts)
        print(f"tokenizer alone, 1 thread: {tok_after:.3f} MB/s (after the run)", flush=True)
        row["tok_rates"] = (tok_before, tok_after)
        row["tok_rate"] = (tok_before + tok_after) / 2
        tok_before = tok_after
        if args.ground_truth:
            from benchmarks.datascale import planted

            decisions = planted.read_decisions(tmp / f"ds-{w}")
            row["planted"] = planted.score_tables(args.ground_truth, decisions, threshold=0.8, verify=False)
            print(planted.format_result(f"{w} worker(s)", row["planted"]), flush=True)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "report"}, default=str), flush=True)
    if not args.keep:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    section = render(rows, args, argv)
    print(section)
    if not args.no_append:
        sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
        from machine import append_section

        append_section(section)
    return rows


def render(rows: list[dict], args, argv) -> str:
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    from machine import cpu_model

    cmd = "python benchmarks/data_scale.py preprocess " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[2:])
    )
    lines = [
        "",
        f"## Preprocessing at scale ({datetime.now().strftime('%Y-%m-%d %H:%M')})",
        "",
        f"- command: `{cmd}`",
        f"- machine: {cpu_model()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; load average "
        f"{os.getloadavg()[0]:.1f} at the end",
        "- tokenizer alone: HF `tokenizers` encode_batch, 1 thread, a sample of the same documents, measured just "
        "before and just after each run; the row's reference is their mean ("
        + "; ".join(
            f"{r['workers']} worker(s): {a:.3f} and {b:.3f} MB/s" for r in rows for a, b in [r["tok_rates"]]
        )
        + ")",
        "",
        "| workers | input MB | steady MB/s per core | vs tokenizer alone | clean pass MB/s per core | end to end MB/s "
        "per core (Ray start included) | wall (s) | driver peak RSS (MB) | worker peak RSS (MB) | passes (s) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        t = r["report"]["timings_s"]
        lines.append(
            f"| {r['workers']} | {r['mb']:,.0f} | {r['steady_mb_s_core']:.3f} | {r['steady_mb_s_core'] / r['tok_rate']:.2f}x ({r['tok_rate']:.3f}) | "
            f"{r['clean_mb_s_core']:.3f} | {r['e2e_mb_s_core']:.3f} | {r['wall']:.0f} | {r['driver_rss']:,.0f} | "
            f"{r['worker_rss']:,.0f} | " + ", ".join(f"{k} {t.get(k, 0)}" for k in ("plan", *PASSES)) + " |"
        )
    scored = [r for r in rows if "planted" in r]
    if scored:
        lines += [
            "",
            "Planted duplicates (`planted.parquet` of the corpus; near pairs at true Jaccard >= 0.8 are positives):",
            "",
            "| workers | near recall (J >= 0.8) | near precision | planted near pairs dropped below 0.8 | "
            "exact recall | exact precision | near dropped | exact dropped |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in scored:
            s = r["planted"]
            rn, rb = s["recall_near_at_threshold"], s["recall_near_below_threshold"]
            re_, pn, pe = s["recall_exact"], s["precision_near"], s["precision_exact"]
            lines.append(
                f"| {r['workers']} | {rn['found']:,}/{rn['pairs']:,} = {rn['recall']} | {pn['precision']} | "
                f"{rb['found']:,}/{rb['pairs']:,} | {re_['recall']} | {pe['precision']} | {s['dropped_near']:,} | "
                f"{s['dropped_exact']:,} |"
            )
    return "\n".join(lines) + "\n"
