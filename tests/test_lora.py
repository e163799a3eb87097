"""LoRA: adapter math, merging, freezing, stripping, and PEFT-format adapters that load in peft/transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file
from torch import nn

from llm_core.export_hf import export_hf, load_hf
from llm_core.lora import (
    LoRAConfig,
    LoRALinear,
    apply_lora,
    load_peft_adapter,
    lora_config_of,
    lora_parameters,
    merge_lora,
    save_peft_adapter,
    strip_lora,
    unmerge_lora,
)
from llm_core.model import Transformer
from tests.conftest import small_config, small_moe_config

CONFIGS = {"dense": small_config, "moe": small_moe_config}


def build(kind: str = "dense", seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(CONFIGS[kind](init_std=0.1, **overrides)).eval()


def randomise_lora(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def ids(batch: int = 2, n: int = 9, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, 256, (batch, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).logits


def test_config_validation() -> None:
    cfg = LoRAConfig()
    assert (cfg.rank, cfg.alpha, cfg.dropout, cfg.scaling) == (8, 16.0, 0.0, 2.0)
    assert cfg.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert LoRAConfig(target_modules=["q_proj", "q_proj"]).target_modules == ["q_proj"]
    for bad in ({"rank": 0}, {"dropout": 1.0}, {"target_modules": []}, {"ranks": 4}):
        with pytest.raises(ValidationError):
            LoRAConfig(**bad)


def test_lora_linear_math_and_shapes() -> None:
    torch.manual_seed(0)
    base = nn.Linear(6, 5, bias=True)
    layer = LoRALinear(base, rank=3, alpha=6.0, dropout=0.5)
    assert layer.lora_A.shape == (3, 6) and layer.lora_B.shape == (5, 3) and layer.scaling == 2.0
    assert not base.weight.requires_grad and not base.bias.requires_grad
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 6)
    layer.eval()  # dropout off
    want = base(x) + x @ layer.lora_A.t() @ layer.lora_B.t() * 2.0
    torch.testing.assert_close(layer(x), want)
    layer.train()  # dropout on the LoRA branch only: the base output is never dropped
    torch.manual_seed(1)
    mask = torch.nn.functional.dropout(torch.ones_like(x), 0.5, True)
    torch.manual_seed(1)
    torch.testing.assert_close(layer(x), base(x) + (x * mask) @ layer.lora_A.t() @ layer.lora_B.t() * 2.0)


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_zero_init_is_exactly_the_base_model(kind: str) -> None:
    model, x = build(kind), ids()
    before = logits(model, x)
    apply_lora(model, LoRAConfig(rank=4))
    assert torch.equal(logits(model, x), before)
    n_lora = sum(isinstance(m, LoRALinear) for m in model.modules())
    # dense: 7 projections per layer; MoE: 4 attention + the shared expert's 3 (routed experts are not nn.Linear)
    assert n_lora == 2 * 7


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_merge_and_unmerge(kind: str) -> None:
    model, x = build(kind), ids()
    apply_lora(model, LoRAConfig(rank=4, alpha=8))
    randomise_lora(model)
    unmerged = logits(model, x)
    assert (unmerged - logits(build(kind), x)).abs().max() > 0.1  # the adapter matters
    merge_lora(model)
    merge_lora(model)  # idempotent: the update is added once
    assert all(m.merged for m in model.modules() if isinstance(m, LoRALinear))
    torch.testing.assert_close(logits(model, x), unmerged, atol=1e-5, rtol=0)
    unmerge_lora(model)
    unmerge_lora(model)
    assert not any(m.merged for m in model.modules() if isinstance(m, LoRALinear))
    torch.testing.assert_close(logits(model, x), unmerged, atol=1e-5, rtol=0)


def test_unmerge_restores_base_weights() -> None:
    model = build()
    w0 = model.layers[0].attn.q_proj.weight.clone()
    apply_lora(model, LoRAConfig(rank=4))
    randomise_lora(model)
    merge_lora(model)
    assert (model.layers[0].attn.q_proj.base.weight - w0).abs().max() > 1e-3
    unmerge_lora(model)
    torch.testing.assert_close(model.layers[0].attn.q_proj.base.weight, w0, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_only_adapters_train(kind: str) -> None:
    model = build(kind).train()
    apply_lora(model, LoRAConfig(rank=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    randomise_lora(model)  # B != 0, so A gets a nonzero gradient too
    adapters = {id(p) for p in lora_parameters(model)}
    assert len(adapters) == 2 * 2 * 3
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert len(trainable) == len(adapters)
    x = ids()
    model(x, targets=x).loss.backward()
    for name, p in model.named_parameters():
        if id(p) in adapters:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_bad_targets_are_rejected() -> None:
    with pytest.raises(
        ValueError, match=r"\['qkv', 'lm_head'\].*valid target names here: \['q_proj'.*'down_proj'\]"
    ):
        apply_lora(build(), LoRAConfig(target_modules=["q_proj", "qkv", "lm_head"]))
    # an MoE model without shared experts has no nn.Linear gate/up/down projections at all
    model = build("moe", num_shared_experts=0)
    with pytest.raises(ValueError, match=r"\['gate_proj'\].*stacked Parameters"):
        apply_lora(model, LoRAConfig(target_modules=["q_proj", "gate_proj"]))
    assert not any(isinstance(m, LoRALinear) for m in model.modules())  # nothing was changed
    apply_lora(model, LoRAConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, LoRAConfig(target_modules=["q_proj"]))


def test_strip_lora_gives_a_plain_exportable_transformer(tmp_path: Path) -> None:
    model, x = build(), ids()
    apply_lora(model, LoRAConfig(rank=4))
    randomise_lora(model)
    want = logits(model, x)
    stripped = strip_lora(model)
    assert stripped is model and lora_config_of(model) is None
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert model.state_dict().keys() == Transformer(model.cfg).state_dict().keys()
    torch.testing.assert_close(logits(model, x), want, atol=1e-5, rtol=0)
    export_hf(model, tmp_path / "merged")
    torch.testing.assert_close(logits(load_hf(tmp_path / "merged"), x), want, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------ PEFT format


def make_adapter(tmp_path: Path, kind: str, cfg: LoRAConfig | None = None) -> tuple[Transformer, Path, Path]:
    """Export the base model, then give it a random adapter and save that: (LoRA model, base dir, adapter dir)."""
    model = build(kind)
    base_dir, adapter_dir = tmp_path / f"{kind}-base", tmp_path / f"{kind}-adapter"
    export_hf(model, base_dir)
    apply_lora(model, cfg or LoRAConfig(rank=4, alpha=8))
    randomise_lora(model)
    save_peft_adapter(model, adapter_dir, base_model_name_or_path=str(base_dir))
    return model, base_dir, adapter_dir


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_peft_adapter_matches_peft_and_transformers(tmp_path: Path, kind: str) -> None:
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    model, base_dir, adapter_dir = make_adapter(tmp_path, kind)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["bias"]) == (4, 8, "none")
    keys = load_file(adapter_dir / "adapter_model.safetensors").keys()
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    mlp = "mlp.shared_expert" if kind == "moe" else "mlp"
    assert f"base_model.model.model.layers.1.{mlp}.gate_proj.lora_B.weight" in keys
    assert len(keys) == 2 * 7 * 2

    hf = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir
    )
    hf.eval()
    n_hf_adapters = sum(name.endswith("lora_A.default") for name, _ in hf.named_modules())
    assert n_hf_adapters == 2 * 7  # MoE: peft adapted the shared expert, not the fused routed experts
    x = ids()
    with torch.no_grad():
        theirs = hf(input_ids=x).logits
    torch.testing.assert_close(theirs, logits(model, x), atol=1e-4, rtol=0)


def test_load_peft_adapter_reproduces_logits(tmp_path: Path) -> None:
    cfg = LoRAConfig(rank=4, alpha=12, dropout=0.1, target_modules=["k_proj", "o_proj", "up_proj"])
    model, _, adapter_dir = make_adapter(tmp_path, "dense", cfg)
    x = ids()
    want = logits(model, x)
    fresh = load_peft_adapter(build(), adapter_dir)  # applies LoRA from adapter_config.json
    assert lora_config_of(fresh) == cfg
    torch.testing.assert_close(logits(fresh, x), want, atol=1e-6, rtol=0)
    again = apply_lora(build(), cfg)  # or into a model that already has matching adapters
    load_peft_adapter(again, adapter_dir)
    torch.testing.assert_close(logits(again, x), want, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"rank, alpha, target_modules"):
        load_peft_adapter(apply_lora(build(), LoRAConfig(rank=4, alpha=12)), adapter_dir)


def test_load_peft_adapter_is_strict(tmp_path: Path) -> None:
    _, _, adapter_dir = make_adapter(tmp_path, "dense", LoRAConfig(rank=2, target_modules=["q_proj"]))
    weights = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(weights)
    gone = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"
    extra = "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"
    tensors[extra] = tensors.pop(gone)
    save_file(tensors, weights)
    model = build()
    with pytest.raises(ValueError, match=rf"missing tensors \['{gone}'\]; unexpected tensors \['{extra}'\]"):
        load_peft_adapter(model, adapter_dir)
    assert lora_config_of(model) is None  # rejected before the model was changed

    tensors[gone] = tensors.pop(extra)[:, :1].contiguous()
    save_file(tensors, weights)
    with pytest.raises(ValueError, match="wrong shape"):
        load_peft_adapter(build(), adapter_dir)

    config_path = adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ValueError, match="use_dora"):
        load_peft_adapter(build(), adapter_dir)
