"""LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685) for llm_core Transformers, written from scratch.

A targeted `nn.Linear` W (out x in) becomes W x + (alpha / rank) * B A x with A (rank x in) and B (out x rank)
trainable and W frozen. B starts at zero, so a fresh adapter leaves the model's outputs unchanged.

Targets are named by the last component of the module name: q_proj, k_proj, v_proj, o_proj (attention) and
gate_proj, up_proj, down_proj (the dense MLP, or an MoE layer's shared expert `mlp.shared`); with multi-head
latent attention only o_proj and the MLP (q_proj's rotary rows are reordered by the HF export). Routed MoE experts
are stacked Parameters (w_gate / w_up / w_down), not nn.Linear, and take no LoRA; nor do lm_head (tied to the
embedding by default), the router or the shared-expert gate, which vLLM cannot serve adapters for either.

Adapters save and load in PEFT's format (adapter_config.json + adapter_model.safetensors under HF key names,
e.g. `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`), so they load with
`peft.PeftModel.from_pretrained` on top of the `export_hf` export of the base model, and serve with vLLM's
`enable_lora=True` + `LoRARequest`. `strip_lora` merges the adapter and restores plain nn.Linear modules, so
`export_hf` exports the merged model unchanged.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from safetensors.torch import save_file
from torch import nn

from llm_core.checkpoint import unwrap_model
from llm_core.config import StrictModel
from llm_core.export_hf import hf_module_names, read_tensors
from llm_core.io import atomic_dir, tensor_bytes
from llm_core.model import Transformer

# Module names (last component) that can take a LoRA adapter: llm_core, PEFT and vLLM all support them.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# In an MLA model q_proj carries rotary rows that export_hf permutes for DeepseekV3; a PEFT adapter on it would need
# the same permutation, so MLA models take LoRA on o_proj and the MLP projections only.
MLA_ROTARY_TARGETS = ("q_proj",)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


class LoRAConfig(StrictModel):
    """Which linear layers get a LoRA adapter, and its size."""

    rank: int = Field(8, gt=0, description="rank r of the update B @ A (A: r x in, B: out x r)")
    alpha: float = Field(16.0, gt=0, description="scale numerator: the update is multiplied by alpha / rank")
    dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="dropout on the LoRA branch's input (training only)"
    )
    target_modules: list[str] = Field(
        default_factory=lambda: list(LORA_TARGETS),
        min_length=1,
        description=f"last module-name components to adapt, a subset of {', '.join(LORA_TARGETS)}",
    )

    @field_validator("target_modules")
    @classmethod
    def _dedupe(cls, names: list[str]) -> list[str]:
        return list(dict.fromkeys(names))

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update: base(x) + B(A(dropout(x))) * alpha / rank."""

    def __init__(self, base: nn.Linear, *, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        self.base = base
        base.requires_grad_(False)
        self.rank, self.alpha = rank, float(alpha)
        self.scaling = self.alpha / rank
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **factory))  # (r, in)
        self.lora_B = nn.Parameter(torch.empty(base.out_features, rank, **factory))  # (out, r)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.reset_lora_parameters()

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """A ~ kaiming-uniform (as the LoRA reference code and PEFT), B = 0: the update starts at exactly zero."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        """The update B @ A * scaling, (out, in), in fp32."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling  # (out, r) @ (r, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (..., in) -> (..., out)
        if self.merged:
            return y  # the update is already in base.weight
        h = F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A)  # (..., r)
        return y + (F.linear(h, self.lora_B) * self.scaling).to(y.dtype)  # (..., out)

    @torch.no_grad()
    def merge(self) -> None:
        """Add the update into base.weight; forward is then base(x) alone. A no-op when already merged.

        LoRA parameters get no gradient while merged: unmerge before training on. In bf16/fp16 the merge
        rounds, so merge + unmerge restores base.weight only to within that rounding.
        """
        if self.merged:
            return
        w = self.base.weight
        w.copy_((w.float() + self.delta_weight()).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the update from base.weight again. A no-op when not merged."""
        if not self.merged:
            return
        w = self.base.weight
        w.copy_((w.float() - self.delta_weight()).to(w.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}, merged={self.merged}"


# ------------------------------------------------------------------------------------------ model ops


def _lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in unwrap_model(model).named_modules() if isinstance(m, LoRALinear)}


def _targets(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Names of the nn.Linear modules `cfg` adapts; ValueError naming targets that match nothing."""
    linears = {name: m for name, m in unwrap_model(model).named_modules() if isinstance(m, nn.Linear)}
    leaf = {name: name.rsplit(".", 1)[-1] for name in linears}
    valid = [t for t in LORA_TARGETS if t in leaf.values()]
    model_cfg = getattr(unwrap_model(model), "cfg", None)
    rotary = [t for t in cfg.target_modules if t in MLA_ROTARY_TARGETS]
    if getattr(model_cfg, "is_mla", False) and rotary:
        raise ValueError(
            f"LoRA target_modules {rotary} hold rotary rows in a multi-head latent attention (attention: mla) "
            "model, which the HF export reorders; adapters on them are not supported. Target "
            f"{[t for t in valid if t not in MLA_ROTARY_TARGETS]} instead"
        )
    missing = [t for t in cfg.target_modules if t not in valid]
    if missing:
        others = sorted({n for n in leaf.values() if n not in LORA_TARGETS})
        hint = ""
        is_moe = getattr(getattr(unwrap_model(model), "cfg", None), "is_moe", False)
        if is_moe and set(missing) & {"gate_proj", "up_proj", "down_proj"}:
            hint = (
                " (routed MoE experts are stacked Parameters, not nn.Linear: only a shared expert's "
                "gate/up/down projections take LoRA, and this model has none)"
            )
        raise ValueError(
            f"LoRA target_modules {missing} match no supported nn.Linear in this model{hint}; valid target names "
            f"here: {valid}" + (f" (not supported as targets: {others})" if others else "")
        )
    wanted = set(cfg.target_modules)
    return [name for name in linears if leaf[name] in wanted]


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> nn.Module:
    """Wrap every targeted nn.Linear in a LoRALinear and freeze everything else, in place; returns `model`.

    Only the adapters' lora_A / lora_B keep requires_grad (embeddings, norms, lm_head, routers, experts are
    frozen). Raises ValueError if the model already has adapters or a target matches no module.
    """
    if _lora_modules(model):
        raise ValueError(
            "model already has LoRA adapters: strip_lora(model) first, or load_peft_adapter into it"
        )
    names = _targets(model, cfg)
    root = unwrap_model(model)
    root.requires_grad_(False)
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = root.get_submodule(parent)
        setattr(
            owner,
            child,
            LoRALinear(getattr(owner, child), rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout),
        )
    return model


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every adapter's lora_A and lora_B, in module order (what the optimizer should train)."""
    return [p for m in _lora_modules(model).values() for p in (m.lora_A, m.lora_B)]


def merge_lora(model: nn.Module) -> nn.Module:
    """Merge every adapter into its base weight (idempotent); returns `model`."""
    for m in _lora_modules(model).values():
        m.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo merge_lora (idempotent); returns `model`."""
    for m in _lora_modules(model).values():
        m.unmerge()
    return model


def strip_lora(model: nn.Module) -> nn.Module:
    """Merge the adapters and put the plain base nn.Linear modules back, in place; returns `model`.

    The result is an ordinary Transformer with the update baked in (export_hf exports it as is). Its parameters
    stay frozen as apply_lora left them: call model.requires_grad_(True) to train it in full.
    """
    root = unwrap_model(model)
    for name, m in _lora_modules(root).items():
        m.merge()
        parent, _, child = name.rpartition(".")
        setattr(root.get_submodule(parent), child, m.base)
    return model


def lora_config_of(model: nn.Module) -> LoRAConfig | None:
    """The LoRAConfig the model's adapters were built with (None without adapters)."""
    modules = _lora_modules(model)
    if not modules:
        return None
    first = next(iter(modules.values()))
    leaves = {name.rsplit(".", 1)[-1] for name in modules}
    dropout = first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0
    return LoRAConfig(
        rank=first.rank,
        alpha=first.alpha,
        dropout=dropout,
        target_modules=[t for t in LORA_TARGETS if t in leaves],
    )


# ------------------------------------------------------------------------------------------- PEFT I/O


def _peft_keys(model: nn.Module, names: list[str]) -> dict[str, tuple[str, str]]:
    """PEFT tensor key -> (our module name, 'lora_A' | 'lora_B') for the adapted modules `names`."""
    hf = hf_module_names(unwrap_model(model).cfg)
    return {
        f"{_PEFT_PREFIX}{hf[name]}.{part}.weight": (name, part)
        for name in names
        for part in ("lora_A", "lora_B")
    }


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x  # vLLM's PEFTHelper types lora_alpha as int


def save_peft_adapter(model: nn.Module, out_dir: str | Path, *, base_model_name_or_path: str) -> Path:
    """Write the adapters as a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors).

    `base_model_name_or_path` is recorded in adapter_config.json (the HF directory or hub id of the base model,
    as exported by export_hf). Tensors keep the adapters' dtype. The directory is replaced atomically.
    """
    modules = _lora_modules(model)
    cfg = lora_config_of(model)
    if cfg is None:
        raise ValueError("model has no LoRA adapters: apply_lora(model, cfg) first")
    if not isinstance(unwrap_model(model), Transformer):
        raise ValueError(
            f"save_peft_adapter needs an llm_core Transformer, got {type(unwrap_model(model)).__name__}"
        )
    tensors: dict[str, torch.Tensor] = {}
    for key, (name, part) in _peft_keys(model, list(modules)).items():
        t = getattr(modules[name], part).detach().to("cpu")
        tensors[key] = t.clone(memory_format=torch.contiguous_format)
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": cfg.rank,
        "lora_alpha": _number(cfg.alpha),
        "lora_dropout": cfg.dropout,
        # our leaf names equal the HF ones (self_attn.q_proj, mlp.gate_proj, mlp.shared_expert.gate_proj, ...)
        "target_modules": sorted(cfg.target_modules),
        "exclude_modules": None,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "target_parameters": None,
    }
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, expected_bytes=tensor_bytes(tensors)) as tmp:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out_dir


def _config_from_peft(raw: dict[str, Any], where: Path) -> LoRAConfig:
    problems = []
    if raw.get("peft_type") != "LORA":
        problems.append(f"peft_type = {raw.get('peft_type')!r} (need 'LORA')")
    for key, ok in (
        ("bias", "none"),
        ("use_rslora", False),
        ("use_dora", False),
        ("lora_bias", False),
        ("fan_in_fan_out", False),
    ):
        if raw.get(key, ok) != ok:
            problems.append(f"{key} = {raw[key]!r} (need {ok!r})")
    for key in (
        "rank_pattern",
        "alpha_pattern",
        "modules_to_save",
        "layers_to_transform",
        "target_parameters",
    ):
        if raw.get(key):
            problems.append(f"{key} = {raw[key]!r} (need it empty)")
    targets = raw.get("target_modules")
    if not isinstance(targets, list):
        problems.append(f"target_modules = {targets!r} (need a list of module names)")
    if problems:
        raise ValueError(f"{where} describes an adapter llm_core cannot load: {'; '.join(problems)}")
    try:
        return LoRAConfig(
            rank=raw["r"],
            alpha=raw["lora_alpha"],
            dropout=raw.get("lora_dropout", 0.0),
            target_modules=targets,
        )
    except (KeyError, ValueError) as exc:
        raise ValueError(f"{where} is not a valid LoRA adapter config: {exc}") from None


def load_peft_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a PEFT LoRA adapter directory into `model`, in place; returns `model`.

    Without adapters the model first gets apply_lora with the config from adapter_config.json; with adapters
    their rank, alpha and targets must match it. Loading is strict: missing or unexpected tensors, or wrong
    shapes, raise ValueError (before the model is changed).
    """
    path = Path(path)
    config_path, weights_path = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    for f in (config_path, weights_path):
        if not f.is_file():
            raise ValueError(f"{str(path)!r} is not a PEFT adapter directory: {f.name} is missing")
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config_path} is not valid JSON: {exc}") from None
    cfg = _config_from_peft(raw, config_path)

    current = lora_config_of(model)
    if current is None:
        names = _targets(model, cfg)
    else:
        mine = (current.rank, current.alpha, sorted(current.target_modules))
        theirs = (cfg.rank, cfg.alpha, sorted(cfg.target_modules))
        if mine != theirs:
            raise ValueError(
                f"adapter {str(path)!r} has (rank, alpha, target_modules) = {theirs} but the model's adapters have "
                f"{mine}: load it into a model without adapters"
            )
        if any(m.merged for m in _lora_modules(model).values()):
            raise ValueError("the model's adapters are merged: unmerge_lora(model) before loading an adapter")
        names = list(_lora_modules(model))

    keys = _peft_keys(model, names)
    tensors = read_tensors([weights_path])
    missing = [k for k in keys if k not in tensors]
    unexpected = sorted(k for k in tensors if k not in keys)
    if missing or unexpected:
        raise ValueError(
            f"adapter {str(weights_path)!r} does not match the model: missing tensors {missing}; "
            f"unexpected tensors {unexpected}"
        )
    root = unwrap_model(model)
    want_shapes = {}
    for key, (name, part) in keys.items():
        base = root.get_submodule(name)
        base = base.base if isinstance(base, LoRALinear) else base
        want_shapes[key] = (cfg.rank, base.in_features) if part == "lora_A" else (base.out_features, cfg.rank)
    wrong = [
        f"{k}: {tuple(tensors[k].shape)} != {want}"
        for k, want in want_shapes.items()
        if tensors[k].shape != want
    ]
    if wrong:
        raise ValueError(f"adapter {str(weights_path)!r} has tensors of the wrong shape: {wrong}")

    if current is None:
        apply_lora(model, cfg)
    modules = _lora_modules(model)
    with torch.no_grad():
        for key, (name, part) in keys.items():
            param = getattr(modules[name], part)
            param.copy_(tensors[key].to(param.dtype))
    return model
