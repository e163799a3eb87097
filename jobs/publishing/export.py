"""The files of a model's HF export that go to the Hub, and the folder that is uploaded.

The folder holds the export's weights (safetensors), config.json, generation_config.json, tulpar_config.json and
tokenizer files, copied byte for byte, plus README.md (the model card) and the card's images under assets/.
"""

from __future__ import annotations

import shutil
from pathlib import Path

REQUIRED = ("config.json", "generation_config.json", "tokenizer.json")
OPTIONAL = (
    "tulpar_config.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "model.safetensors.index.json",
)
CARD = "README.md"
ASSETS = "assets"


def weight_files(hf_dir: Path) -> list[Path]:
    return sorted(hf_dir.glob("*.safetensors"))


def export_files(hf_dir: Path, reference: str) -> list[Path]:
    """The export's files to upload; a ValueError naming the fix when the directory is not a complete HF export."""
    missing = [name for name in REQUIRED if not (hf_dir / name).is_file()]
    weights = weight_files(hf_dir)
    if not weights:
        missing.append("*.safetensors weights")
    if missing:
        raise ValueError(
            f"model {reference!r}: {hf_dir} is not a complete HF export (missing {', '.join(missing)}): publish a "
            "registered version written by a training job (models:/<name>/<version>) or a directory written by "
            "llm_core.export_hf(model, dir, tokenizer=...)"
        )
    return [hf_dir / n for n in REQUIRED] + [hf_dir / n for n in OPTIONAL if (hf_dir / n).is_file()] + weights


def write_folder(out: Path, files: list[Path], card: str, assets: dict[str, Path]) -> list[str]:
    """Write the upload folder into `out` (new or empty): the export's files, README.md and assets/<name>.
    Returns the relative paths written, sorted."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(
            f"--out {str(out)!r} exists and is not an empty directory: pass a new or empty directory"
        )
    out.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copyfile(f, out / f.name)
    (out / CARD).write_text(card, encoding="utf-8")
    if assets:
        (out / ASSETS).mkdir()
        for name, src in assets.items():
            shutil.copyfile(src, out / ASSETS / name)
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
