"""The DeepSeek-V3 router option (router_score: sigmoid): routing and outputs equal transformers' DeepseekV3MoE,
auxiliary-loss-free balancing moves load toward uniform, the trainer updates and logs the bias, and the
DeepSeek-V3 export helpers (config keys, key map) load in transformers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from llm_core.config import ModelConfig
from llm_core.data import RandomWindows
from llm_core.export_hf import (
    _split_fused_experts,
    check_deepseek_v3_moe,
    deepseek_v3_moe_config,
    deepseek_v3_moe_key_plan,
)
from llm_core.model import MoE, Transformer
from llm_core.trainer import EvalSet, TrainConfig, Trainer
from tests.conftest import small_moe_config

TOKENS = np.random.default_rng(0).integers(0, 256, 20_000).astype(np.uint16)


def deepseek_moe_config(**overrides) -> ModelConfig:
    base = dict(router_score="sigmoid", shared_expert_gate=False, routed_scaling_factor=2.5)
    return small_moe_config(**{**base, **overrides})


def hf_deepseek_config(cfg: ModelConfig, **extra):
    from transformers import DeepseekV3Config

    return DeepseekV3Config(
        hidden_size=cfg.dim,
        intermediate_size=cfg.ffn_hidden_dim,
        hidden_act="silu",
        **deepseek_v3_moe_config(cfg),
        **extra,
    )


def our_layer_state(
    cfg: ModelConfig, hf_tensors: dict[str, torch.Tensor], layer: int = 0
) -> dict[str, torch.Tensor]:
    """Our MoE module's state dict from HF tensors named as `deepseek_v3_moe_key_plan` says."""
    prefix = f"layers.{layer}.mlp."
    state: dict[str, torch.Tensor] = {}
    experts: dict[str, list] = {}
    for m in deepseek_v3_moe_key_plan(cfg, layer):
        name = m.ours.removeprefix(prefix)
        if m.expert is None:
            state[name] = hf_tensors[m.hf]
        else:
            experts.setdefault(name, [None] * cfg.num_experts)[m.expert] = hf_tensors[m.hf]
    return {**state, **{k: torch.stack(v) for k, v in experts.items()}}


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_sigmoid_router_equals_transformers_deepseek_v3_moe(norm_topk_prob):
    """Same weights (HF's fused experts split by the importer, then mapped by the DeepSeek-V3 key plan): the same
    experts per token, the same weights, the same output; and the bias changes which experts are picked."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    cfg = deepseek_moe_config(num_experts=8, num_experts_per_token=2, norm_topk_prob=norm_topk_prob)
    torch.manual_seed(0)
    hf = DeepseekV3MoE(hf_deepseek_config(cfg)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.1)
        hf.gate.e_score_correction_bias.copy_(torch.tensor([0.3, -0.2, 0.1, 0.0, -0.1, 0.2, 0.05, -0.3]))
    tensors = {f"model.layers.0.mlp.{k}": v.clone() for k, v in hf.state_dict().items()}
    _split_fused_experts(tensors, cfg)  # fused gate_up_proj/down_proj -> per-expert keys, as load_hf does
    ours = MoE(cfg).eval()
    ours.load_state_dict(our_layer_state(cfg, tensors), strict=True)
    assert ours.router_bias.dtype == torch.float32

    x = torch.randn(3, 7, cfg.dim)
    with torch.no_grad():
        _, hf_w, hf_e = hf.gate(x)
        _, our_w, our_e = ours.route(x.view(-1, cfg.dim))
        hf_order, our_order = hf_e.argsort(dim=-1), our_e.argsort(dim=-1)
        assert torch.equal(hf_e.gather(1, hf_order), our_e.gather(1, our_order))  # same experts per token
        torch.testing.assert_close(our_w.gather(1, our_order), hf_w.gather(1, hf_order), rtol=0, atol=1e-6)
        torch.testing.assert_close(ours(x), hf(x), rtol=0, atol=1e-5)
        # the bias selects: without it other experts win for some tokens (on both sides)
        hf.gate.e_score_correction_bias.zero_()
        ours.router_bias.zero_()
        _, _, hf_unbiased = hf.gate(x)
        _, _, our_unbiased = ours.route(x.view(-1, cfg.dim))
        assert torch.equal(hf_unbiased.sort(-1).values, our_unbiased.sort(-1).values)
        assert not torch.equal(hf_unbiased.sort(-1).values, hf_e.sort(-1).values)
        torch.testing.assert_close(ours(x), hf(x), rtol=0, atol=1e-5)


def test_deepseek_v3_checkpoint_layout_loads_in_transformers(tmp_path: Path):
    """Our MoE written under the DeepSeek-V3 key plan (per-expert tensors, fp32 bias) into a DeepseekV3ForCausalLM
    checkpoint with the config keys of `deepseek_v3_moe_config` loads with no missing or unexpected tensors, and
    its MoE layer gives our MoE's output."""
    from safetensors.torch import load_file, save_file
    from transformers import DeepseekV3ForCausalLM

    cfg = deepseek_moe_config(num_layers=1, num_shared_experts=2)
    hf_cfg = hf_deepseek_config(
        cfg,
        vocab_size=cfg.vocab_size,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=None,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=16,
        max_position_embeddings=64,
        num_mtp_layers=0,
    )
    assert hf_cfg.scoring_func == "sigmoid" and hf_cfg.topk_method == "noaux_tc"
    torch.manual_seed(0)
    DeepseekV3ForCausalLM(hf_cfg).save_pretrained(tmp_path)
    ours = Transformer(cfg).eval()
    with torch.no_grad():
        ours.layers[0].mlp.router_bias.copy_(torch.linspace(-0.05, 0.05, cfg.num_experts))
    state = ours.state_dict()
    weights = {k: v for k, v in load_file(tmp_path / "model.safetensors").items() if ".mlp." not in k}
    for m in deepseek_v3_moe_key_plan(cfg, 0):
        t = state[m.ours] if m.expert is None else state[m.ours][m.expert]
        weights[m.hf] = t.clone().contiguous()
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    hf, info = DeepseekV3ForCausalLM.from_pretrained(tmp_path, output_loading_info=True, dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    mlp = hf.model.layers[0].mlp
    assert mlp.gate.e_score_correction_bias.dtype == torch.float32
    assert torch.equal(mlp.gate.e_score_correction_bias, ours.layers[0].mlp.router_bias)
    assert json.loads((tmp_path / "config.json").read_text())["topk_method"] == "noaux_tc"
    x = torch.randn(2, 5, cfg.dim)
    with torch.no_grad():
        torch.testing.assert_close(ours.layers[0].mlp(x), mlp(x), rtol=0, atol=1e-5)


def test_bias_update_moves_load_toward_uniform():
    """A router that sends every token to expert 0: one update is rate * sign(mean load - load) per expert (by
    hand: -rate for the overloaded expert, +rate for the idle ones), and a few updates spread the load (64 tokens,
    4 experts: 16 each would be uniform)."""
    cfg = deepseek_moe_config(num_experts=4, num_experts_per_token=1, router_bias_update_rate=0.05)
    moe = MoE(cfg)
    torch.manual_seed(0)
    x = torch.randn(1, 64, cfg.dim)
    x[..., 0] = 1.0
    with torch.no_grad():
        moe.router.weight.normal_(0.0, 0.1)
        moe.router.weight[:, 0] = torch.tensor([3.0, 0.0, 0.0, 0.0])  # expert 0 is everyone's favourite
        moe(x)
        assert moe.last_expert_counts.tolist() == [64, 0, 0, 0]
        moe.update_router_bias(moe.last_expert_counts)
        assert moe.router_bias.tolist() == pytest.approx([-0.05, 0.05, 0.05, 0.05])
        loads = []
        for _ in range(15):
            moe(x)
            loads.append(moe.last_expert_counts.clone())
            moe.update_router_bias(moe.last_expert_counts)
    for counts in loads[5:]:  # balanced up to the +-rate oscillation around the balance point
        assert counts.max() <= 24 and counts.min() >= 4, [c.tolist() for c in loads]
    # the bias only selects: the chosen experts' weights are their unbiased scores, renormalised, times 2.5
    with torch.no_grad():
        _, w, e = moe.route(x.view(-1, cfg.dim))
        scores = torch.sigmoid(x.view(-1, cfg.dim) @ moe.router.weight.t()).gather(1, e)
    torch.testing.assert_close(w, 2.5 * scores / scores.sum(-1, keepdim=True))


def sigmoid_trainer(steps=3, **model_kw) -> Trainer:
    torch.manual_seed(0)
    tcfg = TrainConfig(
        steps=steps, batch_size=4, seq_len=32, lr=1e-3, warmup_steps=0, eval_every=steps, log_every=1
    )
    return Trainer(Transformer(deepseek_moe_config(**model_kw)), tcfg)


def test_training_updates_the_bias_and_logs_utilisation(tmp_path: Path):
    """A short run with the sigmoid router: the trainer moves each layer's bias by +-rate per step (the bias is
    no parameter: the optimizer never touches it), logs expert utilisation and the bias spread, and a checkpoint
    carries the bias."""
    t = sigmoid_trainer(router_bias_update_rate=0.01, aux_loss_coef=0.0)
    moe = [layer.mlp for layer in t.model.layers]
    assert all(id(m.router_bias) not in {id(p) for p in t.model.parameters()} for m in moe)
    logged = []
    t.fit(
        RandomWindows(TOKENS, 32, 4),
        [EvalSet("x", TOKENS[:2000], 1.0)],
        on_log=lambda s, m: logged.append(m),
        progress=False,
    )
    assert len(logged) == 3
    for m in logged:
        assert 1.0 <= m["expert_load_max"] <= 4.0 and 0 < m["experts_used_fraction"] <= 1.0
        assert m["router_bias_spread"] >= 0 and m["aux_loss"] > 0
    for layer in moe:  # three steps of +-0.01 (0 when an expert's load is exactly the mean)
        steps = layer.router_bias / 0.01
        assert (
            torch.allclose(steps, steps.round(), atol=1e-4)
            and steps.abs().max() <= 3
            and steps.abs().max() > 0
        )
    spread = max(float(m.router_bias.max() - m.router_bias.min()) for m in moe)
    assert logged[-1]["router_bias_spread"] == pytest.approx(spread)
    t.save_to(tmp_path / "ckpt", RandomWindows(TOKENS, 32, 4), {})
    fresh = sigmoid_trainer(router_bias_update_rate=0.01, aux_loss_coef=0.0)
    fresh.resume(tmp_path / "ckpt", RandomWindows(TOKENS, 32, 4))
    for a, b in zip(moe, fresh.model.layers):
        assert torch.equal(a.router_bias, b.mlp.router_bias)


def test_frozen_router_or_zero_rate_keeps_the_bias():
    """Rate 0, or a router that is not trained (e.g. LoRA freezes it), leaves the bias where it is."""
    assert sigmoid_trainer(router_bias_update_rate=0.0).routers == []
    t = sigmoid_trainer()
    assert len(t.routers) == 2
    torch.manual_seed(0)
    model = Transformer(deepseek_moe_config())
    model.layers[0].mlp.router.weight.requires_grad_(False)
    frozen = Trainer(model, t.cfg)
    assert frozen.routers == [model.layers[1].mlp]


def test_deepseek_v3_moe_config_keys_and_mapping_rules():
    cfg = deepseek_moe_config(num_shared_experts=2, norm_topk_prob=False)
    keys = deepseek_v3_moe_config(cfg)
    assert keys == {
        "n_routed_experts": 4,
        "n_shared_experts": 2,
        "moe_intermediate_size": 32,
        "num_experts_per_tok": 2,
        "n_group": 1,
        "topk_group": 1,
        "norm_topk_prob": False,
        "routed_scaling_factor": 2.5,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "first_k_dense_replace": 0,
        "moe_layer_freq": 1,
    }
    names = [m.hf for m in deepseek_v3_moe_key_plan(cfg, 3)]
    assert names[:2] == ["model.layers.3.mlp.gate.weight", "model.layers.3.mlp.gate.e_score_correction_bias"]
    assert "model.layers.3.mlp.experts.3.down_proj.weight" in names and len(names) == 2 + 3 * 4 + 3
    for bad, match in (
        (small_moe_config(), r"model\.router_score = 'softmax'.*set model\.router_score: sigmoid"),
        (
            deepseek_moe_config(shared_expert_gate=True),
            r"model\.shared_expert_gate = true.*set model\.shared_expert_gate: false",
        ),
        (small_moe_config(router_score="sigmoid", num_shared_experts=0), r"model\.num_shared_experts = 0"),
        (deepseek_moe_config(num_experts=1, num_experts_per_token=1), r"model\.num_experts = 1"),
    ):
        with pytest.raises(ValueError, match=match):
            check_deepseek_v3_moe(bad)


def test_bias_update_counts_every_micro_batch():
    """Gradient accumulation: the update uses the step's counts over all micro-batches, so four micro-batches of 2
    move the bias as one batch of 8 does (and differently from the last micro-batch alone)."""
    torch.manual_seed(1)
    x = torch.randint(0, 256, (8, 32))
    big, small = sigmoid_trainer(router_bias_update_rate=0.01), sigmoid_trainer(router_bias_update_rate=0.01)
    big.train_step([(x, x)])
    small.train_step([(x[i : i + 2], x[i : i + 2]) for i in range(0, 8, 2)])
    for a, b in zip(big.routers, small.routers):
        assert torch.equal(a.router_bias, b.router_bias)
    last_only = sigmoid_trainer(router_bias_update_rate=0.01)
    last_only.train_step([(x[6:], x[6:])])
    assert any(not torch.equal(a.router_bias, b.router_bias) for a, b in zip(big.routers, last_only.routers))
