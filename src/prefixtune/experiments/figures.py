"""The reports' PNG figures: metric against a size (lines) and metric by configuration (bars), mean ± std."""
from __future__ import annotations

import io
from pathlib import Path
from ..atomic import atomic_write_bytes
from .aggregate import Agg


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 11, "axes.grid": True, "grid.alpha": 0.3, "figure.dpi": 110})
    return plt


def save_figure(fig, path: Path):
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


COLORS = {"prefix": "#1f77b4", "finetune": "#d62728", "finetune-top2": "#ff7f0e", "adapter": "#2ca02c",
          "embedding-only": "#9467bd", "infix": "#8c564b"}


def line_figure(path: Path, series: dict[str, list[tuple[float, Agg]]], xlabel: str, ylabel: str, title: str,
                logx: bool = False):
    """Lines with error bars (std over samples and seeds), one per series, like the paper's figures."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for i, (name, points) in enumerate(series.items()):
        points = [(x, a) for x, a in points if a.n]
        if not points:
            continue
        xs = [x for x, _ in points]
        ax.errorbar(xs, [a.mean for _, a in points], yerr=[a.std for _, a in points], marker="os^D"[i % 4],
                    capsize=4, label=name, color=COLORS.get(name.split(" ")[0].lower()))
    if logx:
        ax.set_xscale("log")
    xs = sorted({x for pts in series.values() for x, a in pts if a.n})
    if xs:
        ax.set_xticks(xs)
        ax.set_xticklabels([f"{x:g}" for x in xs])
        ax.minorticks_off()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    return save_figure(fig, path)


def bar_figure(path: Path, groups: dict[str, dict[str, Agg]], ylabel: str, title: str,
               reference: tuple[str, Agg] | None = None, show_points: bool = True):
    """Grouped bars (mean ± std) with the individual cells as dots; an optional reference line (e.g. PREFIX)."""
    plt = _pyplot()
    names = list(groups)
    members = list(dict.fromkeys(m for g in groups.values() for m in g))
    width = 0.8 / max(len(members), 1)
    # Each group needs room for its bars and for its label (about 0.1 inch a character at this font size);
    # past 11 inches the labels turn vertical instead of the figure growing further.
    per_group = max(0.78 * max(1, len(members)), 0.1 * max(map(len, names), default=1) + 0.35)
    vertical = per_group * len(names) > 11
    fig, ax = plt.subplots(figsize=(min(11.0, max(5.5, per_group * len(names))), 4))
    cmap = plt.get_cmap("tab10")
    for j, member in enumerate(members):
        xs, means, stds = [], [], []
        for i, g in enumerate(names):
            agg = groups[g].get(member)
            if agg is None or not agg.n:
                continue
            x = i + (j - (len(members) - 1) / 2) * width
            xs.append(x)
            means.append(agg.mean)
            stds.append(agg.std)
            if show_points and agg.n > 1:
                ax.scatter([x] * agg.n, agg.values, color="black", s=10, zorder=3)
        ax.bar(xs, means, width * 0.95, yerr=stds, capsize=4, label=member if len(members) > 1 else None,
               color=cmap(j % 10), alpha=0.85)
    if reference is not None and reference[1].n:
        ax.axhline(reference[1].mean, color="black", linestyle="--", linewidth=1.2,
                   label=f"{reference[0]} ({reference[1].mean:.1f})")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=90 if vertical else 0)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if len(members) > 1 or reference is not None:
        ax.legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: bars fill the axes
    return save_figure(fig, path)
