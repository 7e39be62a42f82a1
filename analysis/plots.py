"""The report's figures as PNG bytes (matplotlib's Agg canvas: no display, no global pyplot state).

Each function takes the aggregator's tables and returns PNG bytes, or None when the sweep holds no
data for that figure (e.g. no DenseNet pair, no EfficientNet); :func:`all_figures` says which
figures were skipped and why, and the report repeats it.
"""
from __future__ import annotations

import io
from typing import Sequence

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from common.schema import TASKS

FAMILY_COLORS = {"resnet": "#1f77b4", "densenet": "#d62728", "efficientnet": "#2ca02c"}


def _tasks_in(df: pd.DataFrame) -> list[str]:
    present = set(df["task"])
    return [t for t in TASKS if t in present] + sorted(present - set(TASKS))


def _grid(n: int, width: float = 3.4, height: float = 2.9) -> tuple[Figure, list]:
    cols = min(n, 3)
    rows = -(-n // cols)
    fig = Figure(figsize=(width * cols, height * rows), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(n)]
    return fig, axes


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _legend(fig: Figure, ax) -> None:
    """One legend for the figure, below the panels (never over the data)."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=len(handles), fontsize=8,
                   frameon=False)


def _res_axis(ax, resolutions: Sequence[int]) -> None:
    ax.set_xticks(list(resolutions))
    ax.set_xlabel("resolution (px)")
    ax.grid(alpha=0.3)


def auroc_vs_resolution(summary: pd.DataFrame, mode: str) -> bytes | None:
    """Per task: mean AUROC over all runs (line), mean +- std (band), min-max (light band) and
    the maximum (markers), against the resolution."""
    s = summary[summary["task_mode"] == mode]
    if s.empty:
        return None
    tasks = _tasks_in(s)
    fig, axes = _grid(len(tasks))
    for ax, task in zip(axes, tasks):
        t = s[s["task"] == task].sort_values("resolution")
        x = t["resolution"].to_numpy(float)
        mean, std = t["mean"].to_numpy(float), np.nan_to_num(t["std"].to_numpy(float))
        ax.fill_between(x, t["min"], t["max"], color="#1f77b4", alpha=0.12, lw=0, label="min–max")
        ax.fill_between(x, mean - std, mean + std, color="#1f77b4", alpha=0.28, lw=0, label="mean ± std")
        ax.plot(x, mean, "o-", color="#1f77b4", lw=1.8, ms=4, label="mean")
        ax.plot(x, t["max"], "^", color="#d62728", ms=5, label="max")
        ax.set_title(task, fontsize=10)
        ax.set_ylabel("validation AUROC")
        _res_axis(ax, t["resolution"].astype(int).tolist())
    _legend(fig, axes[0])
    fig.suptitle(f"Best-epoch AUROC vs resolution ({mode}-task; all models and seeds)", fontsize=11)
    return _png(fig)


def model_scaling_figure(scaling: pd.DataFrame, mode: str) -> bytes | None:
    """Per task: delta(mean) bars and delta(max) markers of ResNet152-ResNet50 and
    DenseNet161-DenseNet121 per resolution; the best model at each resolution written above."""
    s = scaling[scaling["task_mode"] == mode]
    if s.empty:
        return None
    tasks = _tasks_in(s)
    families = [f for f in ("resnet", "densenet") if f in set(s["family"])]
    fig, axes = _grid(len(tasks))
    width = 0.8 / max(len(families), 1)
    for ax, task in zip(axes, tasks):
        t = s[s["task"] == task]
        resolutions = sorted(t["resolution"].unique())
        pos = {r: i for i, r in enumerate(resolutions)}
        for k, fam in enumerate(families):
            f = t[t["family"] == fam].sort_values("resolution")
            if f.empty:
                continue
            x = np.array([pos[r] for r in f["resolution"]]) + (k - (len(families) - 1) / 2) * width
            label = f"{f['larger'].iloc[0]} − {f['smaller'].iloc[0]}"
            ax.bar(x, f["delta_mean"], width=width * 0.9, color=FAMILY_COLORS[fam], alpha=0.75,
                   label=f"Δmean {label}")
            ax.plot(x, f["delta_max"], "D", color="black", ms=3.5,
                    label="Δmax" if k == 0 else None)
        ax.axhline(0, color="grey", lw=0.8)
        lo, hi = ax.get_ylim()
        pad = 0.18 * (hi - lo if hi > lo else 1.0)
        ax.set_ylim(lo, hi + pad)
        for r in resolutions:
            best = t[t["resolution"] == r].iloc[0]
            ax.text(pos[r], hi + pad * 0.35, f"★ {best['best_model']}", ha="center", va="bottom",
                    fontsize=6, rotation=0)
        ax.set_xticks(range(len(resolutions)))
        ax.set_xticklabels([str(int(r)) for r in resolutions])
        ax.set_xlabel("resolution (px)  (★ best model by mean AUROC)", fontsize=8)
        ax.set_ylabel("ΔAUROC (larger − smaller)")
        ax.set_title(task, fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    _legend(fig, axes[0])
    fig.suptitle(f"Model scaling per task and resolution ({mode}-task)", fontsize=11)
    return _png(fig)


def efficientnet_figure(eff: pd.DataFrame, mode: str) -> bytes | None:
    """Per task: EfficientNet mean +- std and max per resolution, variant written at each point."""
    e = eff[eff["task_mode"] == mode]
    if e.empty:
        return None
    tasks = _tasks_in(e)
    fig, axes = _grid(len(tasks))
    for ax, task in zip(axes, tasks):
        t = e[e["task"] == task].sort_values("resolution")
        x = t["resolution"].to_numpy(float)
        ax.errorbar(x, t["mean"], yerr=np.nan_to_num(t["std"].to_numpy(float)), fmt="o-",
                    color=FAMILY_COLORS["efficientnet"], capsize=3, ms=4, label="mean ± std")
        ax.plot(x, t["max"], "^", color="#d62728", ms=5, label="max")
        for xi, yi, m in zip(x, t["mean"], t["model"]):
            ax.annotate(str(m).replace("efficientnet-", "").upper(), (xi, yi),
                        textcoords="offset points", xytext=(0, 7), ha="center", fontsize=7)
        ax.set_title(task, fontsize=10)
        ax.set_ylabel("validation AUROC")
        _res_axis(ax, t["resolution"].astype(int).tolist())
    _legend(fig, axes[0])
    fig.suptitle(f"EfficientNet (compound scaling) per resolution ({mode}-task)", fontsize=11)
    return _png(fig)


def all_figures(trials: pd.DataFrame, tables: dict[str, pd.DataFrame]
                ) -> tuple[dict[str, bytes], list[str]]:
    """{file name: PNG bytes} and the skipped figures with their reason."""
    figs: dict[str, bytes] = {}
    skipped: list[str] = []
    summary = tables["summary_resolution"]
    modes = list(dict.fromkeys(summary["task_mode"])) if not summary.empty else []
    if not modes:
        return figs, ["all figures: no finished trial with an AUROC"]
    suffix = (lambda m: "") if len(modes) == 1 else (lambda m: f"-{m}")
    makers = [
        ("auroc_vs_resolution", lambda m: auroc_vs_resolution(summary, m),
         "no AUROC per resolution"),
        ("model_scaling", lambda m: model_scaling_figure(tables["model_scaling"], m),
         "needs both models of a pair (ResNet152 and ResNet50, or DenseNet161 and DenseNet121) "
         "at the same task and resolution"),
        ("efficientnet", lambda m: efficientnet_figure(tables["efficientnet"], m),
         "no EfficientNet trial finished"),
    ]
    for stem, make, reason in makers:
        for mode in modes:
            name = f"{stem}{suffix(mode)}.png"
            try:
                png = make(mode)
            except Exception as exc:  # a figure must never cost the whole report
                skipped.append(f"{name}: failed to draw ({type(exc).__name__}: {exc})")
                continue
            if png is None:
                skipped.append(f"{name}: {reason}")
            else:
                figs[name] = png
    return figs, skipped
