"""Every PNG the platform writes goes through here: one matplotlib setup (the headless Agg backend, chosen once,
before pyplot is imported) and the plots the stages share.

    plt = pyplot()
    fig, ax = plt.subplots(...)
    save_png(fig, path)            # or png_bytes(fig) for an atomic write by the caller
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display: jobs run in Ray workers, containers, CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png_bytes(fig: Any) -> bytes:
    """The figure as PNG bytes (tight layout), closed afterwards."""
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    pyplot().close(fig)
    return buf.getvalue()


def save_png(fig: Any, path: Path) -> Path:
    """Write the figure to `path` as PNG (tight layout), closed afterwards."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    pyplot().close(fig)
    return path


def plot_loss_curve(history: list[dict[str, float]], path: Path, title: str = "loss") -> Path:
    """Train loss per step and validation loss per language, as a PNG."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    key = "train_loss" if any("train_loss" in h for h in history) else "loss"
    train = [(h["step"], h[key]) for h in history if key in h]
    if train:
        ax.plot(*zip(*train), label="train", lw=1.2)
    val_keys = sorted({k for h in history for k in h if k.startswith("val_loss/")})
    for key in val_keys:
        pts = [(h["step"], h[key]) for h in history if key in h]
        ax.plot(*zip(*pts), marker="o", ms=3, label=key.replace("val_loss/", "val "))
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_png(fig, path)


def plot_documents_by_reason(rep: dict, reasons: list[str], path: Path) -> Path:
    """Preprocessing: kept and dropped documents per source language, stacked by drop reason."""
    plt = pyplot()
    langs = list(rep["languages"])
    fig, ax = plt.subplots(figsize=(8, 0.4 * max(4, len(reasons) + 2)), dpi=110)
    left = np.zeros(len(langs))
    kept = np.array([rep["languages"][lang]["kept"]["documents"] for lang in langs], dtype=float)
    ax.barh(langs, kept, label="kept", color="#4c9a2a")
    left += kept
    for r in reasons:
        vals = np.array(
            [rep["languages"][lang]["dropped"].get(r, {}).get("documents", 0) for lang in langs], float
        )
        ax.barh(langs, vals, left=left, label=r)
        left += vals
    ax.set_xlabel("documents")
    ax.set_title(f"{rep['name']}: kept and dropped documents per source language")
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    return save_png(fig, path)


def plot_metric_panels(history: list[dict[str, float]], keys: list[str], path: Path, title: str) -> Path:
    """One panel per metric of `keys` that was logged (e.g. an RL run's reward, held-out reward, KL, entropy)
    against the step, as a PNG; held-out (`val_`) metrics get markers."""
    keys = [k for k in keys if any(k in h for h in history)]
    if not keys:
        raise RuntimeError(f"none of the metrics {keys} was logged: nothing to plot")
    plt = pyplot()
    cols = 2
    rows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(10, 2.6 * rows), dpi=110, squeeze=False)
    for ax, key in zip(axes.flat, keys):
        pts = [(h["step"], h[key]) for h in history if key in h]
        ax.plot(*zip(*pts), marker="o" if key.startswith("val_") else None, ms=3, lw=1.2)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    return save_png(fig, path)


def plot_heatmap(
    values: list[list[float]],
    row_labels: list[str],
    col_labels: list[str],
    path: Path,
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    vmin: float | None = None,
    vmax: float | None = None,
) -> Path:
    """A matrix as a heat-map with each cell's value written in it (e.g. passkey accuracy, length x depth)."""
    plt = pyplot()
    data = np.asarray(values, dtype=float)
    fig, ax = plt.subplots(figsize=(1.1 * len(col_labels) + 2.5, 0.55 * len(row_labels) + 1.8), dpi=110)
    im = ax.imshow(data, cmap="RdYlGn", vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(col_labels)), col_labels)
    ax.set_yticks(range(len(row_labels)), row_labels)
    lo = np.nanmin(data) if vmin is None else vmin
    hi = np.nanmax(data) if vmax is None else vmax
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            mid = abs(data[i, j] - (lo + hi) / 2) < 0.3 * max(hi - lo, 1e-9)
            ax.text(
                j,
                i,
                f"{data[i, j]:.2f}",
                ha="center",
                va="center",
                fontsize=8,
                color="black" if mid else "white",
            )
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax)
    return save_png(fig, path)


def plot_lines(
    curves: dict[str, list[tuple[float, float]]], path: Path, *, title: str, xlabel: str, ylabel: str
) -> Path:
    """One marked line per label (e.g. bits-per-byte by position bucket, one line per language)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for label, pts in curves.items():
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=3, lw=1.2, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_png(fig, path)
