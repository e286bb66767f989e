"""The Pareto plot of the demo and the benchmarks: speed against quality, one point per policy
(needs matplotlib, of the ``demo`` extra)."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["pareto_plot"]


def pareto_plot(points: Sequence[tuple[str, float, float]], path: str, *, xlabel: str,
                ylabel: str, title: str, highlight: str = "calibrated") -> None:
    """Scatter ``(name, x, y)`` points, each labelled; names starting with ``highlight`` are
    red stars, the others blue dots. Writes a PNG to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for name, x, y in points:
        marked = name.startswith(highlight)
        ax.scatter(x, y, s=80 if marked else 25, marker="*" if marked else "o",
                   color="tab:red" if marked else "tab:blue", zorder=3 if marked else 2)
        ax.annotate(name, (x, y), fontsize=6, xytext=(3, 2), textcoords="offset points")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
