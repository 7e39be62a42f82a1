"""The report's figures as PNG bytes (matplotlib's Agg canvas: no display, no global pyplot state).

Every figure is drawn from two tables: the configurations (one row per task, model and resolution:
mean AUROC over seeds with its DeLong 95% interval, ``analysis.effects.configurations``) and the
model-scaling pairs (``analysis.families.scaling_pairs``). A function returns None when the sweep
holds nothing for its figure (one model: no scaling pair; no EfficientNet); :func:`all_figures` says
which figures were skipped and why, and the report repeats it.
"""
from __future__ import annotations

import io
from typing import Callable, Sequence

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from analysis import families
from common.schema import TASKS

TASK_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2",
               "#7f7f7f", "#bcbd22", "#17becf")
MODEL_COLORS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3",
                "#8c8c8c", "#ccb974", "#64b5cd")


def _tasks_in(df: pd.DataFrame) -> list[str]:
    present = set(df["task"])
    return [t for t in TASKS if t in present] + sorted(present - set(TASKS))


def _grid(n: int, width: float = 3.4, height: float = 2.9, cols: int = 3) -> tuple[Figure, list]:
    cols = max(1, min(n, cols))
    rows = -(-n // cols)
    fig = Figure(figsize=(width * cols, height * rows), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(n)]
    return fig, axes


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _legend(fig: Figure, axes: Sequence) -> None:
    """One legend for the figure, below the panels (never over the data), from every panel."""
    seen: dict[str, object] = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, h)
    if seen:
        fig.legend(list(seen.values()), list(seen), loc="outside lower center",
                   ncols=min(len(seen), 5), fontsize=8, frameon=False)


def _res_axis(ax, resolutions: Sequence[int]) -> None:
    ax.set_xticks(sorted(set(int(r) for r in resolutions)))
    ax.set_xlabel("resolution (px)")
    ax.grid(alpha=0.3)


def _yerr(t: pd.DataFrame) -> np.ndarray:
    """Asymmetric error bars from the interval; 0 where it is unknown (no predictions)."""
    mean = t["mean"].to_numpy(float)
    low = np.nan_to_num(mean - t["ci_low"].to_numpy(float))
    high = np.nan_to_num(t["ci_high"].to_numpy(float) - mean)
    return np.vstack([np.clip(low, 0, None), np.clip(high, 0, None)])


def _model_groups(conf: pd.DataFrame) -> list[str]:
    """One panel per model; EfficientNet's compound-scaled variants share one panel."""
    groups = ["efficientnet" if families.is_compound_scaled(m) else m for m in conf["model"]]
    order = sorted(set(groups), key=lambda g: (families.family_and_size(g)[0],
                                               families.family_and_size(g)[1] or 0, g))
    return order


def _in_group(conf: pd.DataFrame, group: str) -> pd.DataFrame:
    if group == "efficientnet":
        return conf[conf["model"].map(families.is_compound_scaled)]
    return conf[conf["model"] == group]


# --- the answer --------------------------------------------------------------------------------------
def answer_heatmap(conf: pd.DataFrame, mode: str) -> bytes | None:
    """Task x resolution: the highest mean AUROC over models (mean over seeds), the model named."""
    c = conf[conf["task_mode"] == mode]
    if c.empty:
        return None
    tasks = _tasks_in(c)
    resolutions = sorted(c["resolution"].unique())
    best = c.loc[c.groupby(["task", "resolution"])["mean"].idxmax()]
    values = np.full((len(tasks), len(resolutions)), np.nan)
    names = [["" for _ in resolutions] for _ in tasks]
    for _, r in best.iterrows():
        i, j = tasks.index(r["task"]), resolutions.index(r["resolution"])
        values[i, j] = r["mean"]
        names[i][j] = str(r["model"])
    fig = Figure(figsize=(max(5.5, 2.2 + 1.25 * len(resolutions)), 1.2 + 0.62 * len(tasks)),
                 dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    finite = values[np.isfinite(values)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.5, 1.0)
    if hi - lo < 0.02:
        lo, hi = lo - 0.01, hi + 0.01
    im = ax.imshow(values, cmap="viridis", vmin=lo, vmax=hi, aspect="auto")
    for i in range(len(tasks)):
        row_best = np.nanargmax(values[i]) if np.isfinite(values[i]).any() else -1
        for j in range(len(resolutions)):
            if not np.isfinite(values[i, j]):
                continue
            light = (values[i, j] - lo) / (hi - lo) > 0.6
            ax.text(j, i, f"{values[i, j]:.3f}{' ★' if j == row_best else ''}\n{names[i][j]}",
                    ha="center", va="center", fontsize=7, color="black" if light else "white",
                    fontweight="bold" if j == row_best else "normal")
    ax.set_xticks(range(len(resolutions)))
    ax.set_xticklabels([f"{int(r)} px" for r in resolutions])
    ax.set_yticks(range(len(tasks)))
    ax.set_yticklabels(tasks)
    fig.colorbar(im, ax=ax, label="mean AUROC", shrink=0.9)
    ax.set_title(f"Mean AUROC of the best model\nper task and resolution ({mode}-task; ★ best)",
                 fontsize=10)
    return _png(fig)


# --- the thesis's figures ------------------------------------------------------------------------------
def auroc_vs_resolution_per_model(conf: pd.DataFrame, mode: str) -> bytes | None:
    """One panel per model: mean AUROC against resolution, one line per task, DeLong 95% bars."""
    c = conf[conf["task_mode"] == mode]
    if c.empty:
        return None
    tasks = _tasks_in(c)
    groups = _model_groups(c)
    fig, axes = _grid(len(groups), width=3.8, height=3.1)
    offsets = np.linspace(-4, 4, len(tasks)) if len(tasks) > 1 else np.zeros(1)
    for ax, group in zip(axes, groups):
        g = _in_group(c, group)
        for k, task in enumerate(tasks):
            t = g[g["task"] == task].sort_values("resolution")
            if t.empty:
                continue
            x = t["resolution"].to_numpy(float) + offsets[k]   # side by side, bars readable
            ax.errorbar(x, t["mean"], yerr=_yerr(t), fmt="o-", ms=3.5, lw=1.4, capsize=2.5,
                        color=TASK_COLORS[k % len(TASK_COLORS)], label=task)
        if group == "efficientnet":
            for r, m in sorted(set(zip(g["resolution"], g["model"]))):
                ax.annotate(str(m).split("-")[-1].upper(), (r, 0), xycoords=("data", "axes fraction"),
                            xytext=(0, 3), textcoords="offset points", ha="center", fontsize=7)
        ax.set_title(group, fontsize=10)
        ax.set_ylabel("validation AUROC")
        _res_axis(ax, g["resolution"].tolist())
    _legend(fig, axes)
    fig.suptitle(f"AUROC vs resolution per model ({mode}-task; mean over seeds, DeLong 95% CI)",
                 fontsize=11)
    return _png(fig)


def models_per_resolution(conf: pd.DataFrame, mode: str) -> bytes | None:
    """One panel per resolution: per task, one bar per model with its DeLong 95% interval."""
    c = conf[conf["task_mode"] == mode]
    if c.empty:
        return None
    tasks = _tasks_in(c)
    resolutions = sorted(c["resolution"].unique())
    models = _model_groups(c)
    fig, axes = _grid(len(resolutions), width=max(3.6, 0.55 * len(tasks) * max(len(models), 2) / 2),
                      height=3.0, cols=2)
    width = 0.8 / len(models)
    lows = c["ci_low"].where(c["ci_low"].notna(), c["mean"])
    floor = max(0.0, float(np.nanmin(lows)) - 0.05)
    for ax, res in zip(axes, resolutions):
        r = c[c["resolution"] == res]
        for k, group in enumerate(models):
            t = _in_group(r, group).set_index("task").reindex(tasks)
            if t["mean"].isna().all():
                continue
            x = np.arange(len(tasks)) + (k - (len(models) - 1) / 2) * width
            label = group if group != "efficientnet" else "efficientnet (variant per resolution)"
            ax.bar(x, t["mean"] - floor, bottom=floor, width=width * 0.9, yerr=_yerr(t),
                   capsize=2, color=MODEL_COLORS[k % len(MODEL_COLORS)], label=label,
                   error_kw={"lw": 0.8})
        variant = _in_group(r, "efficientnet")["model"].unique()
        suffix = f" (EfficientNet {str(variant[0]).split('-')[-1].upper()})" if len(variant) == 1 else ""
        ax.set_xticks(range(len(tasks)))
        ax.set_xticklabels(tasks, rotation=20, ha="right", fontsize=8)
        ax.set_ylim(floor, 1.0)
        ax.set_ylabel("validation AUROC")
        ax.set_title(f"{int(res)} px{suffix}", fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    _legend(fig, axes)
    fig.suptitle(f"Models per resolution ({mode}-task; mean over seeds, DeLong 95% CI)",
                 fontsize=11)
    return _png(fig)


def best_configurations(conf: pd.DataFrame, mode: str) -> bytes | None:
    """Per task: the best configuration at each resolution (mean, DeLong 95% CI), the overall
    best filled and labelled."""
    c = conf[conf["task_mode"] == mode]
    if c.empty:
        return None
    tasks = _tasks_in(c)
    best = c.loc[c.groupby(["task", "resolution"])["mean"].idxmax()]
    fig, axes = _grid(len(tasks), width=3.4, height=2.7)
    for ax, task in zip(axes, tasks):
        t = best[best["task"] == task].sort_values("resolution")
        top = t.loc[t["mean"].idxmax()]
        ax.errorbar(t["resolution"], t["mean"], yerr=_yerr(t), fmt="o", mfc="white", ms=5,
                    capsize=3, color="#4c72b0", label="best model at the resolution")
        ax.errorbar([top["resolution"]], [top["mean"]], yerr=_yerr(t.loc[[top.name]]), fmt="o",
                    ms=7, capsize=3, color="#c44e52", label="best configuration")
        for _, r in t.iterrows():
            ax.annotate(str(r["model"]), (r["resolution"], r["mean"]), xytext=(4, -9),
                        textcoords="offset points", fontsize=6.5, rotation=0)
        ax.set_title(f"{task}: {top['model']} @ {int(top['resolution'])} px", fontsize=9)
        ax.set_ylabel("validation AUROC")
        _res_axis(ax, t["resolution"].tolist())
    _legend(fig, axes)
    fig.suptitle(f"Best configurations ({mode}-task; mean over seeds, DeLong 95% CI)", fontsize=11)
    return _png(fig)


def model_scaling(scaling: pd.DataFrame, mode: str) -> bytes | None:
    """Per task: delta(mean) bars and delta(max) markers of every pair of sizes of one family per
    resolution; the best model at each resolution written above."""
    s = scaling[scaling["task_mode"] == mode]
    if s.empty:
        return None
    tasks = _tasks_in(s)
    pairs = list(dict.fromkeys(zip(s["family"], s["larger"], s["smaller"])))
    fig, axes = _grid(len(tasks), width=max(3.4, 0.5 * len(pairs) * s["resolution"].nunique()))
    width = 0.8 / len(pairs)
    for ax, task in zip(axes, tasks):
        t = s[s["task"] == task]
        resolutions = sorted(t["resolution"].unique())
        pos = {r: i for i, r in enumerate(resolutions)}
        for k, (fam, large, small) in enumerate(pairs):
            f = t[(t["larger"] == large) & (t["smaller"] == small)].sort_values("resolution")
            if f.empty:
                continue
            x = np.array([pos[r] for r in f["resolution"]]) + (k - (len(pairs) - 1) / 2) * width
            ax.bar(x, f["delta_mean"], width=width * 0.9, color=MODEL_COLORS[k % len(MODEL_COLORS)],
                   alpha=0.8, label=f"Δmean {large} − {small}")
            ax.plot(x, f["delta_max"], "D", color="black", ms=3.5, label="Δmax")
        ax.axhline(0, color="grey", lw=0.8)
        lo, hi = ax.get_ylim()
        pad = 0.18 * (hi - lo if hi > lo else 1.0)
        ax.set_ylim(lo, hi + pad)
        for r in resolutions:
            ax.text(pos[r], hi + pad * 0.35, f"★ {t[t['resolution'] == r].iloc[0]['best_model']}",
                    ha="center", va="bottom", fontsize=6)
        ax.set_xticks(range(len(resolutions)))
        ax.set_xticklabels([str(int(r)) for r in resolutions])
        ax.set_xlabel("resolution (px)  (★ best model by mean AUROC)", fontsize=8)
        ax.set_ylabel("ΔAUROC (larger − smaller)")
        ax.set_title(task, fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    _legend(fig, axes)
    fig.suptitle(f"Model scaling within each family ({mode}-task)", fontsize=11)
    return _png(fig)


def compound_scaling(eff: pd.DataFrame, mode: str) -> bytes | None:
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
                    color="#2ca02c", capsize=3, ms=4, label="mean ± std over seeds")
        ax.plot(x, t["max"], "^", color="#d62728", ms=5, label="max")
        for xi, yi, m in zip(x, t["mean"], t["model"]):
            ax.annotate(str(m).split("-")[-1].upper(), (xi, yi), textcoords="offset points",
                        xytext=(0, 7), ha="center", fontsize=7)
        ax.set_title(task, fontsize=10)
        ax.set_ylabel("validation AUROC")
        _res_axis(ax, t["resolution"].astype(int).tolist())
    _legend(fig, axes)
    fig.suptitle(f"EfficientNet with compound scaling per resolution ({mode}-task)", fontsize=11)
    return _png(fig)


# --- all of them ------------------------------------------------------------------------------------
#: (file stem, maker, reason when there is nothing to draw); the report keeps this order.
FIGURES: list[tuple[str, str, Callable, str]] = [
    ("answer_heatmap", "conf", answer_heatmap, "no finished trial with an AUROC"),
    ("auroc_vs_resolution_per_model", "conf", auroc_vs_resolution_per_model,
     "no finished trial with an AUROC"),
    ("models_per_resolution", "conf", models_per_resolution, "no finished trial with an AUROC"),
    ("best_configurations", "conf", best_configurations, "no finished trial with an AUROC"),
    ("model_scaling", "scaling", model_scaling,
     "needs two sizes of one family (e.g. resnet18 and resnet34) at the same task and resolution"),
    ("efficientnet", "compound", compound_scaling, "no EfficientNet trial finished"),
]


def all_figures(tables: dict[str, pd.DataFrame]) -> tuple[dict[str, bytes], list[str]]:
    """{file name: PNG bytes} and the skipped figures with their reason, from the tables
    ``conf`` (effects.configurations), ``scaling`` (families.scaling_pairs) and ``compound``
    (families.compound_scaling)."""
    figs: dict[str, bytes] = {}
    skipped: list[str] = []
    conf = tables["conf"]
    modes = list(dict.fromkeys(conf["task_mode"])) if not conf.empty else []
    if not modes:
        return figs, ["all figures: no finished trial with an AUROC"]
    suffix = (lambda m: "") if len(modes) == 1 else (lambda m: f"-{m}")
    for stem, table, make, reason in FIGURES:
        for mode in modes:
            name = f"{stem}{suffix(mode)}.png"
            try:
                png = make(tables[table], mode)
            except Exception as exc:  # a figure must never cost the whole report
                skipped.append(f"{name}: failed to draw ({type(exc).__name__}: {exc})")
                continue
            if png is None:
                skipped.append(f"{name}: {reason}")
            else:
                figs[name] = png
    return figs, skipped
