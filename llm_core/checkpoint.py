"""Training checkpoints: model, optimizer, scheduler, RNG, data position and resolved config, written atomically.

Layout of one checkpoint directory:
    state.pt    torch.save of {"model", "optimizer", "scheduler", "rng", "data"} (tensors and plain values only)
    meta.json   {"step", "metrics", "config", "format_version"}
A run keeps `best/` (lowest validation loss so far) and `last/` under its checkpoint root.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch

from llm_core.artifacts import check_state_shapes
from llm_core.io import atomic_dir, tensor_bytes

FORMAT_VERSION = 1


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(state["python"]) if isinstance(state["python"], list) else state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model under its training wrappers: DDP keeps it in `.module`, torch.compile in `._orig_mod`."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def save_checkpoint(
    path: str | Path,
    *,
    model: torch.nn.Module,
    step: int,
    config: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    data_state: dict[str, Any] | None = None,
    metrics: dict[str, float] | None = None,
    model_state: dict[str, Any] | None = None,
    optimizer_state: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint to `path` atomically: an interrupted save leaves the previous one intact.

    `model_state` / `optimizer_state` replace `model.state_dict()` / `optimizer.state_dict()` when given (e.g. the
    full, gathered state of an FSDP-sharded model)."""
    if model_state is None:
        model_state = unwrap_model(model).state_dict()
    if optimizer_state is None and optimizer is not None:
        optimizer_state = optimizer.state_dict()
    state = {
        "model": model_state,
        "optimizer": optimizer_state,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": rng_state(),
        "data": data_state,
    }
    meta = {"format_version": FORMAT_VERSION, "step": step, "metrics": metrics or {}, "config": config}
    with atomic_dir(path, expected_bytes=tensor_bytes(state)) as tmp:
        torch.save(state, tmp / "state.pt")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False), encoding="utf-8")
    return Path(path)


def read_meta(path: str | Path) -> dict[str, Any]:
    p = Path(path) / "meta.json"
    if not p.is_file():
        raise ValueError(
            f"{str(path)!r} is not a Tulpar checkpoint (no meta.json): pass a best/ or last/ directory"
        )
    return json.loads(p.read_text(encoding="utf-8"))


def load_checkpoint(
    path: str | Path,
    *,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    restore_rng: bool = True,
    map_location: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Restore what is passed in; returns {"step", "metrics", "config", "data", "model_state", "optimizer_state"}
    (the raw states, for callers that restore them differently, e.g. into a sharded model)."""
    meta = read_meta(path)
    state = torch.load(Path(path) / "state.pt", map_location=map_location, weights_only=False)
    if model is not None:
        core = unwrap_model(model)
        check_state_shapes(core.state_dict(), state["model"], Path(path) / "state.pt")
        core.load_state_dict(state["model"])
    if optimizer is not None and state["optimizer"] is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng:
        set_rng_state(state["rng"])
    return {
        "step": meta["step"],
        "metrics": meta["metrics"],
        "config": meta["config"],
        "data": state["data"],
        "model_state": state["model"],
        "optimizer_state": state["optimizer"],
    }


def load_model_from_checkpoint(path: str | Path, map_location: str = "cpu"):
    """Build the llm_core Transformer a checkpoint was trained with and load its weights."""
    from llm_core.config import ModelConfig
    from llm_core.model import Transformer

    meta = read_meta(path)
    model_cfg = meta["config"].get("model", meta["config"])
    model = Transformer(ModelConfig.model_validate(model_cfg))
    load_checkpoint(path, model=model, restore_rng=False, map_location=map_location)
    return model
