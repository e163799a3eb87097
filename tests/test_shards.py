"""The dataset shard format (llm_core/shards.py): writing, manifest validation, reading back."""

from __future__ import annotations

import json

import numpy as np
import pytest

from llm_core.data import DataError
from llm_core.shards import (
    ShardWriter,
    TokenDataset,
    build_manifest,
    dtype_name,
    read_manifest,
    write_shard,
)


def make_dataset(root, vocab_size=1000, eos=0, docs=None, languages=("kk", "ru")):
    """Two languages x two splits; kk/train spread over two shards."""
    dtype = dtype_name(vocab_size)
    docs = docs or {
        ("train", "kk", 0): [([5, 6, 7], 10), ([8], 3)],
        ("train", "kk", 1): [([9, 10], 7)],
        ("train", "ru", 0): [([11, 12, 13, 14], 20)],
        ("val", "kk", 0): [([15], 2)],
        ("val", "ru", 0): [([16, 17], 9), ([18], 4)],
    }
    infos = [
        write_shard(root, split, lang, idx, d, dtype=dtype, eos_id=eos, vocab_size=vocab_size)
        for (split, lang, idx), d in docs.items()
    ]
    manifest = build_manifest(
        name="t",
        created="2026-01-01T00:00:00+00:00",
        config={"name": "t"},
        config_sha256="c" * 64,
        input_sha256="i" * 64,
        tokenizer={"path": "tok", "sha256": "s" * 64, "vocab_size": vocab_size, "eos_id": eos},
        languages=list(languages),
        shards=infos,
        mixture={"target": {"kk": 0.5, "ru": 0.5}, "achieved": {"kk": 0.5, "ru": 0.5}},
    )
    (root / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def test_layout_and_manifest(tmp_path):
    m = make_dataset(tmp_path)
    assert m["format_version"] == 1 and m["dtype"] == "uint16"
    assert (tmp_path / "shards" / "train-kk-00000.bin").stat().st_size == 6 * 2  # 4 ids + 2 eos
    assert m["counts"]["train"]["kk"] == {"documents": 3, "tokens": 9, "bytes": 20}
    assert m["counts"]["val"]["ru"] == {"documents": 2, "tokens": 5, "bytes": 13}
    entry = m["shards"][0]
    assert (
        entry["path"] == "shards/train-kk-00000.bin"
        and entry["docs_path"] == "shards/train-kk-00000.docs.npy"
    )
    assert set(entry) == {
        "path",
        "docs_path",
        "split",
        "language",
        "num_tokens",
        "num_documents",
        "num_bytes",
        "sha256",
    }
    ends = np.load(tmp_path / entry["docs_path"])
    assert ends.dtype == np.int64 and ends.tolist() == [4, 6]
    assert not list(tmp_path.rglob("*.tmp"))


def test_token_dataset_reads_back(tmp_path):
    make_dataset(tmp_path)
    ds = TokenDataset.open(tmp_path, verify=True)
    assert ds.vocab_size == 1000 and ds.eos_id == 0 and ds.languages == ["kk", "ru"]
    assert ds.tokenizer_sha256 == "s" * 64
    assert ds.tokens("train", "kk")[:].tolist() == [5, 6, 7, 0, 8, 0, 9, 10, 0]  # two shards, one stream
    assert ds.tokens("train")[:].tolist() == [5, 6, 7, 0, 8, 0, 9, 10, 0, 11, 12, 13, 14, 0]  # manifest order
    assert ds.tokens("train")[7:11].tolist() == [10, 0, 11, 12]  # across the kk/ru shard boundary
    single = ds.tokens("val", "kk")
    assert len(single) == 2 and single[:].tolist() == [15, 0]
    assert [d.tolist() for d in ds.documents("val", "ru")] == [[16, 17, 0], [18, 0]]
    assert [d.tolist() for d in ds.documents("train")][:2] == [[5, 6, 7, 0], [8, 0]]
    assert ds.bytes_per_token("train", "kk") == pytest.approx(20 / 9)
    assert ds.bytes_per_token("val") == pytest.approx((2 + 13) / (2 + 5))
    assert ds.num_tokens("train") == 14 and ds.num_documents("train") == 4
    with pytest.raises(ValueError, match="not in this dataset"):
        ds.tokens("train", "en")
    with pytest.raises(ValueError, match="split 'test'"):
        ds.tokens("test")


def test_uint32_when_vocab_exceeds_16_bits(tmp_path):
    m = make_dataset(
        tmp_path,
        vocab_size=151_669,
        eos=151_643,
        docs={("train", "kk", 0): [([70_000, 3], 5)]},
        languages=("kk",),
    )
    assert m["dtype"] == "uint32"
    ds = TokenDataset.open(tmp_path, verify=True)
    assert ds.tokens("train").dtype == np.uint32 and ds.tokens("train")[:].tolist() == [70_000, 3, 151_643]


def test_writer_rejects_out_of_range_ids_and_cleans_up(tmp_path):
    with pytest.raises(DataError, match="outside"):
        write_shard(tmp_path, "train", "kk", 0, [([70_000], 1)], dtype="uint16", eos_id=0)
    assert not list((tmp_path / "shards").iterdir())
    w = ShardWriter(tmp_path, "val", "kk", 0, dtype="uint16", eos_id=0)
    w.add_document([1, 2], 3)
    w.abort()
    assert not list((tmp_path / "shards").iterdir())


def test_verify_detects_corruption(tmp_path):
    make_dataset(tmp_path)
    p = tmp_path / "shards" / "train-ru-00000.bin"
    data = bytearray(p.read_bytes())
    data[0] ^= 1
    p.write_bytes(bytes(data))
    TokenDataset.open(tmp_path)  # sizes still match
    with pytest.raises(DataError, match="corrupt"):
        TokenDataset.open(tmp_path, verify=True)
    p.write_bytes(bytes(data[:-2]))
    with pytest.raises(DataError, match="manifest says"):
        TokenDataset.open(tmp_path)


def test_read_manifest_errors(tmp_path):
    with pytest.raises(ValueError, match="no dataset manifest.*make preprocess"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format_version": 1, ')
    with pytest.raises(ValueError, match="corrupt"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format_version": 1}')
    with pytest.raises(ValueError, match="missing keys"):
        read_manifest(tmp_path / "manifest.json")
    m = make_dataset(tmp_path)
    m["format_version"] = 2
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="format_version 2"):
        TokenDataset.open(tmp_path)
    m["format_version"] = 1
    (tmp_path / "shards" / "val-kk-00000.bin").unlink()
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="missing"):
        TokenDataset.open(tmp_path)
