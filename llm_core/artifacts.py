"""Checks that catch a corrupt or foreign artifact before any work starts, with an error naming the file.

- `check_safetensors`: a .safetensors file whose header is unreadable or whose size is not what its header says
  (truncated by an interrupted copy or download, or padded) is a ValueError naming the file and both sizes.
- `check_state_shapes`: a checkpoint whose tensors do not fit the model (another architecture or size) is a
  ValueError naming the checkpoint, the first mismatched tensor and both shapes (or the first missing or extra one).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

FIX_FILE = "re-export or re-download it"


def check_safetensors(path: str | Path) -> None:
    """ValueError unless `path` is a whole safetensors file: an 8-byte header length, a JSON header, and exactly
    the tensor bytes the header's data_offsets cover."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path} is truncated: {size} bytes, not even a safetensors header; {FIX_FILE}")
        (header_len,) = struct.unpack("<Q", head)
        if 8 + header_len > size:
            raise ValueError(
                f"{path} is truncated: its header needs {8 + header_len:,} bytes, the file has {size:,}; {FIX_FILE}"
            )
        try:
            header: dict[str, Any] = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(
                f"{path} is not a safetensors file (unreadable header: {exc}); {FIX_FILE}"
            ) from None
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    expected = 8 + header_len + max(ends, default=0)
    if size != expected:
        kind = "truncated" if size < expected else "longer than its header says"
        raise ValueError(f"{path} is {kind}: {size:,} bytes, its header says {expected:,}; {FIX_FILE}")


def check_state_shapes(expected: Mapping[str, Any], found: Mapping[str, Any], source: str | Path) -> None:
    """ValueError when the state dict `found` (read from `source`) does not fit a model whose state dict is
    `expected`: the first tensor whose shape differs, else the first missing or unexpected tensor."""
    for name, tensor in expected.items():
        if name in found and tuple(found[name].shape) != tuple(tensor.shape):
            raise ValueError(
                f"{source} is from another architecture: tensor {name!r} has shape {tuple(found[name].shape)} "
                f"there, the model expects {tuple(tensor.shape)}; resume or initialise from a checkpoint of this "
                "model config, or start a new run"
            )
    missing = [n for n in expected if n not in found]
    extra = [n for n in found if n not in expected]
    if missing or extra:
        what = f"lacks tensor {missing[0]!r}" if missing else f"has tensor {extra[0]!r} the model lacks"
        raise ValueError(
            f"{source} is from another architecture: it {what} ({len(missing)} missing, {len(extra)} unexpected); "
            "resume or initialise from a checkpoint of this model config, or start a new run"
        )
