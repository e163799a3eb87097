"""TokenStream: a dataset's shards read as one token stream without loading them (llm_core/data.py, shards.py)."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import tempfile
import textwrap

import numpy as np
import pytest

from llm_core.data import DataError, RandomWindows, TokenStream, sequential_windows
from llm_core.shards import ShardWriter, TokenDataset, build_manifest
from tests.conftest import REPO

EOS = 0


def write_dataset(root, shard_sizes, *, seed=0, vocab_size=4096, val_sizes=(7,)):
    """A one-language dataset whose train split has shards of the given token counts (0 = an empty shard), each
    shard one document of random ids ending with eos; returns the train tokens concatenated in manifest order."""
    rng = np.random.default_rng(seed)
    infos, train = [], []
    for split, sizes in (("train", shard_sizes), ("val", val_sizes)):
        for index, n in enumerate(sizes):
            w = ShardWriter(root, split, "kk", index, dtype="uint16", eos_id=EOS, vocab_size=vocab_size)
            if n:
                toks = rng.integers(1, vocab_size, n, dtype=np.uint16)
                toks[-1] = EOS
                w.add_tokens_with_eos(toks, num_bytes=3 * n)
                if split == "train":
                    train.append(toks)
            infos.append(w.close())
    manifest = build_manifest(
        name="synthetic",
        created="2026-01-01T00:00:00+00:00",
        config={},
        config_sha256="c" * 64,
        input_sha256="i" * 64,
        tokenizer={"path": "tok", "sha256": "s" * 64, "vocab_size": vocab_size, "eos_id": EOS},
        languages=["kk"],
        shards=infos,
        mixture={},
    )
    (root / "manifest.json").write_text(json.dumps(manifest))
    return np.concatenate(train) if train else np.zeros(0, np.uint16)


SIZES = [5, 0, 1, 300, 0, 0, 17, 1000, 2, 0, 64]  # empty shards first, in between and last-but-one


def test_slices_equal_the_concatenation_across_shards_and_empty_shards(tmp_path):
    ref = write_dataset(tmp_path, [0, *SIZES, 0])
    stream = TokenDataset.open(tmp_path, verify=True).tokens("train")
    assert isinstance(stream, TokenStream) and len(stream) == len(ref) == sum(SIZES)
    assert stream.dtype == ref.dtype
    rng = np.random.default_rng(1)
    n = len(ref)
    bounds = [(int(a), int(b)) for a, b in rng.integers(-n - 20, n + 20, (2000, 2))]
    edges = np.cumsum(SIZES).tolist()  # every shard boundary, each side
    bounds += [(e - k, e + j) for e in edges for k in (0, 1, 2) for j in (0, 1, 600)]
    bounds += [(0, n), (None, None), (n, n), (n - 1, None), (None, 1), (-5, None), (10, 3)]
    for a, b in bounds:
        got = stream[a:b]
        assert isinstance(got, np.ndarray) and got.dtype == ref.dtype
        np.testing.assert_array_equal(got, ref[a:b], err_msg=f"[{a}:{b}]")
    for i in [0, 4, 5, 6, 305, n - 1, -1, -n, *rng.integers(-n, n, 200).tolist()]:
        assert stream[i] == ref[i] and stream[np.int64(i)] == ref[i]


def test_reads_only_what_is_asked_and_keeps_few_files_open(tmp_path):
    ref = write_dataset(tmp_path, [10] * 12)
    paths = [(tmp_path / f"shards/train-kk-{i:05d}.bin", 10) for i in range(12)]
    stream = TokenStream(paths, np.uint16, max_open=3)
    for a in range(0, 115, 7):  # many shards in turn: at most three stay open, reads stay right
        np.testing.assert_array_equal(stream[a : a + 9], ref[a : a + 9])
        assert len(stream._open) <= 3
    stream.close()
    np.testing.assert_array_equal(stream[95:120], ref[95:120])  # reopens what it needs
    copy = pickle.loads(pickle.dumps(stream))  # e.g. shipped to a Ray worker: reopens its files there
    assert copy.max_open == 3 and len(copy) == 120
    np.testing.assert_array_equal(copy[3:117], ref[3:117])


def test_misuse_and_damaged_files_are_named_errors(tmp_path):
    write_dataset(tmp_path, [10, 20])
    ds = TokenDataset.open(tmp_path)
    stream = ds.tokens("train")
    with pytest.raises(TypeError, match=r"stream\[a:b\]"):
        np.asarray(stream)  # never materialised by accident
    with pytest.raises(IndexError, match="step 1"):
        stream[::2]
    with pytest.raises(IndexError, match="out of range"):
        stream[30]
    with pytest.raises(TypeError, match="ints or contiguous slices"):
        stream["a"]
    (tmp_path / "shards/train-kk-00001.bin").write_bytes(b"\0" * 10)  # truncated after open: 5 of 20 tokens
    np.testing.assert_array_equal(stream[0:10], ds.tokens("train")[0:10])  # the first shard still reads
    with pytest.raises(DataError, match=r"train-kk-00001.bin ended early.*re-run preprocessing"):
        stream[8:20]
    (tmp_path / "shards/train-kk-00001.bin").unlink()
    with pytest.raises(DataError, match=r"train-kk-00001.bin is missing"):
        ds.tokens("train")[25]
    assert len(TokenStream([], np.uint16)) == 0 and TokenStream([], np.uint16)[:].size == 0


@pytest.mark.parametrize("world_size,accum", [(1, 1), (2, 2)])
def test_windows_over_the_stream_equal_windows_over_the_concatenated_array(tmp_path, world_size, accum):
    ref = write_dataset(tmp_path, SIZES * 4)
    stream = TokenDataset.open(tmp_path).tokens("train")
    for rank in range(world_size):
        on_disk = RandomWindows(stream, 24, 4, seed=7, rank=rank, world_size=world_size)
        in_memory = RandomWindows(ref, 24, 4, seed=7, rank=rank, world_size=world_size)
        assert on_disk.num_windows == in_memory.num_windows
        for step in range(40):
            for (x1, y1), (x2, y2) in zip(
                on_disk.batches_at(step, accum), in_memory.batches_at(step, accum), strict=True
            ):
                assert x1.dtype == x2.dtype and x1.shape == (4, 24)
                assert x1.equal(x2) and y1.equal(y2)
    for (x1, y1), (x2, y2) in zip(sequential_windows(stream, 50), sequential_windows(ref, 50), strict=True):
        assert x1.equal(x2) and y1.equal(y2)


RSS_PROBE = textwrap.dedent(
    """
    import json, sys
    from llm_core.data import RandomWindows
    from llm_core.shards import TokenDataset

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    RandomWindows  # imported: torch and numpy are part of the baseline
    before = status("VmHWM")
    ds = TokenDataset.open(sys.argv[1])
    sampler = RandomWindows(ds.tokens("train"), 256, 8, seed=0)
    for step in range(int(sys.argv[2])):
        sampler.next_step()
    print(json.dumps({"growth": status("VmHWM") - before, "rss_file": status("RssFile")}))
    """
)


def peak_rss_growth(dataset, batches: int) -> int:
    out = subprocess.run(
        [sys.executable, "-c", RSS_PROBE, str(dataset), str(batches)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["growth"]


def test_sampling_memory_does_not_grow_with_the_dataset(tmp_path):
    # 5M vs 50M uint16 tokens (10 vs 100 MB) in 25 shards each; 100 steps x 8 windows x 257 tokens each. Peak RSS
    # growth measured on the 2-core dev machine, small vs large: concatenating the shards (before TokenStream)
    # 18 vs 190 MB; np.memmap per shard 14 vs 97 MB (every page a window touches, and the pages the kernel maps
    # around it, stay resident); TokenStream 4 vs 4 MB.
    small, large = tmp_path / "small", tmp_path / "large"
    small.mkdir(), large.mkdir()
    write_dataset(small, [200_000] * 25, val_sizes=(0,))
    write_dataset(large, [2_000_000] * 25, val_sizes=(0,))
    growth_small = peak_rss_growth(small, 100)
    growth_large = peak_rss_growth(large, 100)
    mb = 1 << 20
    assert growth_large - growth_small < 4 * mb, (growth_small / mb, growth_large / mb)
    assert growth_large < 16 * mb, growth_large / mb  # the windows, the generator, a few open files


def test_sampler_benchmark_writes_a_valid_dataset_and_measures_both_readers(tmp_path, capsys, monkeypatch):
    from benchmarks.datascale import sampler

    argv = [
        "--tokens",
        "3e5",
        "--shards",
        "5",
        "--compare-tokens",
        "1e5",
        "--batches",
        "3",
        "--seq-len",
        "64",
    ]
    rows = sampler.main([*argv, "--dir", str(tmp_path), "--keep"])
    assert [(r["reader"], r["tokens"], r["shards"]) for r in rows] == [
        ("stream", 100_000, 5),
        ("concatenated", 100_000, 5),
        ("stream", 300_000, 5),
    ]
    assert all(r["first_batch_s"] > 0 and r["peak_rss_beyond_baseline_mib"] >= 0 for r in rows)
    table = capsys.readouterr().out
    assert table.count("| stream | ") == 2 and "| concatenated | 300,000 | 5 | not run" in table
    ds = TokenDataset.open(
        tmp_path / "synthetic-300000", verify=True
    )  # what preprocessing would have written
    assert ds.num_tokens("train") == 300_000 and ds.vocab_size == 32_000 and ds.dtype == np.uint16
    assert [len(ds.shards("train", lang)) for lang in ds.languages] == [
        3,
        1,
        1,
    ]  # kk/ru/en 40/30/30, >= 1 each
    assert ds.tokens("train")[:].max() < 32_000
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    sampler.main([*argv, "--compare-tokens", "0", "--batches", "1"])  # in a temporary dir, removed afterwards
    assert not list(scratch.iterdir())


def test_random_windows_are_always_full_even_at_the_end_of_the_stream():
    """With seq_len + 3 tokens there are 3 valid starts; the draw also yields the one-past-the-end value (the
    failure a pretraining run hit on step 10 of seed 1337): every window must still hold seq_len + 1 tokens."""
    tokens = np.arange(64 + 3, dtype=np.uint16)
    sampler = RandomWindows(tokens, 64, 8, seed=1337)
    for step in range(50):
        ((inputs, targets),) = sampler.batches_at(step)
        assert inputs.shape == targets.shape == (8, 64)
        assert int(inputs[:, 0].max()) <= 2  # starts 0, 1, 2 only
