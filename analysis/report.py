"""``report.md`` and a self-contained ``report.html`` (inline CSS, figures as base64 data URIs, no
scripts, no external resources: it opens offline, from an e-mail or an S3 console alike).

Both are built from the same sections: the sweep and its grid, the dataset (a banner when it is
the synthetic phantom), what finished / failed / is missing, the results tables and figures, the
statistics (method and multiple-comparison correction) and every record that could not be read.
"""
from __future__ import annotations

import base64
import datetime as _dt
import html
import json
from typing import Any

import pandas as pd

from analysis import aggregate as agg
from common import storage

ALPHA = agg.ALPHA

STATISTICS_TEXT = (
    "Every best-epoch AUROC comes with a **DeLong 95% confidence interval** (DeLong et al. 1988, "
    "computed with the fast midrank algorithm of Sun & Xu 2014; Wald interval AUROC ± 1.96·SE, "
    "clipped to [0, 1]) from that epoch's study-level validation predictions. "
    "**Paired DeLong tests** compare two runs on the validation studies both scored (the "
    "correlation between two models judged on the same studies is taken into account): "
    "(a) *resolution*: every two resolutions for the same model and seed (EfficientNet: the "
    "compound-scaled family, B0 at 160 px ... B5 at 480 px); (b) *best configuration*: each task's "
    "configuration (model, resolution) with the highest mean AUROC against the best configuration "
    "of every other resolution, seed by seed. "
    f"**Multiple comparisons: Holm's step-down correction** (family-wise error rate {ALPHA}), "
    "applied separately to each family = one comparison kind for one task; *significant* means "
    f"Holm-adjusted p < {ALPHA}. The best configurations are chosen on the same validation set "
    "they are tested on, so tests (b) are exploratory (optimistic), not confirmatory.")

BOOTSTRAP_TEXT = ("A stratified percentile bootstrap interval ({n} resamples of positives and "
                  "negatives separately) is given next to the DeLong interval (`boot_low`, "
                  "`boot_high` in trials.csv).")

CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1100px;
color:#222;line-height:1.45;padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:.82em}
th,td{border:1px solid #ccc;padding:.25em .55em;text-align:right}
th{background:#f3f3f3}td.t,th.t{text-align:left}tr:nth-child(even) td{background:#fafafa}
.banner{background:#fff3cd;border:2px solid #e0a800;padding:.8em 1em;margin:1em 0;font-weight:600}
.warn{background:#fdecea;border:1px solid #e57373;padding:.6em 1em;margin:1em 0}
.ok{background:#e8f5e9;border:1px solid #81c784;padding:.6em 1em;margin:1em 0}
.counts span{display:inline-block;margin-right:1.2em}
img{max-width:100%;border:1px solid #eee;margin:.5em 0}
code,pre{background:#f6f8fa;font-size:.85em}pre{padding:.6em;overflow-x:auto;white-space:pre-wrap}
figure{margin:1em 0}figcaption{font-size:.85em;color:#555}
"""

FIGURE_CAPTIONS = {
    "auroc_vs_resolution": "Best-epoch validation AUROC per task against resolution over all runs "
                           "(models and seeds): mean (line), mean ± std (dark band), min–max "
                           "(light band), maximum (triangles).",
    "model_scaling": "Model scaling: ΔAUROC of the larger minus the smaller variant (bars: "
                     "Δmean, diamonds: Δmax) per task and resolution; ★ names the best model "
                     "(highest mean AUROC) at each resolution.",
    "efficientnet": "EfficientNet with compound scaling (variant matched to resolution): mean ± "
                    "std and maximum AUROC per resolution.",
}

TABLE_TITLES = [
    ("summary_resolution", "AUROC per task and resolution (over all models and seeds)"),
    ("best_configurations", "Best configuration per task (highest mean AUROC over seeds)"),
    ("model_scaling", "Model scaling: larger − smaller variant per task and resolution"),
    ("efficientnet", "EfficientNet (compound scaling) per task and resolution"),
    ("summary_model", "Every configuration: AUROC per task, resolution and model"),
]


# --- pieces ------------------------------------------------------------------------------------------
def _grid_overview(data: agg.SweepData) -> dict[str, str]:
    g = pd.DataFrame(data.grid)
    out: dict[str, str] = {}
    if g.empty:
        return out
    for col, label in (("resolution", "resolutions"), ("model", "models"), ("seed", "seeds"),
                       ("task_mode", "task mode"), ("task", "tasks (single mode)")):
        if col in g:
            vals = [v for v in dict.fromkeys(g[col].dropna().tolist()) if v != ""]
            if vals:
                try:
                    vals = sorted(vals)
                except TypeError:
                    pass
                out[label] = ", ".join(str(v) for v in vals)
    out["trials in the grid"] = str(len(data.grid))
    return out


def _sweep_facts(data: agg.SweepData) -> dict[str, str]:
    s = data.sweep or {}
    facts = {"sweep location": storage.display(data.location)}
    for key, label in (("created", "created"), ("store", "store"), ("manifest_hash", "manifest hash"),
                       ("git_commit", "git commit")):
        if s.get(key):
            facts[label] = str(storage.display(s[key]) if key == "store" else s[key])
    if isinstance(s.get("base_config"), dict):   # the training settings every trial shares
        facts["training config"] = ", ".join(f"{k}={v}" for k, v in sorted(s["base_config"].items()))
    for key in ("command", "command_line", "argv"):
        if s.get(key):
            v = s[key]
            facts["command"] = " ".join(map(str, v)) if isinstance(v, list) else str(v)
            break
    return facts


def _dataset_facts(manifest: dict | None) -> dict[str, str]:
    if not manifest:
        return {}
    m = manifest
    facts = {"dataset": str(m.get("dataset", "?"))}
    for key in ("tool_version", "created", "encoding", "image_root"):
        if m.get(key):
            facts[key.replace("_", " ")] = str(m[key])
    if m.get("tasks"):
        facts["tasks"] = ", ".join(map(str, m["tasks"]))
    if m.get("resolutions"):
        facts["resolutions"] = ", ".join(map(str, m["resolutions"]))
    if isinstance(m.get("policy"), dict):
        facts["uncertainty policy"] = ", ".join(f"{k}: {v}" for k, v in m["policy"].items())
    if isinstance(m.get("counts"), dict):
        facts["counts"] = json.dumps(m["counts"], sort_keys=True)
    if isinstance(m.get("sources"), dict):
        facts["sources"] = ", ".join(f"{k} (sha256 {str(v)[:12]}…)" for k, v in m["sources"].items())
    if m.get("phantom") is not None:
        facts["phantom settings"] = json.dumps(m["phantom"], sort_keys=True)
    if isinstance(m.get("shards"), list):
        facts["shards"] = str(len(m["shards"]))
    return facts


def _phantom_banner(data: agg.SweepData) -> str | None:
    if not data.is_phantom:
        return None
    return ("SYNTHETIC DATA: this sweep ran on the phantom dataset (generated images with planted "
            "findings), not on chest radiographs. Its numbers test the pipeline; they say nothing "
            "about clinical performance.")


def _counts_line(data: agg.SweepData) -> str:
    c = data.counts()
    return ", ".join(f"{c.get(s, 0)} {s}" for s in agg.GRID_STATES)


def _display_tables(tables: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    out = dict(tables)
    tests = tables.get("tests_best_configuration")
    if tests is not None and not tests.empty:
        out["tests_best_configuration"] = tests[["task_mode", "task", "model_a", "resolution_a",
                                                 "model_b", "resolution_b", "seed", "auroc_a",
                                                 "auroc_b", "difference", "p_value", "p_holm",
                                                 "significant", "studies"]]
    return out


# --- Markdown -----------------------------------------------------------------------------------------
def _md_facts(facts: dict[str, str]) -> str:
    return "\n".join(f"- **{k}**: {v}" for k, v in facts.items()) + "\n" if facts else "_(none)_\n"


def build_markdown(data: agg.SweepData, tables: dict[str, pd.DataFrame], figure_names: list[str],
                   skipped: list[str], bootstrap: int = 0) -> str:
    t = _display_tables(tables)
    parts = [f"# Sweep report: {data.name}\n",
             f"_Generated {_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')} by "
             f"`python -m analysis.aggregate`._\n"]
    banner = _phantom_banner(data)
    if banner:
        parts.append(f"> **⚠ {banner}**\n")
    parts.append("## Sweep\n" + _md_facts(_sweep_facts(data)))
    parts.append("### Grid\n" + _md_facts(_grid_overview(data)))
    parts.append(f"### Trials\n{_counts_line(data)}.\n")
    inc = tables["incomplete"]
    if not inc.empty:
        parts.append("**This report is partial.** Trials of the grid without a result:\n\n"
                     + agg.markdown_table(inc))
    parts.append("## Dataset\n" + (_md_facts(_dataset_facts(data.manifest)) if data.manifest
                                   else "_The store's manifest could not be read (see problems)._\n"))
    parts.append("## Results\n```\n" + agg.format_results_table(data.trials) + "\n```\n")
    for name, title in TABLE_TITLES:
        parts.append(f"### {title}\n" + agg.markdown_table(t[name]))
    parts.append("## Figures\n")
    for fname in figure_names:
        stem = fname.rsplit(".", 1)[0]
        cap = FIGURE_CAPTIONS.get(stem.split("-")[0], "")
        parts.append(f"![{stem}](figures/{fname})\n\n_{cap}_\n")
    if skipped:
        parts.append("Figures skipped:\n" + "\n".join(f"- {s}" for s in skipped) + "\n")
    parts.append("## Statistics\n" + STATISTICS_TEXT + "\n")
    if bootstrap:
        parts.append(BOOTSTRAP_TEXT.format(n=bootstrap) + "\n")
    parts.append("### Resolution tests (summary)\nPer task and resolution pair: tested (model, seed) "
                 "pairs, mean difference (higher − lower resolution), and how many are significantly "
                 "higher / lower after Holm. Every test: `tests_resolution.csv`.\n\n"
                 + agg.markdown_table(t["tests_resolution_summary"]))
    parts.append("### Best configuration against the best of each other resolution\n"
                 + agg.markdown_table(t["tests_best_configuration"]))
    parts.append("## Best runs per task and resolution (with DeLong 95% CI)\n"
                 + agg.markdown_table(_best_runs_table(data)))
    parts.append("## Problems\n" + ("Records skipped or inconsistent:\n\n"
                                    + agg.markdown_table(tables["problems"])
                                    if not tables["problems"].empty else "None.\n"))
    return "\n".join(parts)


def _best_runs_table(data: agg.SweepData) -> pd.DataFrame:
    b = agg.best_runs(data.trials)
    if b.empty:
        return pd.DataFrame(columns=["task", "resolution", "model", "seed", "best_auroc", "ci_low",
                                     "ci_high", "best_epoch", "trial_id"])
    return b[["task_mode", "task", "resolution", "model", "seed", "best_epoch", "best_auroc",
              "ci_low", "ci_high", "trial_id"]]


# --- HTML ---------------------------------------------------------------------------------------------
def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def html_table(df: pd.DataFrame, digits: int = 4) -> str:
    if df is None or df.empty:
        return "<p><em>(no rows)</em></p>"
    numeric = [pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c])
               for c in df.columns]
    cls = {True: "", False: " class='t'"}
    head = "".join(f"<th{cls[n]}>{_e(c)}</th>" for c, n in zip(df.columns, numeric))
    body = []
    for row in df.itertuples(index=False):
        cells = "".join(f"<td{cls[n]}>{_e(agg.format_cell(c, v, digits))}</td>"
                        for c, v, n in zip(df.columns, row, numeric))
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _html_facts(facts: dict[str, str]) -> str:
    if not facts:
        return "<p><em>(none)</em></p>"
    rows = "".join(f"<tr><th class='t'>{_e(k)}</th><td class='t'>{_e(v)}</td></tr>"
                   for k, v in facts.items())
    return f"<table>{rows}</table>"


def _md_inline(text: str) -> str:
    """The few Markdown marks of STATISTICS_TEXT as HTML (text escaped first)."""
    import re
    t = _e(text)
    t = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", t)
    t = re.sub(r"\*(.+?)\*", r"<em>\1</em>", t)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", t)


def build_html(data: agg.SweepData, tables: dict[str, pd.DataFrame], figures: dict[str, bytes],
               skipped: list[str], bootstrap: int = 0) -> str:
    t = _display_tables(tables)
    p: list[str] = []
    p.append(f"<h1>Sweep report: {_e(data.name)}</h1>")
    p.append(f"<p><em>Generated {_e(_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds'))}"
             " by <code>python -m analysis.aggregate</code>.</em></p>")
    banner = _phantom_banner(data)
    if banner:
        p.append(f"<div class='banner' id='phantom-banner'>⚠ {_e(banner)}</div>")
    p.append("<h2>Sweep</h2>" + _html_facts(_sweep_facts(data)))
    p.append("<h3>Grid</h3>" + _html_facts(_grid_overview(data)))
    c = data.counts()
    spans = "".join(f"<span><strong>{c.get(s, 0)}</strong> {s}</span>" for s in agg.GRID_STATES)
    p.append(f"<h3>Trials</h3><p class='counts' id='counts'>{spans}</p>")
    inc = tables["incomplete"]
    if not inc.empty:
        p.append("<div class='warn'><strong>This report is partial.</strong> Trials of the grid "
                 "without a result:</div>" + html_table(inc))
    else:
        p.append("<div class='ok'>Every trial of the grid finished.</div>")
    p.append("<h2>Dataset</h2>" + (_html_facts(_dataset_facts(data.manifest)) if data.manifest else
                                   "<p><em>The store's manifest could not be read (see problems).</em></p>"))
    p.append("<h2>Results</h2><pre>" + _e(agg.format_results_table(data.trials)) + "</pre>")
    for name, title in TABLE_TITLES:
        p.append(f"<h3>{_e(title)}</h3>" + html_table(t[name]))
    p.append("<h2>Figures</h2>")
    for fname, png in figures.items():
        stem = fname.rsplit(".", 1)[0]
        cap = FIGURE_CAPTIONS.get(stem.split("-")[0], "")
        uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        p.append(f"<figure><img alt='{_e(stem)}' src='{uri}'><figcaption>{_e(cap)}</figcaption></figure>")
    if skipped:
        p.append("<p>Figures skipped:</p><ul>" + "".join(f"<li>{_e(s)}</li>" for s in skipped) + "</ul>")
    p.append("<h2>Statistics</h2><p>" + _md_inline(STATISTICS_TEXT) + "</p>")
    if bootstrap:
        p.append("<p>" + _md_inline(BOOTSTRAP_TEXT.format(n=bootstrap)) + "</p>")
    p.append("<h3>Resolution tests (summary)</h3><p>Per task and resolution pair: tested (model, seed) "
             "pairs, mean difference (higher − lower resolution), and how many are significantly "
             "higher / lower after Holm. Every test: <code>tests_resolution.csv</code>.</p>"
             + html_table(t["tests_resolution_summary"]))
    p.append("<h3>Best configuration against the best of each other resolution</h3>"
             + html_table(t["tests_best_configuration"]))
    p.append("<h2>Best runs per task and resolution (with DeLong 95% CI)</h2>"
             + html_table(_best_runs_table(data)))
    p.append("<h2>Problems</h2>" + (html_table(tables["problems"]) if not tables["problems"].empty
                                     else "<p>None.</p>"))
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>Sweep report: {_e(data.name)}</title><style>{CSS}</style></head><body>"
            + "\n".join(p) + "</body></html>\n")


def build_report(data: agg.SweepData, tables: dict[str, pd.DataFrame], figures: dict[str, bytes],
                 skipped: list[str], bootstrap: int = 0) -> tuple[str, str]:
    """(report.md, report.html) text."""
    return (build_markdown(data, tables, list(figures), skipped, bootstrap),
            build_html(data, tables, figures, skipped, bootstrap))
