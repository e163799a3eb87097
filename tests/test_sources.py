"""jobs.prep.sources on its own (no Ray): every supported format, parquet row-group chunks, and every kind of bad
input -- each reported with its file, never fatal, with the good files around it read in full -- on a local tree
and on an S3 prefix served by moto (one server for the module)."""

from __future__ import annotations

import gzip
import json
import os
import random
from pathlib import Path

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.prep.config import PreprocessConfig
from jobs.prep.report import STAGE_REASONS
from jobs.prep.sources import (
    FILE_REASON_STATUS,
    FILE_REASONS,
    FILE_STATUSES,
    READ_REASONS,
    FileEntry,
    RawDoc,
    discover,
    input_sha256,
    plan_chunks,
    read_chunk,
)
from tests import stack

BUCKET = "tulpar-corpus"


def lines(tag: str, n: int) -> list[str]:
    return [f"{tag} document {i}: the river runs past the old mill toward the town." for i in range(n)]


def zstd_frame(data: bytes) -> bytes:
    """A complete zstd stream as `zstd` the tool writes it (pyarrow's stream writer, read back by its reader)."""
    sink = pa.BufferOutputStream()
    with pa.CompressedOutputStream(sink, "zstd") as f:
        f.write(data)
    return sink.getvalue().to_pybytes()


def parquet_bytes(texts: list[str | None], row_group_size: int = 1000, compression: str = "snappy") -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(
        pa.table({"text": pa.array(texts, pa.string()), "n": list(range(len(texts)))}),
        sink,
        row_group_size=row_group_size,
        compression=compression,
    )
    return sink.getvalue().to_pybytes()


def config(*paths: str, **read) -> PreprocessConfig:
    return PreprocessConfig.model_validate(
        {
            "name": "t",
            "languages": ["en"],
            "sources": [{"path": p, "language": "en"} for p in paths],
            "read": read,
            "tokenizer": {"path": "unused"},
        }
    )


def read_all(files: list[FileEntry], cfg: PreprocessConfig, chunk_bytes: int = 8 << 20) -> list[RawDoc]:
    by_id = {f.file_id: f for f in files}
    return [d for c in plan_chunks(files, chunk_bytes) for d in read_chunk(c, by_id[c.file_id], cfg.read)]


def by_name(files: list[FileEntry]) -> dict[str, FileEntry]:
    return {f.uri.rsplit("/", 1)[-1]: f for f in files}


def texts_of(docs: list[RawDoc], entry: FileEntry) -> list[str]:
    return [d.text for d in docs if d.file_id == entry.file_id and not d.reason]


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# ------------------------------------------------------------------------------------------------- formats


def format_tree(root: Path) -> dict[str, list[str]]:
    """Every format, plain / gzip / zstd; returns the expected texts per file name."""
    expected: dict[str, list[str]] = {}
    for comp, wrap in (("", lambda b: b), (".gz", gzip.compress), (".zst", zstd_frame)):
        txt = lines(f"txt{comp}", 30)
        write(root / "txt" / f"a.txt{comp}", wrap(("\n".join(txt) + "\n").encode()))
        expected[f"a.txt{comp}"] = txt
        js = lines(f"jsonl{comp}", 30)
        body = "".join(json.dumps({"text": t, "id": i}, ensure_ascii=False) + "\n" for i, t in enumerate(js))
        write(root / "jsonl" / f"b.jsonl{comp}", wrap(body.encode()))
        expected[f"b.jsonl{comp}"] = js
    for codec in ("none", "gzip", "zstd"):  # parquet compresses its own pages
        pt = lines(f"parquet-{codec}", 30)
        write(root / "parquet" / f"c-{codec}.parquet", parquet_bytes(pt, row_group_size=7, compression=codec))
        expected[f"c-{codec}.parquet"] = pt
    return expected


def test_every_format_plain_gzip_zstd_is_read_in_full(tmp_path):
    expected = format_tree(tmp_path)
    write(tmp_path / "parquet" / "outer.parquet.gz", gzip.compress(parquet_bytes(["x"])))
    cfg = config(str(tmp_path))
    files = discover(cfg, tmp_path)
    named = by_name(files)
    assert named["outer.parquet.gz"].status == "unsupported"
    assert "parquet compresses its own pages" in named["outer.parquet.gz"].detail
    docs = read_all(files, cfg)
    assert not [d for d in docs if d.reason]
    for name, texts in expected.items():
        assert named[name].status == "ok", (name, named[name].detail)
        assert texts_of(docs, named[name]) == texts, name
    assert len({d.doc_id for d in docs}) == len(docs)


def test_sharded_parquet_is_chunked_by_row_group(tmp_path):
    texts = [f"row {i} " + "lorem ipsum dolor sit amet " * (1 + i % 5) for i in range(2000)]
    path = write(
        tmp_path / "shard-00000.parquet", parquet_bytes(texts, row_group_size=100, compression="none")
    )
    n_groups = pq.ParquetFile(path).metadata.num_row_groups
    cfg = config(str(path))
    files = discover(cfg, tmp_path)
    chunk_bytes = path.stat().st_size // 6
    chunks = plan_chunks(files, chunk_bytes)
    assert len(chunks) >= 6 and n_groups == 20
    per_chunk = [list(read_chunk(c, files[0], cfg.read)) for c in chunks]
    assert sum(1 for docs in per_chunk if docs) >= 5  # the work is spread over the chunks
    docs = [d for docs in per_chunk for d in docs]
    assert [d.text for d in docs] == texts  # every row exactly once, in file order
    assert [d.offset for d in docs] == list(range(len(texts)))  # offsets are row indices
    whole = list(read_chunk(plan_chunks(files, 1 << 30)[0], files[0], cfg.read))
    assert [d.text for d in whole] == texts


# ------------------------------------------------------------------------------------ bad input, one kind each


def good_neighbours(root: Path) -> dict[str, list[str]]:
    out = {}
    for name in ("before.txt", "zz-after.txt"):
        out[name] = lines(name, 40)
        write(root / name, ("\n".join(out[name]) + "\n").encode())
    return out


def check_neighbours(docs: list[RawDoc], files: list[FileEntry], expected: dict[str, list[str]]) -> None:
    named = by_name(files)
    for name, texts in expected.items():
        assert named[name].status == "ok" and texts_of(docs, named[name]) == texts


def stopped_record(docs: list[RawDoc], entry: FileEntry) -> RawDoc:
    bad = [d for d in docs if d.file_id == entry.file_id and d.reason in FILE_REASONS]
    assert len(bad) == 1, bad
    assert entry.uri in bad[0].detail
    return bad[0]


@pytest.mark.parametrize("kind", ["gzip", "zstd"])
def test_truncated_compressed_file_keeps_the_records_before_the_break(tmp_path, kind):
    neighbours = good_neighbours(tmp_path)
    texts = [f"record {i} " + "steppe wind and open sky " * 8 for i in range(20_000)]
    raw = ("\n".join(texts) + "\n").encode()
    packed = gzip.compress(raw) if kind == "gzip" else zstd_frame(raw)
    name = "broken.txt.gz" if kind == "gzip" else "broken.txt.zst"
    write(tmp_path / name, packed[: len(packed) // 2])
    cfg = config(str(tmp_path))
    files = discover(cfg, tmp_path)
    entry = by_name(files)[name]
    assert entry.status == "ok"  # its head is fine: the break is found while reading
    docs = read_all(files, cfg)
    got = texts_of(docs, entry)
    assert 1000 < len(got) < len(texts) and got == texts[: len(got)]  # a clean prefix was kept
    err = stopped_record(docs, entry)
    assert err.reason == "corrupt_compression" and err.text == "" and err.n_bytes_in == 0
    assert err.offset >= sum(len(t) + 1 for t in got)  # the decompressed byte reached
    assert f"at byte {err.offset} of {entry.uri}" in err.detail
    check_neighbours(docs, files, neighbours)


def test_compressed_file_corrupt_from_the_start_is_reported_corrupt(tmp_path):
    neighbours = good_neighbours(tmp_path)
    write(tmp_path / "garbage.jsonl.gz", b"this was never gzip " * 20)
    cfg = config(str(tmp_path))
    files = discover(cfg, tmp_path)
    entry = by_name(files)["garbage.jsonl.gz"]
    assert entry.status == "corrupt" and "gzip stream cannot be decompressed" in entry.detail
    check_neighbours(read_all(files, cfg), files, neighbours)


def test_binary_files_are_skipped_and_isolated_bad_bytes_counted_per_record(tmp_path):
    neighbours = good_neighbours(tmp_path)
    rng = random.Random(0)
    write(tmp_path / "random.txt", bytes(rng.randrange(256) for _ in range(5000)))
    png = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x01\x00" + bytes(
        rng.randrange(256) for _ in range(3000)
    )
    write(tmp_path / "picture.txt", png)
    write(tmp_path / "utf16.txt", "Қазақ тілі — мемлекеттік тіл.\n".encode("utf-16"))
    mostly_text = "\n".join(lines("mixed", 20)).encode() + b"\nbroken \xff\xfe pair here\n"
    write(tmp_path / "mixed.txt", mostly_text)
    cfg = config(str(tmp_path))
    files = discover(cfg, tmp_path)
    named = by_name(files)
    for name in ("random.txt", "picture.txt", "utf16.txt"):
        assert named[name].status == "binary", (name, named[name].detail)
    assert "not text" in named["random.txt"].detail and "UTF-16" in named["utf16.txt"].detail
    assert named["mixed.txt"].status == "ok"
    docs = read_all(files, cfg)
    mixed = [d for d in docs if d.file_id == named["mixed.txt"].file_id]
    assert len(mixed) == 21 and [d.repaired for d in mixed].count("invalid_utf8") == 1
    assert not [d for d in docs if d.file_id in {named[n].file_id for n in ("random.txt", "picture.txt")}]
    check_neighbours(docs, files, neighbours)
    # with skip, the isolated bad line is a dropped record of its file
    skip = config(str(tmp_path), on_invalid_utf8="skip")
    dropped = [d for d in read_all(discover(skip, tmp_path), skip) if d.reason == "invalid_utf8"]
    assert [d.file_id for d in dropped] == [named["mixed.txt"].file_id]


def test_empty_files_are_listed_as_empty(tmp_path):
    neighbours = good_neighbours(tmp_path)
    write(tmp_path / "zero.txt", b"")
    write(tmp_path / "blank.jsonl", b"\n  \n\t\n")
    write(tmp_path / "nothing.txt.gz", gzip.compress(b""))
    cfg = config(str(tmp_path))
    files = discover(cfg, tmp_path)
    named = by_name(files)
    assert (named["zero.txt"].status, named["zero.txt"].detail) == ("empty", "0 bytes")
    assert (named["blank.jsonl"].status, named["blank.jsonl"].detail) == ("empty", "only whitespace")
    assert named["nothing.txt.gz"].status == "empty" and "after gzip" in named["nothing.txt.gz"].detail
    check_neighbours(read_all(files, cfg), files, neighbours)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_file_without_read_permission_is_unreadable(tmp_path):
    neighbours = good_neighbours(tmp_path)
    locked = write(tmp_path / "locked.txt", b"secret text that nobody may read\n")
    locked.chmod(0)
    cfg = config(str(tmp_path))
    files = discover(cfg, tmp_path)
    entry = by_name(files)["locked.txt"]
    assert entry.status == "unreadable" and "Permission" in entry.detail
    check_neighbours(read_all(files, cfg), files, neighbours)


def test_dangling_link_and_missing_path_are_listed(tmp_path):
    neighbours = good_neighbours(tmp_path)
    (tmp_path / "dangling.txt").symlink_to(tmp_path / "gone.txt")
    cfg = config(str(tmp_path), str(tmp_path / "not-there.jsonl"))
    files = discover(cfg, tmp_path)
    named = by_name(files)
    assert named["dangling.txt"].status == "unreadable"
    assert named["not-there.jsonl"].status == "missing"
    check_neighbours(read_all(files, cfg), files, neighbours)


def test_corrupt_parquet_is_reported_and_the_rows_before_kept(tmp_path):
    neighbours = good_neighbours(tmp_path)
    texts = [f"row {i} of a sharded parquet file" for i in range(400)]
    data = parquet_bytes(texts, row_group_size=100, compression="none")
    write(tmp_path / "cut.parquet", data[: len(data) // 2])  # PAR1 head, no footer
    meta = pq.ParquetFile(pa.BufferReader(data)).metadata
    third = meta.row_group(2).column(0)
    page = third.dictionary_page_offset if third.has_dictionary_page else third.data_page_offset
    smashed = bytearray(data)
    smashed[page : page + 200] = b"\xee" * 200  # the third row group's pages are garbage
    write(tmp_path / "smashed.parquet", bytes(smashed))
    write(tmp_path / "renamed.parquet", b"just some text, not parquet\n")
    cfg = config(str(tmp_path))
    files = discover(cfg, tmp_path)
    named = by_name(files)
    assert named["renamed.parquet"].status == "binary" and "PAR1" in named["renamed.parquet"].detail
    docs = read_all(files, cfg)
    cut = stopped_record(docs, named["cut.parquet"])
    assert cut.reason == "corrupt_parquet" and not texts_of(docs, named["cut.parquet"])
    smash = stopped_record(docs, named["smashed.parquet"])
    assert smash.reason == "corrupt_parquet" and smash.offset == 200  # row 200 starts the third group
    assert texts_of(docs, named["smashed.parquet"]) == texts[:200]
    check_neighbours(docs, files, neighbours)


def test_file_deleted_between_listing_and_reading_is_file_missing_once(tmp_path):
    neighbours = good_neighbours(tmp_path)
    big = write(
        tmp_path / "big.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in lines("b", 3000)).encode()
    )
    cfg = config(str(tmp_path))
    files = discover(cfg, tmp_path)
    chunks = plan_chunks(files, big.stat().st_size // 4)
    assert sum(c.file_id == by_name(files)["big.jsonl"].file_id for c in chunks) >= 4
    big.unlink()
    by_id = {f.file_id: f for f in files}
    docs = [d for c in chunks for d in read_chunk(c, by_id[c.file_id], cfg.read)]
    err = stopped_record(docs, by_name(files)["big.jsonl"])  # one record, not one per chunk
    assert err.reason == "file_missing" and err.offset == 0
    check_neighbours(docs, files, neighbours)


def test_reasons_are_known_to_the_report():
    assert list(READ_REASONS) == STAGE_REASONS["read"]
    assert set(FILE_REASONS) <= set(READ_REASONS) and "corrupt" in FILE_STATUSES
    assert set(FILE_REASON_STATUS) == set(FILE_REASONS) and set(FILE_REASON_STATUS.values()) <= set(
        FILE_STATUSES
    )


def test_reading_task_sniffs_when_the_driver_does_not(tmp_path):
    """read.sniff=reader (the default on object storage): the same verdicts, as one record per file."""
    neighbours = good_neighbours(tmp_path)
    write(tmp_path / "noise.txt", bytes(random.Random(2).randrange(256) for _ in range(4000)))
    write(tmp_path / "blank.txt", b"\n\n   \n")
    write(tmp_path / "garbage.txt.gz", b"never gzip " * 30)
    big = ("\n".join(lines("big", 400)) + "\n").encode()
    write(tmp_path / "big-binary.txt", b"\x00\x01\x02" * 400 + big)  # split into chunks: reported once
    cfg = config(str(tmp_path), sniff="reader")
    files = discover(cfg, tmp_path)
    assert all(f.status == "ok" and not f.sniffed for f in files)
    docs = read_all(files, cfg, chunk_bytes=4096)
    named = by_name(files)
    expected = {
        "noise.txt": "binary_file",
        "blank.txt": "empty_file",
        "garbage.txt.gz": "corrupt_compression",
        "big-binary.txt": "binary_file",
    }
    for name, reason in expected.items():
        rec = stopped_record(docs, named[name])
        assert (rec.reason, rec.offset) == (reason, 0) and not texts_of(docs, named[name])
    check_neighbours(docs, files, neighbours)
    # the driver's verdicts on the same files agree
    driver = discover(config(str(tmp_path), sniff="driver"), tmp_path)
    assert {n: FILE_REASON_STATUS[r] for n, r in expected.items()} == {
        n: by_name(driver)[n].status for n in expected
    }


# ------------------------------------------------------------------------------------------ many files, hashes


def test_two_thousand_file_tree(tmp_path):
    for i in range(2000):
        d = tmp_path / f"part-{i // 100:02d}"
        write(
            d / f"shard-{i:05d}.jsonl", (json.dumps({"text": f"document number {i} of many"}) + "\n").encode()
        )
    write(tmp_path / "part-07" / "shard-99999.jsonl", b"")
    cfg = config(str(tmp_path))
    files = discover(cfg, tmp_path)
    assert len(files) == 2001 and [f.status for f in files].count("ok") == 2000
    assert by_name(files)["shard-99999.jsonl"].status == "empty"
    assert [f.uri for f in files] == sorted(f.uri for f in files)
    docs = read_all(files, cfg)
    assert sorted(d.text for d in docs) == sorted(f"document number {i} of many" for i in range(2000))


def test_stat_hash_follows_every_change_without_reading(tmp_path):
    a = write(tmp_path / "a.txt", b"first version of the text\n")
    write(tmp_path / "b.txt", b"another file\n")
    cfg = config(str(tmp_path))
    before = input_sha256(discover(cfg, tmp_path), "stat")
    assert input_sha256(discover(cfg, tmp_path), "stat") == before
    content = input_sha256(discover(cfg, tmp_path), "content")
    st = a.stat()
    a.write_bytes(b"FIRST VERSION OF THE TEXT\n")  # same size, new content
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert input_sha256(discover(cfg, tmp_path), "stat") != before
    assert input_sha256(discover(cfg, tmp_path), "content") != content
    changed = input_sha256(discover(cfg, tmp_path), "stat")
    write(tmp_path / "c.txt", b"a new file\n")
    assert input_sha256(discover(cfg, tmp_path), "stat") != changed
    assert config(str(tmp_path)).read.input_hash == "stat"
    with pytest.raises(ValueError, match="'metadata'"):
        input_sha256([], "metadata")


# -------------------------------------------------------------------------------------------------------- S3


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """One moto server for the module; pyarrow and boto3 find it through AWS_ENDPOINT_URL."""
    pytest.importorskip("moto")
    with stack.s3_server(tmp_path_factory.mktemp("moto")) as url, pytest.MonkeyPatch.context() as env:
        for k, v in {
            "AWS_ENDPOINT_URL": url,
            "AWS_ACCESS_KEY_ID": "tulpar-test",
            "AWS_SECRET_ACCESS_KEY": "tulpar-test-secret",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }.items():
            env.setenv(k, v)
        client = boto3.client("s3")
        client.create_bucket(Bucket=BUCKET)
        yield client


def put_tree(client, prefix: str, root: Path) -> None:
    for p in sorted(root.rglob("*")):
        if p.is_file():
            client.put_object(Bucket=BUCKET, Key=f"{prefix}/{p.relative_to(root)}", Body=p.read_bytes())


def test_s3_prefix_with_every_format_and_bad_object(s3, tmp_path):
    local = tmp_path / "tree"
    expected = format_tree(local)
    rng = random.Random(1)
    write(local / "bad" / "empty.txt", b"")
    write(local / "bad" / "noise.txt", bytes(rng.randrange(256) for _ in range(2000)))
    raw = ("\n".join(lines("cut", 5000)) + "\n").encode()
    write(local / "bad" / "cut.txt.zst", zstd_frame(raw)[:4000])
    write(local / "bad" / "deleted.jsonl", b'{"text": "read it before it goes"}\n')
    put_tree(s3, "mixed", local)
    cfg = config(f"s3://{BUCKET}/mixed", f"s3://{BUCKET}/no-such-prefix")
    files = discover(cfg, local)
    named = by_name(files)
    assert named["no-such-prefix"].status == "missing"
    assert named["empty.txt"].status == "empty"  # 0 bytes in the listing
    assert not any(f.sniffed for f in files)  # nothing was opened on the driver
    assert all(f.uri.startswith(f"s3://{BUCKET}/mixed/") for f in files if f.status != "missing")
    assert all(f.mtime_ns > 0 for f in files if f.status == "ok")
    s3.delete_object(Bucket=BUCKET, Key="mixed/bad/deleted.jsonl")  # listed, sniffed, then gone
    docs = read_all(files, cfg)
    for name, texts in expected.items():
        assert texts_of(docs, named[name]) == texts, name
    gone = stopped_record(docs, named["deleted.jsonl"])
    assert gone.reason == "file_missing" and "deleted after it was listed" in gone.detail
    noise = stopped_record(docs, named["noise.txt"])  # found by the reading task
    assert noise.reason == "binary_file" and noise.offset == 0 and "not text" in noise.detail
    cut = stopped_record(docs, named["cut.txt.zst"])
    assert cut.reason == "corrupt_compression"
    assert (
        texts_of(docs, named["cut.txt.zst"])
        == lines("cut", 5000)[: len(texts_of(docs, named["cut.txt.zst"]))]
    )


def test_s3_prefix_of_three_hundred_objects(s3):
    for i in range(300):
        body = "".join(json.dumps({"text": f"object {i} line {j}"}) + "\n" for j in range(3))
        s3.put_object(Bucket=BUCKET, Key=f"many/part-{i:04d}.jsonl", Body=body.encode())
    s3.put_object(Bucket=BUCKET, Key="many/part-9999.jsonl", Body=b"")
    cfg = config(f"s3://{BUCKET}/many")
    files = discover(cfg, Path("/nonexistent"))
    assert len(files) == 301 and [f.status for f in files].count("ok") == 300
    docs = read_all(files, cfg)
    assert len(docs) == 900 and not [d for d in docs if d.reason]
    assert sorted(d.text for d in docs) == sorted(
        f"object {i} line {j}" for i in range(300) for j in range(3)
    )
