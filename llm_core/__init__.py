"""llm_core: Tulpar's model code (no Ray, no Kubernetes). Model, tokenizer, data formats, losses, checkpoints, export."""

from llm_core.config import ConfigError, ModelConfig
from llm_core.model import KVCache, ModelOutput, Transformer

__all__ = [
    "ConfigError",
    "KVCache",
    "ModelConfig",
    "ModelOutput",
    "Transformer",
]
