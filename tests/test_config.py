import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml

from jobs.platform.configfile import VLLM_CPU_HEAD_DIMS, list_presets, load_config, model_config_from_preset
from llm_core.config import ConfigError, ModelConfig, config_sha256
from llm_core.export_hf import check_exportable
from llm_core.model import Transformer
from tests.conftest import REPO, small_config, small_moe_config


def analytic_params(c: dict) -> int:
    """Independent count from the raw YAML numbers."""
    d, L, V = c["dim"], c["num_layers"], c["vocab_size"]
    hd = d // c["num_heads"]
    attn = 2 * d * d + 2 * d * c["num_kv_heads"] * hd
    if c.get("attention") == "mla":  # q (plain), kv_a + its norm, kv_b, o
        H, n, r, v, C = (
            c["num_heads"],
            c["qk_nope_head_dim"],
            c["qk_rope_head_dim"],
            c["v_head_dim"],
            c["kv_lora_rank"],
        )
        assert c.get("q_lora_rank") is None
        attn = d * H * (n + r) + d * (C + r) + C + C * H * (n + v) + H * v * d
    if c.get("num_experts", 0):
        h = c.get("moe_ffn_hidden_dim") or c["ffn_hidden_dim"]
        mlp = c["num_experts"] * 3 * d * h + c["num_experts"] * d
        mlp += c.get("num_shared_experts", 0) * 3 * d * h + (d if c.get("num_shared_experts", 0) else 0)
    else:
        mlp = 3 * d * c["ffn_hidden_dim"]
    embed = V * d * (1 if c.get("tie_embeddings", True) else 2)
    return L * (attn + mlp + 2 * d) + d + embed


EXPECTED_PRESETS = {"tiny", "minimind-26m", "gpt-130m", "kk-350m", "moe-small", "mixtral-small", "mla-small"}


def test_presets_exist():
    assert set(list_presets()) >= EXPECTED_PRESETS


# The vocabulary each preset is trained with in its recipe: the tokenizer's size, never the preset's.
RECIPE_VOCAB = {
    "tiny": 4096,
    "minimind-26m": 32000,
    "gpt-130m": 32000,
    "kk-350m": 32000,
    "moe-small": 32000,
    "mixtral-small": 32000,
    "mla-small": 32000,
}


def preset(name: str, vocab_size: int | None = None) -> ModelConfig:
    return model_config_from_preset(name, [f"vocab_size={vocab_size or RECIPE_VOCAB[name]}"])


@pytest.mark.parametrize("name", sorted(EXPECTED_PRESETS))
def test_presets_never_state_a_vocabulary(name):
    raw = yaml.safe_load((REPO / "configs" / "model" / f"{name}.yaml").read_text())
    assert "vocab_size" not in raw, "the vocabulary comes from the tokenizer, not the preset"
    cfg = model_config_from_preset(name)
    with pytest.raises(ValueError, match="comes from the tokenizer"):
        cfg.num_params()


@pytest.mark.parametrize("name", sorted(EXPECTED_PRESETS))
def test_preset_param_count_and_servable(name):
    raw = yaml.safe_load((REPO / "configs" / "model" / f"{name}.yaml").read_text())
    raw["vocab_size"] = RECIPE_VOCAB[name]
    cfg = preset(name)
    assert cfg.num_params() == analytic_params(raw)
    assert cfg.head_dim in VLLM_CPU_HEAD_DIMS, "every preset must be servable by vLLM's CPU attention"
    if name in (
        "tiny",
        "minimind-26m",
        "moe-small",
        "mixtral-small",
        "mla-small",
    ):  # small enough to build here
        assert Transformer(cfg).num_params() == cfg.num_params()


def test_preset_sizes_match_their_names():
    assert preset("tiny").num_params() < 2_000_000
    assert 24e6 < preset("minimind-26m", 6400).num_params() < 28e6  # MiniMind2-small's shape and vocabulary
    assert 120e6 < preset("gpt-130m").num_params() < 140e6
    kk = preset("kk-350m")
    assert 200e6 <= kk.num_params() <= 500e6
    moe = preset("moe-small")
    assert moe.num_experts > 1 and moe.num_shared_experts >= 1
    assert moe.num_active_params() < moe.num_params()
    mixtral = preset("mixtral-small")
    assert mixtral.num_experts > 1 and mixtral.num_shared_experts == 0 and mixtral.norm_topk_prob
    assert 85e6 < mixtral.num_params() < 95e6 and mixtral.num_active_params() < 45e6
    mla = preset("mla-small")  # vLLM's MLA kernels serve latent + rotary key = 512 + 64 only
    assert mla.is_mla and mla.kv_lora_rank + mla.qk_rope_head_dim == 576 and mla.q_lora_rank is None
    assert 40e6 < mla.num_params() < 50e6
    check_exportable(mla)


def test_vocabulary_is_padded_to_a_multiple_of_64_and_padding_is_never_scored():
    cfg = small_config(vocab_size=1000)
    assert cfg.padded_vocab_size == 1024 and small_config(vocab_size=1024).padded_vocab_size == 1024
    model = Transformer(cfg)
    assert model.embed_tokens.weight.shape == (1024, cfg.dim)
    assert model.num_params() == cfg.num_params()  # the 24 padding rows are not counted
    assert sum(p.numel() for p in model.parameters()) == cfg.num_params() + 24 * cfg.dim
    ids = torch.randint(0, 1000, (2, 16))
    out = model(ids, ids)
    assert out.logits.shape == (2, 16, 1000)
    out.loss.backward()
    assert model.embed_tokens.weight.grad[1000:].abs().sum() == 0  # tied head: padding rows get no gradient


def test_gqa_divisibility_error_names_fields():
    with pytest.raises(ValueError, match=r"num_heads % num_kv_heads != 0 \(8 % 3\)"):
        small_config(num_heads=8, num_kv_heads=3)


def test_dim_heads_error():
    with pytest.raises(ValueError, match="dim % num_heads"):
        small_config(dim=60, num_heads=8, num_kv_heads=8)


def test_overrides_and_unknown_keys(tmp_path: Path):
    from pydantic import Field

    from llm_core.config import StrictModel

    class Job(StrictModel):
        name: str
        model: ModelConfig
        lr: float = Field(1e-3, gt=0)

    f = tmp_path / "job.yaml"
    f.write_text("name: x\nmodel: tiny\n")
    job = load_config(Job, f, ["model.dim=256", "model.num_heads=8", "model.num_kv_heads=4", "lr=3e-4"])
    assert job.model.dim == 256 and job.model.head_dim == 32 and job.lr == 3e-4
    assert job.model.vocab_size == model_config_from_preset("tiny").vocab_size  # rest of the preset kept

    with pytest.raises(ConfigError, match=r"model\.dimm: unknown key"):
        load_config(Job, f, ["model.dimm=3"])
    with pytest.raises(ConfigError, match=r"lr: Input should be greater than 0 \(got -1\)"):
        load_config(Job, f, ["lr=-1"])
    with pytest.raises(ConfigError, match="not key=value"):
        load_config(Job, f, ["lr"])
    with pytest.raises(ConfigError, match="unknown model preset 'nope'"):
        load_config(Job, f, ["model=nope"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(Job, tmp_path / "missing.yaml")


def test_rope_scaling_factor_must_match():
    ok = small_config(
        max_seq_len=256, rope_scaling={"type": "yarn", "factor": 4.0, "original_max_seq_len": 64}
    )
    assert ok.rope_scaling.factor == 4.0
    with pytest.raises(ValueError, match="rope_scaling.factor"):
        small_config(
            max_seq_len=256, rope_scaling={"type": "llama3", "factor": 2.0, "original_max_seq_len": 64}
        )


def test_config_hash_is_stable():
    a, b = small_config(), small_config()
    assert config_sha256(a) == config_sha256(b)
    assert config_sha256(a) != config_sha256(small_config(dim=128))


def test_every_yaml_recipe_loads():
    """Each configs/<stage>/*.yaml validates against its job's config class."""
    from jobs.pretrain import PretrainConfig

    classes = {"pretrain": PretrainConfig}
    found = 0
    for stage, cls in classes.items():
        for path in sorted((REPO / "configs" / stage).glob("*.yaml")):
            load_config(cls, path)
            found += 1
    assert found >= 1


def test_unexportable_model_fails_at_config_validation():
    """A model with no exact HF export is refused when the pretraining config loads, naming the key and the fix."""
    from jobs.pretrain import PretrainConfig

    path = REPO / "configs" / "pretrain" / "moe-small.yaml"
    mixtral = load_config(PretrainConfig, path, ["model=mixtral-small"])
    assert mixtral.model.num_shared_experts == 0 and mixtral.model.norm_topk_prob
    with pytest.raises(
        ConfigError,
        match=r"model\.norm_topk_prob = false .*Set model\.norm_topk_prob: true.*num_shared_experts: 1",
    ):
        load_config(PretrainConfig, path, ["model=mixtral-small", "model.norm_topk_prob=false"])
    # a shared expert makes the same router a Qwen2-MoE export, which honours norm_topk_prob
    load_config(PretrainConfig, path, ["model.norm_topk_prob=false"])


def test_router_options_are_validated_naming_the_key():

    for kw, match in (
        (
            {"routed_scaling_factor": 2.5},
            r"routed_scaling_factor = 2\.5 applies to router_score: sigmoid only",
        ),
        (
            {"router_bias_update_rate": 0.01},
            r"router_bias_update_rate = 0\.01 applies to router_score: sigmoid",
        ),
        ({"num_shared_experts": 0, "shared_expert_gate": False}, r"shared_expert_gate = false has no shared"),
        (
            {"num_experts": 0, "num_shared_experts": 0, "router_score": "sigmoid"},
            r"router_score = 'sigmoid' needs",
        ),
        ({"router_score": "sigmoid", "routed_scaling_factor": 0.0}, r"routed_scaling_factor"),
        ({"router_score": "sigmoid", "router_bias_update_rate": -1e-3}, r"router_bias_update_rate"),
    ):
        with pytest.raises(ValueError, match=match):
            small_moe_config(**kw)
    ds = small_moe_config(router_score="sigmoid", shared_expert_gate=False, routed_scaling_factor=2.5)
    # the ungated shared expert has no gate vector: the config's count equals the built model's
    assert ds.num_params() == small_moe_config().num_params() - 2 * ds.dim
    assert ModelConfig.model_validate(ds.model_dump()) == ds


def test_new_router_fields_keep_existing_config_hashes():
    """Run keys (and so resumable run directories) of configs written before the router options existed stay the
    same: the fields are left out of config_sha256 at their defaults, also inside a job config."""
    from llm_core.config import StrictModel

    class Job(StrictModel):
        name: str
        model: ModelConfig

    cfg = small_moe_config()
    assert (
        config_sha256(cfg) == "360d77376612aa50374c972ab9a314e03aaf06a4ecd154f4f25d935f442ba1a0"
    )  # before them
    old_keys = {
        k: v
        for k, v in cfg.model_dump(mode="json").items()
        if k not in {"router_score", "routed_scaling_factor", "router_bias_update_rate", "shared_expert_gate"}
    }
    blob = json.dumps({"name": "x", "model": old_keys}, sort_keys=True, separators=(",", ":")).encode()
    assert config_sha256(Job(name="x", model=cfg)) == hashlib.sha256(blob).hexdigest()
    assert config_sha256(small_moe_config(router_score="sigmoid")) != config_sha256(cfg)
    assert config_sha256(
        small_moe_config(router_score="sigmoid", router_bias_update_rate=0.01)
    ) != config_sha256(small_moe_config(router_score="sigmoid"))


def test_deepseek_style_moe_fails_at_config_validation_until_mla():
    """A sigmoid router or an ungated shared expert has no Qwen2-MoE/Mixtral export: refused when the pretraining
    config loads, naming the key and the fix (DeepSeek-V3 export needs MLA attention)."""
    from jobs.pretrain import PretrainConfig

    path = REPO / "configs" / "pretrain" / "moe-small.yaml"
    with pytest.raises(
        ConfigError, match=r"model\.router_score = 'sigmoid' cannot be exported.*attention: mla"
    ):
        load_config(PretrainConfig, path, ["model.router_score=sigmoid"])
    with pytest.raises(
        ConfigError, match=r"model\.shared_expert_gate = false cannot be exported.*attention: mla"
    ):
        load_config(PretrainConfig, path, ["model.shared_expert_gate=false"])
    with pytest.raises(
        ConfigError, match=r"routed_scaling_factor = 2\.5 applies to router_score: sigmoid only"
    ):
        load_config(PretrainConfig, path, ["model.routed_scaling_factor=2.5"])


def test_pretrain_data_repeated_spans_keeps_existing_run_keys():
    """`data.repeated_spans` and `data.recall` came after runs were stored: unset, the pretrain config hashes as
    before they existed (the value below is tiny.yaml's key at 7cff4c0); set, the key changes."""
    from jobs.platform.configfile import load_config
    from jobs.pretrain import PretrainConfig

    cfg = load_config(PretrainConfig, REPO / "configs/pretrain/tiny.yaml", [])
    assert config_sha256(cfg) == "5e64f630cfb27c2c204808b853f3726f4e13bc1d91ad87943595964aa8d63992"
    spans = load_config(
        PretrainConfig, REPO / "configs/pretrain/tiny.yaml", ["data.repeated_spans={share: 0.25}"]
    )
    assert config_sha256(spans) != config_sha256(cfg)
    text, shuffled = (
        load_config(
            PretrainConfig,
            REPO / "configs/pretrain/tiny.yaml",
            [f"data.repeated_spans={{share: 0.25, source: {s}}}"],
        )
        for s in ("text", "shuffled")
    )
    assert (
        config_sha256(text) == config_sha256(spans) != config_sha256(shuffled)
    )  # source: text is the default
    recall = load_config(PretrainConfig, REPO / "configs/pretrain/tiny.yaml", ["data.recall={rows: 8}"])
    assert config_sha256(recall) not in (
        config_sha256(cfg),
        config_sha256(spans),
    )  # data.recall came later too
    # and recall.kinds later still: its default keeps the key of data.recall without it (its value at b893e71)
    assert config_sha256(recall) == "9c1f6c3ab26e5e5352e3f5a1709e3124f40598558222fed1b4652f1620ced9af"
    kinds = load_config(
        PretrainConfig,
        REPO / "configs/pretrain/tiny.yaml",
        ["data.recall={rows: 8, kinds: {random: 0.5, number_in_text: 0.5}}"],
    )
    assert config_sha256(kinds) != config_sha256(recall)
