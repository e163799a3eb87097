"""What the benchmark scripts record about the machine they ran on, and where they write it."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where it exists)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


BENCHMARKS_DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
BENCHMARKS_HEADER = "# Benchmarks\n\nSpeed measurements appended by the scripts in `benchmarks/`.\n"


def append_section(text: str, header: str = BENCHMARKS_HEADER) -> Path:
    """Append one section to docs/benchmarks.md in a single write (other benchmarks may append too), creating
    the file with `header` when it does not exist yet."""
    BENCHMARKS_DOC.parent.mkdir(parents=True, exist_ok=True)
    if not BENCHMARKS_DOC.exists():
        BENCHMARKS_DOC.write_text(header, encoding="utf-8")
    with BENCHMARKS_DOC.open("a", encoding="utf-8") as f:
        f.write(text)
    return BENCHMARKS_DOC
