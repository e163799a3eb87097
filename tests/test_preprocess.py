"""jobs.preprocess end to end on small fixtures (tests/fixtures/preprocess + generated bad input), on a local
Ray with 2 CPUs: the pipeline runs twice (1 worker with local paths, 2 workers with file:// URIs) and once more
to show that nothing usable fails clearly; a single-process reference loop gives the expected output."""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from jobs.platform.runtime import run_job
from jobs.prep.config import PreprocessConfig
from jobs.prep.reference import run_loop
from jobs.preprocess import Output, main
from llm_core.shards import DataError, TokenDataset, read_manifest
from llm_core.tokenizer import Tokenizer, train_bpe
from tests.conftest import REPO
from tests.stack import shared_ray_env

FIXTURES = REPO / "tests" / "fixtures" / "preprocess"
RU_IN_KK = "многие читатели обвиняют Дамблдора"
PII = ("aigerim.nurlanova@mail.kz", "555-12-34", "KZ86125KZT5004100100")


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Fixture text in every supported format plus every kind of bad input."""
    root = tmp_path_factory.mktemp("corpus")
    for lang in ("kk", "ru", "en"):
        (root / lang).mkdir()
    shutil.copy(FIXTURES / "kk" / "news.txt", root / "kk")
    shutil.copy(FIXTURES / "kk" / "wiki.jsonl", root / "kk")
    shutil.copy(FIXTURES / "ru" / "gsd.txt", root / "ru")
    (root / "ru" / "taiga.txt.gz").write_bytes(gzip.compress((FIXTURES / "ru" / "taiga.txt").read_bytes()))
    with pa.CompressedOutputStream(str(root / "en" / "ewt.txt.zst"), "zstd") as f:
        f.write((FIXTURES / "en" / "ewt.txt").read_bytes())
    shutil.copy(FIXTURES / "en" / "war_and_peace.txt", root / "en")
    paragraph = (FIXTURES / "en" / "war_and_peace.txt").read_text().split("\n\n")[2]
    extra = [
        "The library opens at nine in the morning and closes late on weekdays.",
        "She wrote to the council twice before anyone answered her letter.",
        paragraph,  # exact duplicate of a document in another file
        "Our small team tested the new bridge design during the long winter.",
    ]
    pq.write_table(pa.table({"text": extra, "id": list(range(len(extra)))}), root / "en" / "extra.parquet")
    bad = root / "bad"
    bad.mkdir()
    (bad / "invalid_utf8.txt").write_bytes(
        b"This line is perfectly fine and long enough to keep.\nThis one has a broken \xff\xfe byte pair in it.\n"
    )
    (bad / "binary.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 4)
    (bad / "empty.txt").write_bytes(b"")
    with open(bad / "huge_line.txt", "wb") as f:
        f.write(b"word " * 10_000_000)  # one 50 MB line
        f.write(b"\nA normal sentence follows the enormous line and should be kept.\n")
    (bad / "records.jsonl").write_text(
        '{"text": "A valid record that is long enough to pass the filters."}\n'
        '{"text": "unterminated\n'
        '{"title": "a record without the text field"}\n'
    )
    (bad / "notes.csv").write_text("a,b\n1,2\n")
    # ~2.4 MB of numbers (cheap: too few letters for language ID, dropped by the quality filter), gzipped, cut in
    # half: the stream breaks after the first MB-blocks were read
    digits = np.random.default_rng(0).integers(0, 10**9, (60_000, 4)).astype(str)
    packed = gzip.compress("".join(" ".join(row) + "\n" for row in digits).encode())
    (bad / "truncated.txt.gz").write_bytes(packed[: len(packed) // 2])
    (bad / "broken_link.txt").symlink_to(root / "nowhere.txt")
    return root


@pytest.fixture(scope="module")
def tokenizer_dir(corpus, tmp_path_factory) -> Path:
    texts = [p.read_text() for p in FIXTURES.rglob("*.txt")] + [
        p.read_text() for p in FIXTURES.rglob("*.jsonl")
    ]
    out = tmp_path_factory.mktemp("tok")
    train_bpe(texts, 1000).save(out)
    return out


def config_dict(
    corpus: Path, tok: Path, *, uri: bool = False, workers: int = 1, out: str | None = None
) -> dict:
    base = f"file://{corpus}" if uri else str(corpus)

    def p(rel: str) -> str:
        return f"{base}/{rel}"

    return {
        "name": "fixture",
        "languages": ["kk", "ru", "en"],
        "sources": [
            {"path": p("kk"), "language": "kk"},
            {"path": p("ru"), "language": "ru"},
            {"path": p("en/*.zst"), "language": "en"},
            {"path": p("en/extra.parquet"), "language": "en"},
            {"path": p("en/war_and_peace.txt"), "language": "en", "txt_mode": "blank_line"},
            {"path": p("bad"), "language": "en"},
            {"path": p("bad/does_not_exist.txt"), "language": "en"},
        ],
        "mixture": {"target": {"kk": 0.4, "ru": 0.3, "en": 0.3}, "max_epochs": 3},
        "split": {"val_fraction": 0.1},
        "tokenizer": {"path": str(tok)},
        "output": {"shard_max_tokens": 3000, "min_train_tokens": 1000, "dir": out},
        "execution": {"num_workers": workers, "batch_size": 64, "progress_bars": False},
    }


def run_cli(cfg: dict, tmp: Path, home: Path, data: Path, *overrides: str) -> tuple[int, dict, str]:
    """jobs.preprocess through the job CLI contract, in this process (Ray stays up between runs)."""
    path = tmp / f"cfg-{time.monotonic_ns()}.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    out, err = io.StringIO(), io.StringIO()
    with (
        pytest.MonkeyPatch.context() as env,
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
    ):
        env.setenv("TULPAR_HOME", str(home))
        env.setenv("TULPAR_DATA", str(data))
        env.delenv("MLFLOW_TRACKING_URI", raising=False)
        env.delenv("TULPAR_STORAGE", raising=False)
        rc = run_job("preprocess", PreprocessConfig, main, ["--config", str(path), *overrides])
    return rc, json.loads(out.getvalue().strip().splitlines()[-1]), err.getvalue()


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def run1(ray_local, corpus, tokenizer_dir, home, tmp_path_factory):
    """One worker, local paths, default output dir ($TULPAR_HOME/datasets/fixture)."""
    cfg = config_dict(corpus, tokenizer_dir)
    t0 = time.perf_counter()
    rc, result, err = run_cli(cfg, tmp_path_factory.mktemp("cfg"), home, corpus)
    assert rc == 0, err[-3000:]
    return {
        "cfg": cfg,
        "result": result,
        "dir": Path(result["outputs"]["dataset_dir"]),
        "seconds": time.perf_counter() - t0,
    }


@pytest.fixture(scope="module")
def run2(ray_local, corpus, tokenizer_dir, home, tmp_path_factory):
    """Two workers, file:// URIs for inputs and output (the code path used for s3://)."""
    out = tmp_path_factory.mktemp("out2") / "ds"
    cfg = config_dict(corpus, tokenizer_dir, uri=True, workers=2, out=f"file://{out}")
    rc, result, err = run_cli(cfg, tmp_path_factory.mktemp("cfg"), home, corpus)
    assert rc == 0, err[-3000:]
    return {"cfg": cfg, "result": result, "dir": out}


@pytest.fixture(scope="module")
def reference(corpus, tokenizer_dir, tmp_path_factory):
    cfg = PreprocessConfig.model_validate(config_dict(corpus, tokenizer_dir))
    return run_loop(cfg, corpus, Tokenizer.from_dir(tokenizer_dir), tmp_path_factory.mktemp("ref") / "ds")


def report(run) -> dict:
    return json.loads((run["dir"] / "report.json").read_text())


# --------------------------------------------------------------------------------------------------- tests


def test_job_contract_outputs_and_tracking(run1, home):
    result, d = run1["result"], run1["dir"]
    assert result["stage"] == "preprocess" and result["status"] == "ok" and result["mlflow_run_id"]
    assert d == home / "datasets" / "fixture"
    assert json.loads((d / "result.json").read_text()) == result
    for name in ("manifest.json", "report.md", "report.json"):
        assert (d / name).is_file()
    assert not [p for p in d.parent.iterdir() if p.name.startswith(".")]  # no temporary dirs left
    ds = TokenDataset.open(d, verify=True)
    assert ds.languages == ["kk", "ru", "en"] and ds.vocab_size <= 1000
    names = sorted(p.name for p in (d / "shards").iterdir())
    # one shard per (split, language, block, part): <split>-<lang>-<block>-<part>
    assert "train-kk-00000-000.bin" in names and "train-kk-00000-000.docs.npy" in names
    assert any(n.startswith("val-en-") and n.endswith("-000.bin") for n in names)
    assert sum(n.startswith("train-kk-") and n.endswith(".bin") for n in names) >= 2  # shard_max_tokens=3000
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{home / 'mlflow.db'}")
    run = mlflow.get_run(result["mlflow_run_id"])
    assert run.data.tags["tulpar.stage"] == "preprocess"
    assert run.data.tags["tulpar.dataset_manifest_sha256"] == result["outputs"]["manifest_sha256"]
    assert run.data.tags["tulpar.tokenizer_sha256"] == ds.tokenizer_sha256
    assert run.data.metrics["documents_in/kk"] > 0 and "tokens_train/kk" in run.data.metrics
    arts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "report")}
    assert {"report/report.md", "report/manifest.json", "report/report.json"} <= arts


def test_report_counts_add_up(run1):
    r = report(run1)
    expected_in = {"kk": 72 + 14, "ru": 60 + 60}
    for lang, e in r["languages"].items():
        dropped = sum(v["documents"] for v in e["dropped"].values())
        assert e["in"]["documents"] == e["kept"]["documents"] + dropped, lang
        assert e["balanced"] and r["stages"][lang][-1]["documents_out"] == e["kept"]["documents"]
        if lang in expected_in:
            assert e["in"]["documents"] == expected_in[lang]
    assert r["totals"]["documents_in"] == sum(e["in"]["documents"] for e in r["languages"].values())
    assert "Per source language (documents in = kept + dropped)" in (run1["dir"] / "report.md").read_text()


def test_bad_input_is_counted_with_file_names(run1):
    r = report(run1)
    files = {Path(f["path"]).name: f for f in r["files"]}
    assert files["binary.txt"]["status"] == "binary"
    assert files["empty.txt"]["status"] == "empty"
    assert files["notes.csv"]["status"] == "unsupported"
    assert files["broken_link.txt"]["status"] == "unreadable"
    assert files["does_not_exist.txt"]["status"] == "missing"
    assert (
        files["huge_line.txt"]["dropped"] == {"too_long": 1} and files["huge_line.txt"]["documents_in"] == 2
    )
    assert files["records.jsonl"]["dropped"] == {"malformed_json": 1, "missing_text_field": 1}
    assert files["invalid_utf8.txt"]["repaired"] == {"invalid_utf8": 1}
    cut = files["truncated.txt.gz"]  # records before the break are read, the rest is one counted record
    assert cut["status"] == "corrupt" and cut["dropped"].get("corrupt_compression") == 1
    assert cut["documents_in"] > 2 and r["totals"]["files_with_read_problems"] == 1
    assert "truncated.txt.gz" in r["examples"]["corrupt_compression"][0]["detail"]
    docs = pq.read_table(run1["dir"] / "documents").to_pandas()
    row = docs[docs["reason"] == "corrupt_compression"].iloc[0]
    assert row["file"].endswith("truncated.txt.gz")
    assert row["record"] is None or np.isnan(row["record"])  # it stands for the unread rest, no record index
    md = (run1["dir"] / "report.md").read_text()
    for name in (
        "binary.txt",
        "empty.txt",
        "broken_link.txt",
        "does_not_exist.txt",
        "records.jsonl",
        "huge_line.txt",
        "truncated.txt.gz",
    ):
        assert name in md
    assert [x["file"].endswith("records.jsonl") for x in r["examples"]["malformed_json"]] == [True]


def test_duplicates_removed(run1, reference):
    r = report(run1)
    assert r["languages"]["kk"]["dropped"]["exact_duplicate"]["documents"] == 1
    # the edited АТФ paragraph, and "1 апта мерзім берді ..." beside "Бір апта ...": 5 of 7 shingles shared (J 0.71)
    assert r["languages"]["kk"]["dropped"]["near_duplicate"]["documents"] == 2
    # across files: the War and Peace paragraph repeated in extra.parquet
    pairs = {
        (Path(x["file"]).name, Path(x["duplicate_of"]["file"]).name) for x in r["examples"]["exact_duplicate"]
    }
    assert ("war_and_peace.txt", "extra.parquet") in pairs  # extra.parquet comes first in the source list
    near = [x for x in r["examples"]["near_duplicate"] if x["file"].endswith("wiki.jsonl")][0]
    assert near["duplicate_of"]["file"].endswith("wiki.jsonl")
    texts = [t for _, _, t in reference.kept.values()]
    assert sum("мысалы" in t and t.startswith("АТФ") for t in texts) == 0  # the edited copy is gone
    assert sum(t.startswith("АТФ") for t in texts) == 1
    wp = (FIXTURES / "en" / "war_and_peace.txt").read_text().split("\n\n")[2][:60]
    assert sum(t.startswith(wp) for t in texts) == 1


def test_russian_paragraph_in_kazakh_source_is_routed(run1, reference):
    r = report(run1)
    assert r["routing"]["kk"].get("ru", 0) >= 1
    routed = [(lang, t) for lang, _, t in reference.kept.values() if RU_IN_KK in t]
    assert [lang for lang, _ in routed] == ["ru"]


def test_pii_scrubbed(run1, reference):
    r = report(run1)
    assert r["languages"]["kk"]["pii_replaced"] == {"email": 1, "phone": 1, "iban": 1}
    texts = "\n".join(t for _, _, t in reference.kept.values())
    assert not any(p in texts for p in PII)
    assert "<EMAIL>" in texts and "<PHONE>" in texts and "<IBAN>" in texts


def test_mixture_within_two_percent(run1):
    m = read_manifest(run1["dir"])
    assert m["mixture"]["target"] == {"kk": 0.4, "ru": 0.3, "en": 0.3}
    for lang, share in m["mixture"]["target"].items():
        assert abs(m["mixture"]["achieved"][lang] - share) <= 0.02, m["mixture"]
    total = sum(m["counts"]["train"][lang]["tokens"] for lang in m["languages"])
    assert m["counts"]["train"]["kk"]["tokens"] / total == pytest.approx(m["mixture"]["achieved"]["kk"])
    assert m["mixture"]["epochs"]["kk"] > 1  # Kazakh is the scarcest: repeated


def test_shards_hold_exactly_the_tokenizer_output(run1, reference, tokenizer_dir):
    tok = Tokenizer.from_dir(tokenizer_dir)
    ds = TokenDataset.open(run1["dir"], verify=True)
    assert ds.tokenizer_sha256 == tok.sha256 and ds.eos_id == tok.eos_id
    for split in ("train", "val"):
        for lang in ds.languages:
            got = Counter(tuple(d.tolist()) for d in ds.documents(split, lang))
            want = Counter()
            for doc_id, (dl, ds_split, text) in reference.kept.items():
                if dl == lang and ds_split == split:
                    want[tuple(tok.encode(text) + [tok.eos_id])] += reference.copies[doc_id]
            assert got == want, (split, lang)
            n_bytes = sum(
                len(reference.kept[i][2].encode()) * c
                for i, c in reference.copies.items()
                if reference.kept[i][:2] == (lang, split)
            )
            assert ds.bytes_per_token(split, lang) == pytest.approx(n_bytes / ds.num_tokens(split, lang))


def test_pipeline_equals_reference_loop(run1, reference):
    m = read_manifest(run1["dir"])
    assert [s["sha256"] for s in m["shards"]] == [s["sha256"] for s in reference.manifest["shards"]]
    assert m["counts"] == reference.manifest["counts"]


def test_one_and_two_workers_identical(run1, run2):
    m1, m2 = read_manifest(run1["dir"]), read_manifest(run2["dir"])
    assert m1["shards"] == m2["shards"] and m1["counts"] == m2["counts"] and m1["mixture"] == m2["mixture"]
    assert m1["config_sha256"] != m2["config_sha256"]  # sources differ (file:// URIs); output does not
    r1, r2 = report(run1), report(run2)
    assert r1["languages"] == r2["languages"] and r1["dedup"] == r2["dedup"]
    assert json.loads((run2["dir"] / "result.json").read_text())["status"] == "ok"


def test_rerun_reuses_and_changed_config_writes_new_output(run1, corpus, tokenizer_dir, home, tmp_path):
    t0 = time.perf_counter()
    rc, result, _ = run_cli(run1["cfg"], tmp_path, home, corpus, "execution.num_workers=2")
    assert rc == 0 and result["reused"] is True
    assert result["mlflow_run_id"] == run1["result"]["mlflow_run_id"]
    assert time.perf_counter() - t0 < 30
    changed = PreprocessConfig.model_validate({**run1["cfg"], "dedup": {"threshold": 0.9}})
    assert changed.content_sha256() != read_manifest(run1["dir"])["config_sha256"]


def test_nothing_usable_fails_clearly(ray_local, corpus, tokenizer_dir, home, tmp_path):
    cfg = config_dict(corpus, tokenizer_dir)
    cfg["sources"] = [
        {"path": str(corpus / "bad" / "records.jsonl"), "language": "en"},
        {"path": str(corpus / "bad" / "binary.txt"), "language": "en"},
    ]
    cfg["output"]["dir"] = str(tmp_path / "never")
    rc, result, err = run_cli(cfg, tmp_path, home, corpus)
    assert rc == 2 and result["status"] == "error" and "Traceback" not in err
    assert "not enough tokens for one training batch" in err and "malformed_json" in err
    assert not (tmp_path / "never").exists()
    cfg["sources"] = [{"path": str(corpus / "bad" / "nope.txt"), "language": "en"}]
    rc, _, err = run_cli(cfg, tmp_path, home, corpus)
    assert rc == 2 and "not enough tokens for one training batch" in err and "nope.txt: missing" in err


def test_killed_run_resumes_committed_blocks_with_identical_shards(
    ray_local, corpus, tokenizer_dir, home, tmp_path
):
    """SIGKILL a preprocessing process (and its own Ray) in the middle of pass `clean`, re-run: the committed
    blocks are skipped, and the dataset is byte-identical to an uninterrupted run's."""
    import os
    import signal

    lines = (FIXTURES / "kk" / "news.txt").read_text().splitlines() + (
        FIXTURES / "ru" / "gsd.txt"
    ).read_text().splitlines()
    big = tmp_path / "in" / "many.txt"  # ~30 blocks of ~10 kB: several seconds of cleaning with one worker
    big.parent.mkdir()
    big.write_text("".join(f"{line} ({i})\n" for i in range(6) for line in lines if line.strip()))
    cfg = config_dict(corpus, tokenizer_dir, out=str(tmp_path / "ds"))
    cfg["sources"] = [{"path": str(big), "language": "kk"}]
    cfg["langid"] = {"on_mismatch": "keep"}
    cfg["read"] = {"chunk_mb": 0.01}
    cfg["mixture"] = {"target": None}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    env = {**os.environ, "TULPAR_HOME": str(home), "TULPAR_DATA": str(corpus), "RAY_ADDRESS": ""}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobs.preprocess", "--config", str(path)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its process group holds the local Ray it starts
    )
    committed: list[Path] = []
    deadline = time.monotonic() + 300
    while len(committed) < 3 and proc.poll() is None and time.monotonic() < deadline:
        committed = list(tmp_path.glob(".ds.work-*/clean/*.parquet"))
        with contextlib.suppress(subprocess.TimeoutExpired):  # wake on the process's exit, else poll again
            proc.wait(timeout=0.05)
    assert proc.poll() is None, (
        "the run finished before it could be killed: " + proc.stderr.read().decode()[-2000:]
    )
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    work = next(tmp_path.glob(".ds.work-*"))
    blocks_total = len(list(work.glob("clean/*.parquet")))
    assert not (tmp_path / "ds").exists() and blocks_total >= 3
    with pytest.raises(DataError, match="no dataset manifest"):  # nothing that looks like a dataset
        TokenDataset.open(tmp_path / "ds")

    rc, resumed, err = run_cli(cfg, tmp_path, home, corpus)
    assert rc == 0, err[-3000:]
    assert resumed["metrics"]["blocks_resumed/clean"] >= blocks_total
    assert not work.exists()  # the work store is gone once the dataset is published
    TokenDataset.open(tmp_path / "ds", verify=True)  # complete: every shard with its size and sha256
    first = read_manifest(tmp_path / "ds")
    blocks_in_run = json.loads((tmp_path / "ds" / "report.json").read_text())["blocks"]
    assert (
        blocks_in_run["resumed"]["clean"] >= 3 and blocks_in_run["total"] > blocks_in_run["resumed"]["clean"]
    )

    cfg["output"]["dir"] = str(tmp_path / "ds-uninterrupted")
    rc, _, err = run_cli(cfg, tmp_path, home, corpus)
    assert rc == 0, err[-3000:]
    again = read_manifest(tmp_path / "ds-uninterrupted")
    assert first["shards"] == again["shards"] and first["counts"] == again["counts"]
    for s in first["shards"]:
        assert (tmp_path / "ds" / s["path"]).read_bytes() == (
            tmp_path / "ds-uninterrupted" / s["path"]
        ).read_bytes()


def test_s3_dataset_and_work_store(corpus, tokenizer_dir, home, tmp_path):
    """Output and work store on an S3 server (moto): blocks committed as objects, the dataset copied into place
    with manifest.json last, the work prefix gone; the shards equal a local run's."""
    import os

    import boto3

    from tests.stack import s3_server

    with s3_server(tmp_path) as url:
        creds = {
            "AWS_ENDPOINT_URL": url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        s3 = boto3.client(
            "s3",
            endpoint_url=url,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        s3.create_bucket(Bucket="tulpar")
        cfg = config_dict(corpus, tokenizer_dir, out="s3://tulpar/datasets/fx")
        cfg["sources"] = cfg["sources"][:2]
        cfg["mixture"] = {"target": None}
        path = tmp_path / "cfg.yaml"
        path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
        env = {**os.environ, **creds, "TULPAR_HOME": str(home), "TULPAR_DATA": str(corpus)}
        env.update(shared_ray_env())  # the session's Ray: AWS_* reach its workers as on a cluster
        env.pop("MLFLOW_TRACKING_URI", None)
        r = subprocess.run(
            [sys.executable, "-m", "jobs.preprocess", "--config", str(path)],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert r.returncode == 0, r.stderr[-3000:]
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="tulpar", MaxKeys=5000).get("Contents", [])]
        assert "datasets/fx/manifest.json" in keys and "datasets/fx/report.json" in keys
        assert not [k for k in keys if ".work-" in k]  # the work store is removed once published
        manifest = json.loads(s3.get_object(Bucket="tulpar", Key="datasets/fx/manifest.json")["Body"].read())
        assert {f"datasets/fx/{s['path']}" for s in manifest["shards"]} <= set(keys)
        assert any(k.startswith("datasets/fx/documents/") for k in keys)
        cfg["output"]["dir"] = str(tmp_path / "local")
        rc, _, err = run_cli(cfg, tmp_path, home, corpus)
        assert rc == 0, err[-3000:]
        assert read_manifest(tmp_path / "local")["shards"] == manifest["shards"]


@pytest.mark.parametrize("remote", [False, True])
def test_output_is_atomic(tmp_path, remote):
    target = tmp_path / "ds"
    target.mkdir()
    (target / "manifest.json").write_text('{"old": true}')
    out = Output(f"file://{target}" if remote else str(target))
    with pytest.raises(RuntimeError), out.writing() as (root, write_file):
        write_file("report.md", "new")
        raise RuntimeError("killed half-way")
    if remote:  # object stores cannot rename: the old manifest is gone before anything new is written
        assert not (target / "manifest.json").exists()
    else:
        assert json.loads((target / "manifest.json").read_text()) == {"old": True}
        assert not (target / "report.md").exists()
        assert [p.name for p in tmp_path.iterdir()] == ["ds"]


def test_cli_user_error_exit_2():
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.preprocess",
            "--config",
            "configs/preprocess/tiny.yaml",
            "dedup.treshold=1",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "dedup.treshold: unknown key" in r.stderr and "Traceback" not in r.stderr
