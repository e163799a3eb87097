"""Training artifacts under faults: a full disk while writing a checkpoint or an HF export leaves the previous one
intact and loadable, with an error naming the path and the space needed; a corrupt or foreign artifact (truncated
safetensors, a shard of the wrong size, a changed tokenizer, a checkpoint of another architecture) is an error naming
the file before any work starts."""

import errno
import json
import re
import shutil
from collections import namedtuple

import pytest
import torch

import llm_core.checkpoint as checkpoint_module
import llm_core.export_hf as export_module
from llm_core.checkpoint import load_checkpoint, save_checkpoint
from llm_core.export_hf import export_hf, read_tensors, to_hf_state_dict
from llm_core.io import StorageFullError, tensor_bytes
from llm_core.model import Transformer
from tests.conftest import small_config


def model(seed: int) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(small_config())


def no_stray_temporaries(parent) -> None:
    assert sorted(p.name for p in parent.iterdir() if p.name.startswith(".")) == []


def test_a_full_disk_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    good = model(0)
    path = tmp_path / "last"
    save_checkpoint(path, model=good, step=3, config={"run": 1})

    real_save = torch.save

    def save_half_then_fail(obj, f, *a, **k):  # the disk fills up part way through the file
        real_save({"partial": torch.zeros(10)}, f)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module.torch, "save", save_half_then_fail)
    newer = model(1)
    with pytest.raises(StorageFullError) as info:
        save_checkpoint(path, model=newer, step=4, config={"run": 1})
    monkeypatch.undo()
    message = str(info.value)
    needed = tensor_bytes(newer.state_dict())
    assert info.value.errno == errno.ENOSPC and isinstance(info.value, ValueError)  # a user error: exit 2
    assert str(path) in message and f"about {needed / 1e6:,.1f} MB needed" in message and "MB free" in message
    state = load_checkpoint(path)  # the previous checkpoint, whole
    assert state["step"] == 3
    for k, v in good.state_dict().items():
        assert torch.equal(state["model_state"][k], v), k
    no_stray_temporaries(tmp_path)


def test_a_full_disk_while_exporting_keeps_the_previous_export(tmp_path, monkeypatch):
    first = model(0)
    out = export_hf(first, tmp_path / "hf")

    def fail(*a, **k):
        raise OSError(errno.EDQUOT, "Disk quota exceeded")

    monkeypatch.setattr(export_module, "save_file", fail)
    with pytest.raises(StorageFullError, match=r"no space left to write .*hf \(Disk quota exceeded\)"):
        export_hf(model(1), out)
    monkeypatch.undo()
    from safetensors.torch import load_file

    kept = load_file(out / "model.safetensors")  # the previous export, whole: the first model's tensors
    expected = to_hf_state_dict(first)
    assert kept.keys() == expected.keys() and all(torch.equal(kept[k], expected[k]) for k in kept)
    assert (out / "config.json").is_file()
    no_stray_temporaries(tmp_path)


def test_too_little_free_space_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    path = tmp_path / "last"
    save_checkpoint(path, model=model(0), step=1, config={})
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    writes = []
    monkeypatch.setattr(checkpoint_module.torch, "save", lambda *a, **k: writes.append(a))
    with pytest.raises(StorageFullError, match=r"MB needed, 0\.0 MB free on"):
        save_checkpoint(path, model=model(1), step=2, config={})
    assert writes == []
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    no_stray_temporaries(tmp_path)


def test_other_write_errors_propagate_unchanged_and_leave_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last"
    save_checkpoint(path, model=model(0), step=1, config={})

    def fail(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(checkpoint_module.torch, "save", fail)
    with pytest.raises(PermissionError):
        save_checkpoint(path, model=model(1), step=2, config={})
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    no_stray_temporaries(tmp_path)


# ------------------------------------------------------------------------------------------ corrupt artifacts


def test_a_truncated_safetensors_file_is_an_error_naming_the_file(tmp_path):
    out = export_hf(model(0), tmp_path / "hf")
    weights = out / "model.safetensors"
    whole = weights.read_bytes()
    for cut, why in (
        (len(whole) - 100, r"is truncated: [\d,]+ bytes, its header says"),
        (5, "is truncated: 5 bytes, not even a safetensors header"),
    ):
        weights.write_bytes(whole[:cut])
        with pytest.raises(ValueError, match=rf"{re.escape(str(weights))} {why}.*re-export or re-download"):
            read_tensors([weights])  # what load_hf / read_hf_checkpoint read weights with
    weights.write_bytes(whole + b"\0")
    with pytest.raises(ValueError, match="longer than its header says"):
        read_tensors([weights])
    weights.write_bytes(whole)
    assert read_tensors([weights]).keys() == to_hf_state_dict(model(0)).keys()


def test_a_shard_whose_size_disagrees_with_the_manifest_is_refused_on_open(tmp_path):
    from llm_core.data import DataError
    from llm_core.shards import TokenDataset
    from tests.test_shards import make_dataset

    make_dataset(tmp_path)
    shard = tmp_path / "shards" / "train-kk-00000.bin"
    shard.write_bytes(shard.read_bytes()[:-2])  # one uint16 token short
    with pytest.raises(DataError, match=rf"shard {re.escape(str(shard))} has \d+ bytes, manifest says \d+"):
        TokenDataset.open(tmp_path)


def test_a_tokenizer_whose_hash_differs_from_the_datasets_is_refused(tmp_path):
    from types import SimpleNamespace

    from jobs.pretrain import check_inputs
    from llm_core.data import DataError
    from llm_core.shards import TokenDataset
    from llm_core.tokenizer import train_bpe
    from tests.test_shards import make_dataset

    tok_dir = train_bpe(["салем әлем", "привет мир", "hello world"] * 20, 300).save(tmp_path / "tok")
    make_dataset(tmp_path / "ds")
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    manifest["tokenizer"]["path"] = str(tok_dir)  # the dataset records another tokenizer's sha256
    (tmp_path / "ds" / "manifest.json").write_text(json.dumps(manifest))
    cfg = SimpleNamespace(data=SimpleNamespace(languages=None), train=SimpleNamespace(seq_len=2))
    with pytest.raises(DataError, match=rf"tokenizer at {re.escape(str(tok_dir))} changed since the dataset"):
        check_inputs(cfg, TokenDataset.open(tmp_path / "ds"))


def test_resuming_a_checkpoint_of_another_architecture_names_the_tensor_and_both_shapes(tmp_path):
    from llm_core.data import RandomWindows
    from llm_core.trainer import TrainConfig, Trainer

    save_checkpoint(tmp_path / "wide", model=model(0), step=1, config={})
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "deep", model=Transformer(small_config(num_layers=3)), step=1, config={})
    narrow = Trainer(Transformer(small_config(dim=32, num_heads=2, num_kv_heads=1)), TrainConfig(steps=2))
    first = next(k for k, v in narrow.model.state_dict().items() if v.shape != model(0).state_dict()[k].shape)
    sampler = RandomWindows(torch.arange(1000).numpy().astype("uint16"), 8, 2)
    state = tmp_path / "wide" / "state.pt"
    with pytest.raises(
        ValueError,
        match=rf"{re.escape(str(state))} is from another architecture: tensor "
        rf"'{re.escape(first)}' has shape \(\d+(, \d+)*\) there, the model expects \(\d+(, \d+)*\)",
    ):
        narrow.resume(tmp_path / "wide", sampler)
    with pytest.raises(
        ValueError, match=r"has tensor 'layers\.2\.[^']+' the model lacks \(0 missing, \d+ unexp"
    ):
        load_checkpoint(tmp_path / "deep", model=model(0))
