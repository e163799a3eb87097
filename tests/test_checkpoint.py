import pytest
import torch

from llm_core.checkpoint import load_checkpoint, load_model_from_checkpoint, save_checkpoint
from llm_core.model import Transformer
from llm_core.optim import build_optimizer, build_scheduler
from tests.conftest import small_config


def make(seed=0):
    torch.manual_seed(seed)
    cfg = small_config()
    model = Transformer(cfg)
    opt = build_optimizer(model, 1e-3, 0.1, (0.9, 0.95))
    sched = build_scheduler(
        opt, total_steps=10, warmup_steps=2, schedule="cosine", min_lr_ratio=0.1, decay_fraction=0.2
    )
    return cfg, model, opt, sched


def step(model, opt, sched, x):
    loss = model(x, x).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    sched.step()
    return loss.item()


def test_save_load_is_exact(tmp_path):
    cfg, model, opt, sched = make()
    x = torch.randint(0, 256, (2, 16))
    for _ in range(3):
        step(model, opt, sched, x)
    save_checkpoint(
        tmp_path / "last",
        model=model,
        step=3,
        config={"model": cfg.model_dump()},
        optimizer=opt,
        scheduler=sched,
        data_state={"step": 3, "seed": 0, "rank": 0},
    )
    noise_after = torch.rand(3)  # RNG stream after the save
    expected_next = step(model, opt, sched, x)

    _, model2, opt2, sched2 = make(seed=123)  # different init, restored below
    state = load_checkpoint(tmp_path / "last", model=model2, optimizer=opt2, scheduler=sched2)
    assert state["step"] == 3 and state["data"]["step"] == 3
    assert torch.equal(torch.rand(3), noise_after)
    assert step(model2, opt2, sched2, x) == expected_next  # bit-identical next step


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    cfg, model, opt, sched = make()
    save_checkpoint(tmp_path / "last", model=model, step=1, config={"model": cfg.model_dump()})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)

    real_save = torch.save

    def crash(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path / "last", model=model, step=2, config={"model": cfg.model_dump()})
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["last"], "no temp dirs left behind"
    restored = load_model_from_checkpoint(tmp_path / "last")
    for k, v in restored.state_dict().items():
        assert torch.equal(v, before[k])


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="not a Tulpar checkpoint"):
        load_model_from_checkpoint(tmp_path)
