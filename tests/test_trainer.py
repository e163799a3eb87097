import math

import numpy as np
import pytest
import torch

from llm_core.data import DataError, RandomWindows
from llm_core.model import Transformer
from llm_core.optim import lr_multiplier
from llm_core.trainer import EvalSet, TrainConfig, Trainer, TrainingError
from tests.conftest import small_config, small_moe_config

TOKENS = np.random.default_rng(0).integers(0, 256, 20_000).astype(np.uint16)


def trainer(cfg=None, seed=0, **train_kw):
    torch.manual_seed(seed)
    tcfg = TrainConfig(
        **{
            "steps": 6,
            "batch_size": 4,
            "seq_len": 32,
            "lr": 1e-3,
            "warmup_steps": 2,
            "eval_every": 3,
            "eval_windows": 4,
            "log_every": 1,
            **train_kw,
        }
    )
    return Trainer(Transformer(cfg or small_config()), tcfg)


@pytest.mark.parametrize("make_cfg", [small_config, small_moe_config], ids=["dense", "moe"])
def test_grad_accumulation_equals_big_batch(make_cfg):
    cfg = make_cfg()
    x = torch.randint(0, 256, (8, 32))
    y = torch.randint(0, 256, (8, 32))
    y[:3, :10] = -100  # unequal target counts per micro-batch must still weigh every token equally
    big, small = trainer(cfg), trainer(cfg)
    big.model.load_state_dict(small.model.state_dict())
    grads = {}
    for name, t in (("big", big), ("small", small)):  # capture the (clipped) gradients the optimizer sees
        real_step = t.optimizer.step

        def step(*a, _t=t, _name=name, _real=real_step, **k):
            grads[_name] = [p.grad.clone() for p in _t.model.parameters()]
            return _real(*a, **k)

        t.optimizer.step = step
    m1 = big.train_step([(x, y)])
    m2 = small.train_step([(x[i : i + 2], y[i : i + 2]) for i in range(0, 8, 2)])
    if not cfg.is_moe:
        assert math.isclose(m1["loss"], m2["loss"], rel_tol=1e-6)
        assert math.isclose(m1["grad_norm"], m2["grad_norm"], rel_tol=1e-5)
        for a, b in zip(grads["big"], grads["small"]):
            torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-4)
    else:  # MoE's aux loss is per micro-batch by nature; the CE gradient still matches closely
        assert math.isclose(m1["loss"], m2["loss"], rel_tol=2e-3)
        for a, b in zip(grads["big"], grads["small"]):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-2)


def test_resume_is_bit_identical(tmp_path):
    eval_sets = [EvalSet("all", TOKENS[:2000], 1.0)]
    straight = trainer()
    sampler = RandomWindows(TOKENS, 32, 4, seed=1)
    res = straight.fit(sampler, eval_sets, checkpoint_root=tmp_path / "a", progress=False)
    losses = [h["loss"] for h in res.history if "loss" in h]

    first = trainer(steps=6)
    first.cfg = first.cfg.model_copy(update={"steps": 3})  # stop half way, as if interrupted
    s1 = RandomWindows(TOKENS, 32, 4, seed=1)
    r1 = first.fit(s1, eval_sets, checkpoint_root=tmp_path / "b", progress=False)
    resumed = trainer(seed=99)  # different init: everything must come from the checkpoint
    s2 = RandomWindows(TOKENS, 32, 4, seed=1)
    resumed.resume(tmp_path / "b" / "last", s2)
    assert resumed.step == 3 and s2.step == 3
    r2 = resumed.fit(s2, eval_sets, checkpoint_root=tmp_path / "b", progress=False)
    resumed_losses = [h["loss"] for h in r1.history + r2.history if "loss" in h]
    assert resumed_losses == losses
    assert (tmp_path / "b" / "best" / "meta.json").is_file()


def test_training_reduces_loss_and_reports_bpb():
    t = trainer(steps=30, lr=3e-3)
    # a learnable stream: a repeating pattern
    tokens = np.tile(np.arange(50, dtype=np.uint16), 400)
    before = t.evaluate([EvalSet("x", tokens[:1000], 2.0)])
    t.fit(RandomWindows(tokens, 32, 4), [EvalSet("x", tokens[:1000], 2.0)], progress=False)
    after = t.evaluate([EvalSet("x", tokens[:1000], 2.0)])
    assert after["val_loss/x"] < before["val_loss/x"] * 0.5
    assert math.isclose(after["val_bpb/x"], after["val_loss/x"] / math.log(2) / 2.0)


def test_nan_loss_is_a_clear_error():
    t = trainer()
    with torch.no_grad():
        t.model.embed_tokens.weight.fill_(float("nan"))
    x = torch.randint(0, 256, (2, 32))
    with pytest.raises(TrainingError, match="loss became nan at step 1: lower the learning rate"):
        t.train_step([(x, x)])


def test_not_enough_tokens():
    with pytest.raises(
        DataError, match="not enough tokens in the train data for one training batch: need 129"
    ):
        RandomWindows(np.zeros(100, dtype=np.uint16), 128, 2)


def test_tokens_per_step_sets_accumulation():
    cfg = TrainConfig(batch_size=4, seq_len=64, tokens_per_step=4 * 64 * 2 * 3)
    assert cfg.accum_steps(world_size=2) == 3


def test_lr_schedules():
    kw = dict(total_steps=100, warmup_steps=10, min_lr_ratio=0.1, decay_fraction=0.2)
    assert lr_multiplier(0, schedule="cosine", **kw) == pytest.approx(0.1)
    assert lr_multiplier(9, schedule="cosine", **kw) == pytest.approx(1.0)
    assert lr_multiplier(100, schedule="cosine", **kw) == pytest.approx(0.1)
    assert lr_multiplier(50, schedule="wsd", **kw) == 1.0
    assert lr_multiplier(90, schedule="wsd", **kw) == pytest.approx(0.55)
    with pytest.raises(ValueError, match="unknown lr schedule"):
        lr_multiplier(50, schedule="linear", **kw)


def test_sampler_is_world_size_and_accumulation_invariant():
    one = RandomWindows(TOKENS, 16, 8, seed=5)
    accum = RandomWindows(TOKENS, 16, 4, seed=5)
    ranks = [RandomWindows(TOKENS, 16, 4, seed=5, rank=r, world_size=2) for r in range(2)]
    for _ in range(3):
        (x1, y1) = one.next_step()[0]
        x_acc = torch.cat([x for x, _ in accum.next_step(2)])
        x_ranks = torch.cat([r.next_step()[0][0] for r in ranks])
        assert torch.equal(x1, x_acc) and torch.equal(x1, x_ranks)
        assert torch.equal(x1[:, 1:], y1[:, :-1])


def test_grad_accumulation_equals_big_batch_after_several_steps():
    """batch 8 x accum 1 and batch 4 x accum 2 over 5 optimizer steps on the same windows."""
    big, small = trainer(batch_size=8), trainer(batch_size=4, grad_accum_steps=2)
    small.model.load_state_dict(big.model.state_dict())
    s_big, s_small = RandomWindows(TOKENS, 32, 8, seed=2), RandomWindows(TOKENS, 32, 4, seed=2)
    for _ in range(5):
        big.train_step(s_big.next_step(big.accum))
        small.train_step(s_small.next_step(small.accum))
    # Adam normalises tiny float-summation differences, so parameters agree to ~1e-6, not bit for bit
    for a, b in zip(big.model.parameters(), small.model.parameters()):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=0)


def test_moe_training_reports_aux_loss_and_expert_utilisation():
    t = trainer(small_moe_config(num_experts=4), steps=3)
    logged = []
    t.fit(
        RandomWindows(TOKENS, 32, 4),
        [EvalSet("x", TOKENS[:2000], 1.0)],
        on_log=lambda s, m: logged.append(m),
        progress=False,
    )
    assert all(m["aux_loss"] > 0 for m in logged)
    assert all(1.0 <= m["expert_load_max"] <= 4.0 and m["experts_used_fraction"] == 1.0 for m in logged)


def test_evaluate_reports_the_loss_functions_metrics():
    from llm_core.trainer import EvalBatches

    def loss_fn(model, batch):
        out = model(batch["input_ids"], batch["targets"])
        return out.loss, {"ce_loss": float(out.ce_loss), "custom": 2.0}

    t = Trainer(Transformer(small_config()), TrainConfig(steps=1, batch_size=2, seq_len=16), loss_fn=loss_fn)
    x = torch.randint(0, 256, (2, 16))
    m = t.evaluate([EvalBatches("set", [{"input_ids": x, "targets": x}])])
    assert m["val_custom/set"] == 2.0 and m["val_loss"] == m["val_loss/set"]


def test_on_step_sees_every_optimizer_step_and_on_log_every_log_every():
    """A progress bar drawn elsewhere (the Ray driver) moves with on_step; the step lines come from on_log."""
    t = trainer(steps=7, log_every=3, eval_every=100)
    stepped, logged = [], []
    t.fit(
        RandomWindows(TOKENS, 32, 4),
        [],
        on_step=lambda step, m: stepped.append((step, m["loss"])),
        on_log=lambda step, m: logged.append(step),
        progress=False,
    )
    assert [s for s, _ in stepped] == list(range(1, 8))
    assert all(math.isfinite(loss) for _, loss in stepped)
    assert logged == [3, 6, 7]
