"""Which torch device a job runs on: `auto | cpu | cuda | cuda:N | mps`, resolved the same way everywhere.

auto = CUDA when a GPU is visible, else Apple's MPS when available, else the CPU. An explicit device that is not
there is a ValueError naming the fix (never a silent fallback to the CPU). MPS paths are written but untested
here (no Apple machine): bf16 autocast is used on CUDA only, MPS runs fp32 unless asked otherwise.
"""

from __future__ import annotations

import re
from typing import Literal

import torch

DeviceName = Literal["auto", "cpu", "cuda", "mps"]
DEVICE_HELP = "auto (CUDA, else Apple MPS, else CPU), cpu, cuda, cuda:N or mps"


def mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(name: str) -> torch.device:
    """The torch.device for `name` (see the module docstring); ValueError when it is unknown or absent."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if mps_available() else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", name)
    if match:
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {name!r}: no CUDA GPU is visible to this process (torch.cuda.is_available() is False): "
                "use device auto or cpu, or run on a machine with an NVIDIA GPU and a CUDA build of torch"
            )
        index = int(match.group(1) or 0)
        if index >= torch.cuda.device_count():
            raise ValueError(
                f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) are visible: use cuda:0 .. "
                f"cuda:{torch.cuda.device_count() - 1}"
            )
        return torch.device("cuda", index)
    if name == "mps":
        if not mps_available():
            raise ValueError(
                "device 'mps': Apple's Metal backend is not available here (torch.backends.mps.is_available() is "
                "False): use device auto or cpu"
            )
        return torch.device("mps")
    raise ValueError(f"device {name!r} is not one of: {DEVICE_HELP}")
