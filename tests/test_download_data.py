"""`make data` (jobs.download_data) without the network: the hub is replaced by local parquet files read through
fsspec's local filesystem, so file matching, streaming, size caps, layout and resumption are tested; sharded
output, sharded jsonl/parquet sources with broken shards, from a directory and from an S3 prefix on moto."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.download_data import DataConfig, download, hub_root, match_files, per_source_caps
from jobs.platform.configfile import load_config
from jobs.prep.config import PreprocessConfig
from jobs.prep.sources import discover, plan_chunks, read_chunk
from tests import test_sources
from tests.conftest import REPO
from tests.test_sources import BUCKET

s3 = test_sources.s3  # one moto server for this module too


@pytest.fixture
def fake_hub(tmp_path):
    """Two 'repositories' laid out like FineWeb-2 and FLORES+."""
    web = tmp_path / "hub" / "fineweb-2"
    for lang, word in (("kaz_Cyrl", "сөз"), ("rus_Cyrl", "слово")):
        d = web / "data" / lang / "train"
        d.mkdir(parents=True)
        for i in range(3):  # 3 files x 2 row groups x 50 documents of ~100 bytes
            texts = [f"{lang} {i}-{j} " + " ".join([word] * 12) for j in range(100)]
            pq.write_table(
                pa.table({"text": texts, "id": list(range(100))}),
                d / f"00{i}_00000.parquet",
                row_group_size=50,
            )
        (web / "data" / lang / "README.md").write_text("not parquet")
    flores = tmp_path / "hub" / "flores"
    (flores / "devtest").mkdir(parents=True)
    pq.write_table(
        pa.table({"text": ["Бірінші сөйлем.", "Екінші  сөйлем\nекі жол."]}),
        flores / "devtest" / "kaz_Cyrl.parquet",
    )
    return tmp_path / "hub"


def config(**kw) -> DataConfig:
    base = {
        "max_mb_per_language": 0.005,  # 5 kB: stops inside the first file
        "sources": [
            {
                "name": "fineweb2-kk",
                "repo": "HuggingFaceFW/fineweb-2",
                "files": ["data/kaz_Cyrl/train/*.parquet"],
                "language": "kk",
                "licence": "ODC-By 1.0",
            },
            {
                "name": "fineweb2-ru",
                "repo": "HuggingFaceFW/fineweb-2",
                "files": ["data/rus_Cyrl/train/*.parquet"],
                "language": "ru",
                "max_mb": 0.1,
            },
            {
                "name": "flores-plus",
                "repo": "openlanguagedata/flores_plus",
                "files": ["devtest/kaz_Cyrl.parquet"],
                "language": "kk",
                "kind": "parallel",
            },
        ],
    }
    base.update(kw)
    return DataConfig.model_validate(base)


def roots(hub):
    return {
        "fineweb2-kk": str(hub / "fineweb-2"),
        "fineweb2-ru": str(hub / "fineweb-2"),
        "flores-plus": str(hub / "flores"),
    }


def test_helpers():
    assert (
        hub_root("HuggingFaceFW/fineweb-2", "refs/convert/parquet")
        == "datasets/HuggingFaceFW/fineweb-2@refs%2Fconvert%2Fparquet"
    )
    listing = [
        "r/data/kaz_Cyrl/train/000.parquet",
        "r/data/kaz_Cyrl/README.md",
        "r/data/rus_Cyrl/train/000.parquet",
    ]
    assert match_files(listing, "r", ["data/kaz_Cyrl/*/*.parquet"]) == ["data/kaz_Cyrl/train/000.parquet"]
    caps = per_source_caps(config())
    assert caps == {"fineweb2-kk/kk": 5_000, "fineweb2-ru/ru": 100_000}


def test_download_layout_caps_and_resume(fake_hub, tmp_path):
    out = tmp_path / "data"
    fs = fsspec.filesystem("file")
    entries = download(config(), out, fs=fs, roots=roots(fake_hub))
    by = {e["name"]: e for e in entries}
    kk = out / "corpus" / "kk" / "fineweb2-kk.jsonl"
    recs = [json.loads(x) for x in kk.read_text().splitlines()]
    assert (
        recs[0]["text"].startswith("kaz_Cyrl 0-0")
        and recs[0]["source"] == "HuggingFaceFW/fineweb-2/data/kaz_Cyrl/train/000_00000.parquet"
    )
    assert 5_000 <= by["fineweb2-kk"]["bytes"] < 5_000 + 200 and by["fineweb2-kk"]["files"] == [
        "data/kaz_Cyrl/train/000_00000.parquet"
    ]
    assert (
        by["fineweb2-ru"]["documents"] == 300 and len(by["fineweb2-ru"]["files"]) == 3
    )  # all files, under its cap
    assert (
        out / "eval" / "parallel" / "flores-plus" / "kk.txt"
    ).read_text() == "Бірінші сөйлем.\nЕкінші сөйлем екі жол.\n"
    assert "fineweb2-kk" in (out / "SOURCES.downloaded.md").read_text()
    assert not list(out.rglob(".*.part"))
    # a second run reuses finished files (the hub is not read again)
    kk.write_text(kk.read_text())
    again = download(config(), out, fs=_Exploding(), roots=roots(fake_hub))
    assert [e["bytes"] for e in again] == [e["bytes"] for e in entries]

    # the result is readable by jobs.preprocess
    cfg = PreprocessConfig.model_validate(
        {
            "name": "d",
            "languages": ["kk", "ru", "en"],
            "sources": [{"path": "corpus/kk", "language": "kk"}],
            "tokenizer": {"path": "x"},
        }
    )
    files = discover(cfg, out)
    docs = [d for c in plan_chunks(files, 1 << 20) for d in read_chunk(c, files[c.file_id], cfg.read)]
    assert len(docs) == by["fineweb2-kk"]["documents"] and not any(d.reason for d in docs)


class _Exploding:
    def glob(self, *a, **k):
        raise AssertionError("the hub was contacted although every file was already downloaded")


def test_missing_pattern_is_a_clear_error(fake_hub, tmp_path):
    cfg = config(sources=[{"name": "x", "repo": "a/b", "files": ["nothing/*.parquet"], "language": "kk"}])
    with pytest.raises(ValueError, match=r"no files in a/b@main match \['nothing/\*.parquet'\]"):
        download(cfg, tmp_path / "d", fs=fsspec.filesystem("file"), roots={"x": str(fake_hub / "fineweb-2")})


def test_shipped_config_is_valid():
    cfg = load_config(DataConfig, REPO / "configs" / "data" / "hf-mix.yaml")
    assert {s.language for s in cfg.sources} == {"kk", "ru", "en"}
    assert all(s.repo.count("/") == 1 for s in cfg.sources)


def test_sharded_output_is_read_back_whole(fake_hub, tmp_path):
    one = download(config(), tmp_path / "one", fs=fsspec.filesystem("file"), roots=roots(fake_hub))
    out = tmp_path / "sharded"
    cfg = config(shard_mb=0.002, compression="zstd")  # 2 kB shards
    entries = download(cfg, out, fs=fsspec.filesystem("file"), roots=roots(fake_hub))
    ru = next(e for e in entries if e["name"] == "fineweb2-ru")
    assert ru["path"] == "corpus/ru/fineweb2-ru" and len(ru["shards"]) > 5
    assert ru["shards"] == sorted(ru["shards"]) and all(s.endswith(".jsonl.zst") for s in ru["shards"])
    sizes = [len(pa.input_stream(str(out / s), compression="zstd").read()) for s in ru["shards"]]
    assert max(sizes) <= 2_000 and sum(sizes) > 20_000
    assert (
        next(e for e in entries if e["name"] == "flores-plus")["path"] == "eval/parallel/flores-plus/kk.txt"
    )
    # the shards hold exactly the documents of the unsharded file, in order, and preprocessing reads them all
    pcfg = PreprocessConfig.model_validate(
        {
            "name": "d",
            "languages": ["ru"],
            "sources": [{"path": "corpus/ru", "language": "ru"}],
            "tokenizer": {"path": "x"},
        }
    )
    files = discover(pcfg, out)
    assert len(files) == len(ru["shards"]) and all(f.status == "ok" for f in files)
    docs = [d for c in plan_chunks(files, 1 << 20) for d in read_chunk(c, files[c.file_id], pcfg.read)]
    whole = (tmp_path / "one" / "corpus" / "ru" / "fineweb2-ru.jsonl").read_text().splitlines()
    assert [d.text for d in docs] == [json.loads(x)["text"] for x in whole]
    assert ru["documents"] == next(e for e in one if e["name"] == "fineweb2-ru")["documents"]
    # finished: reused without the hub; an interrupted source (a shard gone) is fetched again, leftovers replaced
    again = download(cfg, out, fs=_Exploding(), roots=roots(fake_hub))
    assert [e["documents"] for e in again] == [e["documents"] for e in entries]
    (out / ru["shards"][-1]).unlink()
    (out / "corpus" / "ru" / "fineweb2-ru" / ".part-00099.jsonl.zst.part").write_bytes(b"half")
    redo = download(cfg, out, fs=fsspec.filesystem("file"), roots=roots(fake_hub))
    assert next(e for e in redo if e["name"] == "fineweb2-ru")["shards"] == ru["shards"]
    assert not list(out.rglob(".*.part"))


def sharded_corpus(root: Path) -> list[str]:
    """A directory of jsonl.zst / jsonl.gz / parquet shards with one truncated shard and one malformed line."""
    texts = [f"Бұл {i}-құжат, ұзын мәтін жолы." for i in range(300)]
    root.mkdir(parents=True)
    for k in range(3):
        part = texts[k * 100 : (k + 1) * 100]
        body = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in part).encode()
        if k == 0:
            with pa.CompressedOutputStream(str(root / "part-0.jsonl.zst"), "zstd") as f:
                f.write(body[:-1] + b"\n{not json\n")
        elif k == 1:
            (root / "part-1.jsonl.gz").write_bytes(gzip.compress(body))
        else:
            pq.write_table(pa.table({"text": part}), root / "part-2.parquet", row_group_size=25)
    broken = gzip.compress(
        "".join(json.dumps({"text": f"cut {i} " * 30}) + "\n" for i in range(3000)).encode()
    )
    (root / "part-3.jsonl.gz").write_bytes(broken[: len(broken) // 2])
    return texts


def local_source(path: str) -> DataConfig:
    return DataConfig.model_validate(
        {
            "max_mb_per_language": 100,
            "sources": [
                {
                    "name": "big-kk",
                    "repo": "local/big-kk",
                    "root": path,
                    "files": ["*.jsonl.zst", "*.jsonl.gz", "*.parquet"],
                    "language": "kk",
                }
            ],
        }
    )


def test_sharded_source_with_bad_shards_is_read_and_failures_listed(tmp_path):
    texts = sharded_corpus(tmp_path / "src")
    out = tmp_path / "data"
    (entry,) = download(local_source(str(tmp_path / "src")), out, fs=_Exploding())
    got = [json.loads(x)["text"] for x in (out / entry["path"]).read_text().splitlines()]
    cut = [t for t in got if t.startswith("cut ")]
    assert [t for t in got if not t.startswith("cut ")] == texts  # every good shard in full
    assert 0 < len(cut) < 3000  # the truncated shard's records before the break are kept
    assert entry["malformed_lines"] == 1
    (failed,) = entry["failed_files"]
    assert failed["file"] == "part-3.jsonl.gz" and failed["documents"] == len(cut)
    assert "part-3.jsonl.gz" in (out / "SOURCES.downloaded.md").read_text()


def test_source_where_nothing_is_readable_is_an_error(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "x.parquet").write_bytes(b"PAR1 and nothing else")
    with pytest.raises(ValueError, match=r"big-kk: no file yielded a document; first failure: x.parquet"):
        download(local_source(str(tmp_path / "src")), tmp_path / "data")


def test_compression_needs_shards():
    with pytest.raises(ValueError, match="compression=zstd applies to shards: set shard_mb"):
        config(compression="zstd")


def test_sharded_source_on_s3(s3, tmp_path):
    texts = sharded_corpus(tmp_path / "src")
    for p in sorted((tmp_path / "src").iterdir()):
        s3.put_object(Bucket=BUCKET, Key=f"hub-copy/{p.name}", Body=p.read_bytes())
    out = tmp_path / "data"
    cfg = local_source(f"s3://{BUCKET}/hub-copy").model_copy(update={"shard_mb": 0.01})
    (entry,) = download(cfg, out)
    got = [json.loads(x)["text"] for s in entry["shards"] for x in (out / s).read_text().splitlines()]
    assert [t for t in got if not t.startswith("cut ")] == texts
    assert [f["file"] for f in entry["failed_files"]] == ["part-3.jsonl.gz"]
    assert entry["repo"] == f"s3://{BUCKET}/hub-copy" and len(entry["shards"]) > 1
