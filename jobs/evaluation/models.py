"""The model under evaluation: a registered version, an HF directory or an llm_core checkpoint, with its tokenizer.

Every failure to find or load the model or its tokenizer is a ValueError that names the model and the fix.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from jobs.evaluation.config import ModelSpec
from jobs.platform import registry
from jobs.platform.runtime import Settings
from jobs.training.posttrain import build_model
from llm_core.checkpoint import load_checkpoint, load_model_from_checkpoint, read_meta
from llm_core.device import resolve_device
from llm_core.export_hf import DTYPES, load_hf
from llm_core.model import Transformer
from llm_core.tokenizer import Tokenizer

log = logging.getLogger("tulpar.eval")


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: Tokenizer
    source: str  # as given
    uri: str  # canonical: models:/name/version or an absolute path
    kind: str  # registered | hf | checkpoint
    hf_dir: Path | None = None  # HF-format directory (None for checkpoints)
    name: str | None = None  # registered model name
    version: str | None = None
    version_tags: dict[str, str] = field(default_factory=dict)
    aliases: list[str] = field(default_factory=list)

    @property
    def stage(self) -> str | None:
        return self.version_tags.get("tulpar.stage")

    @property
    def label(self) -> str:
        if self.name:
            return f"{self.name}/v{self.version}"
        return Path(self.uri).name or self.uri


def pick_device(spec: ModelSpec) -> torch.device:
    """model.device: auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N, mps; an absent one is a ValueError."""
    try:
        return resolve_device(spec.device)
    except ValueError as exc:
        raise ValueError(f"model.{exc}") from None


def load_tokenizer(directory: Path, source: str) -> Tokenizer:
    """The model's tokenizer, or a ValueError naming the model, the directory and the fix."""
    try:
        return Tokenizer.from_dir(directory)
    except Exception as exc:  # a missing, corrupt or foreign tokenizer.json
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(
            f"model {source!r}: its tokenizer cannot be loaded from {directory} ({msg}): export the model with "
            "its tokenizer (llm_core.export_hf(..., tokenizer=...)) or pass model.tokenizer=<tokenizer dir>"
        ) from None


def _checkpoint_tokenizer_dir(ckpt: Path, meta: dict, settings: Settings) -> Path | None:
    """Where the tokenizer of a checkpoint lives: beside it, or where its training run got it from."""
    for d in (ckpt, ckpt.parent, ckpt.parent.parent):
        if (d / "tokenizer.json").is_file():
            return d
    config = meta.get("config", {})
    if config.get("init"):  # post-training: the starting model's tokenizer
        return registry.hf_model(config["init"], settings).path
    dataset = (config.get("data") or {}).get("dataset")
    if dataset:  # pretraining: the dataset's tokenizer
        from jobs.pretrain import resolve_dataset

        manifest = Path(resolve_dataset(dataset, settings)) / "manifest.json"
        tok = json.loads(manifest.read_text(encoding="utf-8")).get("tokenizer", {}).get("path")
        if tok:
            return Path(tok)
    return None


def _load_checkpoint_model(ckpt: Path, meta: dict, settings: Settings, source: str) -> Transformer:
    config = meta.get("config", {})
    if config.get("init"):  # a post-training checkpoint: the starting model (+ LoRA), then its weights
        from llm_core.lora import LoRAConfig, strip_lora

        init_dir = registry.hf_model(config["init"], settings).path
        lora = LoRAConfig.model_validate(config["lora"]) if config.get("lora") else None
        model = build_model(init_dir, lora)
        state = load_checkpoint(ckpt, restore_rng=False)
        model.load_state_dict(state["model_state"])
        return strip_lora(model) if lora is not None else model
    try:
        return load_model_from_checkpoint(ckpt)
    except Exception as exc:
        raise ValueError(
            f"model {source!r}: checkpoint {ckpt} cannot be loaded ({type(exc).__name__}: {exc})"
        ) from None


def load_model(spec: ModelSpec, settings: Settings, source: str | None = None) -> LoadedModel:
    source = source or spec.source
    if not source:
        raise ValueError(
            "no model to evaluate: pass --model models:/<name>/<version> | models:/<name>@<alias> | <HF dir> | "
            "<checkpoint dir>"
        )
    device = pick_device(spec)
    resolved = registry.resolve_fetched(source, settings)  # typed errors naming the model and the fix
    assert resolved.path is not None
    hf_dir: Path | None
    if resolved.kind == "checkpoint":
        ckpt = resolved.path
        meta = read_meta(ckpt)
        model = _load_checkpoint_model(ckpt, meta, settings, source)
        tok_dir = Path(spec.tokenizer) if spec.tokenizer else _checkpoint_tokenizer_dir(ckpt, meta, settings)
        if tok_dir is None:
            raise ValueError(
                f"model {source!r}: no tokenizer found for checkpoint {ckpt} (none beside it and its config names "
                "no dataset or init model): pass model.tokenizer=<tokenizer dir>"
            )
        tokenizer = load_tokenizer(tok_dir, source)
        hf_dir = None
    else:
        hf_dir = resolved.path
        tokenizer = load_tokenizer(Path(spec.tokenizer) if spec.tokenizer else hf_dir, source)
        try:
            model = load_hf(hf_dir)
        except ValueError as exc:
            raise ValueError(f"model {source!r}: {exc}") from None
    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise ValueError(
            f"model {source!r}: its tokenizer has {tokenizer.vocab_size} tokens but the model only "
            f"{model.cfg.vocab_size}: pass the tokenizer the model was trained with (model.tokenizer=...)"
        )
    with torch.no_grad():  # cast the weights only: RoPE tables stay fp32, as in load_hf
        for p in model.parameters():
            p.data = p.data.to(DTYPES[spec.dtype])
    model = model.to(device).eval()
    log.info(
        "loaded %s (%s, %.2fM parameters) on %s",
        resolved.uri,
        resolved.kind,
        model.num_params() / 1e6,
        device,
    )
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        source=source,
        uri=resolved.uri,
        kind=resolved.kind,
        hf_dir=hf_dir,
        name=resolved.name,
        version=resolved.version,
        version_tags=dict(resolved.tags),
        aliases=list(resolved.aliases),
    )
