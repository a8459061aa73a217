"""The loss curve of a training run as a PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence


def plot_losses(steps: Sequence[int], losses: Sequence[float], path: str | Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(list(steps), list(losses), marker=".", linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
