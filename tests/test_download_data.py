"""`make data` (jobs.download_data) without the network: the hub is replaced by local parquet files read through
fsspec's local filesystem, so file matching, streaming, size caps, layout and resumption are tested."""

from __future__ import annotations

import json

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.download_data import DataConfig, download, hub_root, match_files, per_source_caps
from jobs.platform.configfile import load_config
from jobs.prep.config import PreprocessConfig
from jobs.prep.sources import discover, plan_chunks, read_chunk
from tests.conftest import REPO


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
