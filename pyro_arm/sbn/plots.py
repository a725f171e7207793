# SPDX-License-Identifier: Apache-2.0
"""
PNG figures of a training run, drawn with matplotlib's Agg canvas (no display, no pyplot state).

- ``learning_curves.png``: training and validation ``-ELBO`` (nats) against the step;
- ``reconstructions.png``: test images (top row) and their reconstructions, the pixel
  probabilities of ``x`` given one draw ``z1 ~ q(z1 | x)`` (bottom row);
- ``samples.png``: pixel probabilities of ``x`` given ancestral samples of the latents.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pyro_arm.sbn.files import atomic_write


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))


def plot_learning_curves(rows: Sequence[dict], path: Path, title: str = "") -> None:
    """Train loss and validation -ELBO of ``metrics.csv`` rows against the step."""
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["train_loss"] for r in rows], "o-", label="train -ELBO (interval mean)")
    ax.plot(steps, [r["valid_neg_elbo"] for r in rows], "s-", label="valid -ELBO")
    ax.set_xlabel("step")
    ax.set_ylabel("nats per image")
    ax.set_title(title or "learning curves")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def image_grid(images: torch.Tensor, ncols: int) -> torch.Tensor:
    """``(N, 784)`` images as one ``(rows*28, ncols*28)`` grid (missing cells blank)."""
    n = images.shape[0]
    nrows = math.ceil(n / ncols)
    grid = torch.ones(nrows * 28, ncols * 28)
    for i, image in enumerate(images.detach().float().cpu().reshape(n, 28, 28)):
        r, c = divmod(i, ncols)
        grid[r * 28 : (r + 1) * 28, c * 28 : (c + 1) * 28] = image
    return grid


def _show(path: Path, grid: torch.Tensor, title: str, figsize) -> None:
    fig = Figure(figsize=figsize, layout="constrained")
    ax = fig.add_subplot()
    ax.imshow(grid.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(title)
    _save(fig, path)


@torch.no_grad()
def plot_reconstructions(sbn, x: torch.Tensor, path: Path) -> None:
    """Images ``x`` (top row) and their reconstructions (bottom row)."""
    recon = sbn.reconstruct(x)
    grid = image_grid(torch.cat([x, recon]), ncols=x.shape[0])
    _show(path, grid, "test images (top) and reconstructions (bottom)", (x.shape[0] * 0.8, 2.2))


@torch.no_grad()
def plot_samples(sbn, path: Path, n: int = 64) -> None:
    """Pixel probabilities given ``n`` ancestral samples of the latents."""
    grid = image_grid(sbn.sample(n), ncols=int(math.ceil(math.sqrt(n))))
    _show(path, grid, "samples from the model (pixel probabilities)", (6, 6.3))


def save_all(sbn, rows: Sequence[dict], x: torch.Tensor, run_dir: Path) -> list[Path]:
    """Writes the three figures into ``run_dir``; returns their paths."""
    run_dir = Path(run_dir)
    paths = [run_dir / n for n in ("learning_curves.png", "reconstructions.png", "samples.png")]
    plot_learning_curves(rows, paths[0], title=run_dir.name)
    plot_reconstructions(sbn, x, paths[1])
    plot_samples(sbn, paths[2])
    return paths
