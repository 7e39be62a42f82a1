"""``report.md`` and a self-contained ``report.html`` (inline CSS, figures as base64 data URIs, no
scripts, no external resources: it opens offline, from an e-mail or an S3 console alike, and prints
to PDF from any browser).

A results section is read top down, so the report is ordered the way a paper is:

1. **The answer**: per task the best resolution and model, its effect over the lowest resolution
   with a DeLong 95% interval and the paired-test p, and a task x resolution heatmap.
2. **Figures**: AUROC vs resolution per model, models per resolution, best configurations,
   model scaling within each family, EfficientNet's compound scaling.
3. **Grad-CAM** of the best checkpoint per task and resolution.
4. **Methods**: generated from the records (dataset, recipe, grid, software, commit).
5. **Tables**, collapsed: the configuration, the sweep, the dataset, every summary and test.
"""
from __future__ import annotations

import base64
import datetime as _dt
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from analysis import effects, families, methods, plots
from analysis import report_format as fmt
from analysis.report_gradcam import CamFigure, gradcam_figure
from common import storage

GRID_STATES = ("finished", "failed", "running", "pending", "missing")

FIGURE_CAPTIONS = {
    "answer_heatmap": "Mean best-epoch validation AUROC (over seeds) of the best model at each task "
                      "and resolution; ★ marks the task's best configuration.",
    "auroc_vs_resolution_per_model": "Best-epoch validation AUROC against resolution, one panel "
                                     "per model (EfficientNet: the compound-scaled variants, "
                                     "named at the bottom), one line per task: mean over seeds "
                                     "with its DeLong 95% interval.",
    "models_per_resolution": "Every model at each resolution: mean AUROC over seeds per task with "
                             "its DeLong 95% interval.",
    "best_configurations": "Per task, the best model at each resolution (open) and the best "
                           "configuration overall (filled), with DeLong 95% intervals.",
    "model_scaling": "Model scaling within each family: ΔAUROC of the larger minus the smaller "
                     "size (bars: Δmean over seeds, diamonds: Δmax) per task and resolution; "
                     "★ names the best model at each resolution.",
    "efficientnet": "EfficientNet with compound scaling (variant matched to the resolution): "
                    "mean ± std over seeds and maximum AUROC per resolution.",
}

#: Titles of the analysis tables the report shows (others are shown under their file name).
TABLE_TITLES = {
    "summary_resolution": "AUROC per task and resolution (over all models and seeds)",
    "summary_model": "Every configuration: AUROC per task, resolution and model",
    "best_configurations": "Best configuration per task (highest mean AUROC over seeds)",
    "tests_resolution_summary": "Resolution tests per task and resolution pair (Holm)",
    "tests_resolution": "Every paired DeLong test between two resolutions",
    "tests_best_configuration": "Best configuration against the best of each other resolution",
    "sweep_configurations": "Configurations met in the sweep (only the main one is summarised)",
    "other_configurations": "Trials of another configuration, left out",
}
#: Shown elsewhere in the report (or replaced by the report's own table).
TABLES_NOT_REPEATED = {"incomplete", "problems", "model_scaling", "efficientnet"}

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
ul.answer li{margin:.3em 0}
img{max-width:100%;border:1px solid #eee;margin:.5em 0}
code,pre{background:#f6f8fa;font-size:.85em}pre{padding:.6em;overflow-x:auto;white-space:pre-wrap}
figure{margin:1em 0}figcaption{font-size:.85em;color:#555}
details{margin:.4em 0}summary{cursor:pointer;font-weight:600;padding:.2em 0}
@media print{
 body{max-width:none;margin:0;font-size:10pt}
 figure,table,.banner,.warn{break-inside:avoid}h2,h3{break-after:avoid}
 details::details-content{content-visibility:visible;display:block}
 summary{list-style:none}
}
"""


@dataclass
class ReportParts:
    """Everything the report shows, computed once for both outputs."""
    conf: pd.DataFrame                 # effects.configurations
    answer: pd.DataFrame               # effects.answer
    scaling: pd.DataFrame              # families.scaling_pairs
    compound: pd.DataFrame             # families.compound_scaling
    tables: dict[str, pd.DataFrame]    # the analysis' tables, shown collapsed
    figures: dict[str, bytes] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    cam: CamFigure | None = None
    methods: list[str] = field(default_factory=list)
    config_table: pd.DataFrame | None = None
    bootstrap: int = 0

    def own_tables(self) -> dict[str, pd.DataFrame]:
        """The report's own tables, by file stem (written next to the report)."""
        return {"answer": self.answer, "configurations": self.conf}


def _sweep_dict(data) -> dict[str, Any]:
    s = data.sweep
    if s is None:
        return {}
    return s.to_dict() if hasattr(s, "to_dict") else dict(s)


def _finished_config(data) -> dict[str, Any]:
    for r in getattr(data, "records", []) or []:
        if getattr(r, "state", "") == "finished" and isinstance(getattr(r, "config", None), dict):
            return r.config
    ids = list(dict.fromkeys(data.trials["trial_id"])) if not data.trials.empty else []
    return methods.trial_config(data.location, ids)


def _table(tables: dict, name: str, compute, data) -> pd.DataFrame:
    """The analysis' own table of that name (written once, as NAME.csv), else computed here."""
    return tables[name] if name in tables else compute(data.trials)


def compute_parts(data, tables: dict[str, pd.DataFrame], *, figures: bool = True,
                  gradcam: bool = True, gradcam_images: list[str] | None = None,
                  device: str = "cpu", bootstrap: int = 0) -> ReportParts:
    conf = effects.configurations(data.trials, data.predictions)
    parts = ReportParts(conf=conf, answer=effects.answer(data.trials, data.predictions,
                                                         families.same_model),
                        scaling=_table(tables, "model_scaling", families.scaling_pairs, data),
                        compound=_table(tables, "efficientnet", families.compound_scaling, data),
                        tables=tables,
                        bootstrap=bootstrap)
    if figures:
        parts.figures, parts.skipped = plots.all_figures(
            {"conf": conf, "scaling": parts.scaling, "compound": parts.compound})
    if gradcam and not data.trials.empty:
        sweep = _sweep_dict(data)
        store = sweep.get("store_location") or sweep.get("store") or None
        parts.cam = gradcam_figure(data.location, store, gradcam_images, device=device, data=data)
    # The recipe a finished trial resolved; before any finished, what sweep.json asks for.
    cfg = _finished_config(data) or dict(_sweep_dict(data).get("base_config") or {})
    parts.methods = methods.methods_paragraphs(data, _sweep_dict(data), conf, cfg)
    parts.config_table = methods.configuration_table(sweep=_sweep_dict(data), cfg=cfg)
    return parts


# --- the pieces both outputs share ---------------------------------------------------------------
def _banner(data) -> str | None:
    if not data.is_phantom:
        return None
    return ("SYNTHETIC DATA: this sweep ran on the phantom dataset (generated images with planted "
            "findings), not on chest radiographs. Its numbers test the pipeline; they say nothing "
            "about clinical performance.")


def _counts_line(data) -> str:
    c = data.counts()
    return ", ".join(f"{c.get(s, 0)} {s}" for s in GRID_STATES)


def answer_lines(answer: pd.DataFrame) -> list[str]:
    """One sentence per task (Markdown marks)."""
    lines = []
    multi_mode = answer["task_mode"].nunique() > 1
    for _, a in answer.iterrows():
        task = f"{a['task']} ({a['task_mode']}-task)" if multi_mode else a["task"]
        runs = f"{int(a['runs'])} seed{'s' if a['runs'] != 1 else ''}"
        head = (f"**{task}**: best **{a['best_model']} at {int(a['best_resolution'])} px**, mean "
                f"AUROC {a['best_mean']:.3f} {fmt.interval(a['best_ci_low'], a['best_ci_high'])} "
                f"({runs})")
        if int(a["best_resolution"]) == int(a["lowest_resolution"]):
            lines.append(head + "; that is the lowest resolution of the sweep: no higher "
                                "resolution did better.")
            continue
        lines.append(head + f"; {fmt.signed(a['delta'])} "
                            f"{fmt.interval(a['delta_ci_low'], a['delta_ci_high'])} over "
                            f"{a['baseline_model']} at {int(a['lowest_resolution'])} px "
                            f"(paired DeLong p = {fmt.p_value(a['p_value'])}, "
                            f"{int(a['studies'])} studies).")
    return lines


ANSWER_NOTE = ("Mean best-epoch validation AUROC over seeds with its DeLong 95% interval; the "
               "effect is the difference from the same model at the sweep's lowest resolution "
               "(EfficientNet: its variant there; another model only when that one did not run "
               "there), with the interval and p of the paired DeLong test on the shared studies. "
               "The best configuration is picked on the same validation split: these p-values are "
               "exploratory, not confirmatory.")


def _answer_table(answer: pd.DataFrame) -> pd.DataFrame:
    if answer.empty:
        return answer
    return pd.DataFrame({
        "task": answer["task"], "best": [f"{m} @ {int(r)} px" for m, r in
                                         zip(answer["best_model"], answer["best_resolution"])],
        "mean AUROC [95% CI]": [f"{m:.3f} {fmt.interval(lo, hi)}" for m, lo, hi in
                                zip(answer["best_mean"], answer["best_ci_low"], answer["best_ci_high"])],
        "vs": [f"{m} @ {int(r)} px" for m, r in zip(answer["baseline_model"],
                                                    answer["lowest_resolution"])],
        "Δ AUROC [95% CI]": [f"{fmt.signed(d)} {fmt.interval(lo, hi)}" if d == d else "(best is lowest)"
                             for d, lo, hi in zip(answer["delta"], answer["delta_ci_low"],
                                                  answer["delta_ci_high"])],
        "p (paired DeLong)": [fmt.p_value(p) for p in answer["p_value"]],
    })


def _sweep_facts(data) -> dict[str, str]:
    s = _sweep_dict(data)
    facts = {"sweep location": storage.display(data.location)}
    for key, label in (("created", "created"), ("store", "store"), ("manifest_hash", "manifest hash"),
                       ("git_commit", "git commit")):
        if s.get(key):
            facts[label] = str(s[key])
    command = s.get("command") or (" ".join(map(str, s["argv"])) if s.get("argv") else "")
    if command:
        facts["command"] = command
    for key, label in (("resolution", "resolutions"), ("model", "models"), ("seed", "seeds"),
                       ("task_mode", "task mode")):
        vals = sorted({g.get(key) for g in data.grid if g.get(key) not in (None, "")}, key=str)
        if vals:
            facts[label] = ", ".join(map(str, vals))
    facts["trials in the grid"] = str(len(data.grid))
    return facts


def _dataset_table(manifest: dict | None) -> pd.DataFrame:
    rows = []
    for key, value in (manifest or {}).items():
        if key in ("shards", "study_label_conflicts"):
            value = f"{len(value)} entries" if isinstance(value, list) else value
        elif isinstance(value, dict):
            value = "; ".join(f"{k}: {v}" for k, v in value.items())
        elif isinstance(value, list):
            value = ", ".join(map(str, value))
        rows.append({"field": key, "value": str(value)})
    return pd.DataFrame(rows, columns=["field", "value"])


def _collapsed_tables(data, parts: ReportParts) -> list[tuple[str, pd.DataFrame]]:
    out = [("Training configuration shared by every trial", parts.config_table),
           ("The dataset (the store's manifest)", _dataset_table(data.manifest)),
           ("The answer, every number", parts.answer),
           ("Configurations: mean AUROC over seeds with DeLong 95% CI", parts.conf),
           ("Model scaling: every pair of sizes of one family", parts.scaling),
           ("EfficientNet (compound scaling) per task and resolution", parts.compound)]
    for name, df in parts.tables.items():
        if name not in TABLES_NOT_REPEATED:
            out.append((TABLE_TITLES.get(name, name.replace("_", " ")), df))
    return out


def _problems(data, parts: ReportParts) -> pd.DataFrame:
    p = parts.tables.get("problems")
    if p is not None:
        return p
    return pd.DataFrame([x.__dict__ for x in data.problems], columns=["where", "what"])


def _incomplete(data, parts: ReportParts) -> pd.DataFrame:
    inc = parts.tables.get("incomplete")
    return inc if inc is not None else data.incomplete()


def _other_trials(parts: ReportParts) -> int:
    other = parts.tables.get("other_configurations")
    return 0 if other is None else len(other)


def _stamp() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# --- Markdown -----------------------------------------------------------------------------------------
def _md_details(title: str, body: str) -> str:
    return f"<details><summary>{fmt.e(title)}</summary>\n\n{body}\n</details>\n"


def build_markdown(data, parts: ReportParts) -> str:
    out = [f"# Sweep report: {data.name}\n", f"_Generated {_stamp()}._\n"]
    banner = _banner(data)
    if banner:
        out.append(f"> **⚠ {banner}**\n")
    out.append(f"Trials: {_counts_line(data)}.\n")
    inc = _incomplete(data, parts)
    if not inc.empty:
        out.append(f"**This report is partial**: {len(inc)} trial(s) of the grid have no result "
                   "(listed under Tables).\n")
    other = _other_trials(parts)
    if other:
        out.append(f"**{other} trial(s) of another configuration are left out** (listed under "
                   "Tables): results of different configurations are never pooled.\n")
    out.append("## The answer\n")
    out += [f"- {line}" for line in answer_lines(parts.answer)] or ["_No finished trial._"]
    out.append("\n" + ANSWER_NOTE + "\n\n" + fmt.markdown_table(_answer_table(parts.answer)))
    figs = list(parts.figures)
    for name in [f for f in figs if f.startswith("answer_heatmap")]:
        out.append(_md_figure(name))
    out.append("## Figures\n")
    for name in [f for f in figs if not f.startswith("answer_heatmap")]:
        out.append(_md_figure(name))
    if parts.skipped:
        out.append("Figures not drawn:\n" + "\n".join(f"- {s}" for s in parts.skipped) + "\n")
    out.append("## Grad-CAM\n" + _cam_text(parts.cam, markdown=True))
    out.append("## Methods\n" + "\n\n".join(parts.methods) + "\n")
    out.append("## Tables\n")
    for title, df in _collapsed_tables(data, parts):
        out.append(_md_details(title, fmt.markdown_table(df)))
    if not inc.empty:
        out.append(_md_details(f"Trials without a result ({len(inc)})", fmt.markdown_table(inc)))
    problems = _problems(data, parts)
    out.append(_md_details(f"Records skipped or inconsistent ({len(problems)})",
                           fmt.markdown_table(problems)))
    return "\n".join(out)


def _md_figure(name: str) -> str:
    stem = name.rsplit(".", 1)[0]
    return f"![{stem}](figures/{name})\n\n_{FIGURE_CAPTIONS.get(stem.split('-')[0], '')}_\n"


def _cam_text(cam: CamFigure | None, markdown: bool) -> str:
    if cam is None:
        return "Not computed (no finished trial, or switched off).\n" if markdown else \
            "<p>Not computed (no finished trial, or switched off).</p>"
    caption = ("Grad-CAM of the best checkpoint per task (columns) and resolution (rows, per "
               f"image) on {', '.join(cam.images)}; each panel gives the model, its validation "
               "AUROC, the predicted probability and the feature-map size (the heatmap's true "
               "resolution).")
    note = f" {cam.note}" if cam.note else ""
    if markdown:
        return (f"![gradcam](figures/gradcam.png)\n\n_{caption}_{note}\n" if cam.png else
                f"No Grad-CAM figure: {cam.note}\n")
    if not cam.png:
        return f"<p>No Grad-CAM figure: {fmt.e(cam.note)}</p>"
    return _html_figure("gradcam", cam.png, caption + note)


# --- HTML ---------------------------------------------------------------------------------------------
def _html_figure(stem: str, png: bytes, caption: str) -> str:
    uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    return (f"<figure><img alt='{fmt.e(stem)}' src='{uri}'>"
            f"<figcaption>{fmt.e(caption)}</figcaption></figure>")


def _html_details(title: str, body: str) -> str:
    return f"<details><summary>{fmt.e(title)}</summary>{body}</details>"


def build_html(data, parts: ReportParts) -> str:
    p = [f"<h1>Sweep report: {fmt.e(data.name)}</h1>", f"<p><em>Generated {fmt.e(_stamp())}.</em></p>"]
    banner = _banner(data)
    if banner:
        p.append(f"<div class='banner' id='phantom-banner'>⚠ {fmt.e(banner)}</div>")
    c = data.counts()
    spans = "".join(f"<span><strong>{c.get(s, 0)}</strong> {s}</span>" for s in GRID_STATES)
    p.append(f"<p class='counts' id='counts'>Trials: {spans}</p>")
    inc = _incomplete(data, parts)
    p.append(f"<div class='warn'><strong>This report is partial</strong>: {len(inc)} trial(s) of "
             "the grid have no result (listed under Tables).</div>" if not inc.empty else
             "<div class='ok'>Every trial of the grid finished.</div>")
    other = _other_trials(parts)
    if other:
        p.append(f"<div class='warn'><strong>{other} trial(s) of another configuration are left "
                 "out</strong> (listed under Tables): results of different configurations are "
                 "never pooled.</div>")
    p.append("<h2 id='answer'>The answer</h2><ul class='answer'>"
             + "".join(f"<li>{fmt.inline_html(line)}</li>" for line in answer_lines(parts.answer))
             + "</ul>" + f"<p>{fmt.e(ANSWER_NOTE)}</p>" + fmt.html_table(_answer_table(parts.answer)))
    for name, png in parts.figures.items():
        if name.startswith("answer_heatmap"):
            p.append(_html_figure(name[:-4], png, FIGURE_CAPTIONS["answer_heatmap"]))
    p.append("<h2 id='figures'>Figures</h2>")
    for name, png in parts.figures.items():
        if not name.startswith("answer_heatmap"):
            stem = name[:-4]
            p.append(_html_figure(stem, png, FIGURE_CAPTIONS.get(stem.split("-")[0], "")))
    if parts.skipped:
        p.append("<p>Figures not drawn:</p><ul>" + "".join(f"<li>{fmt.e(s)}</li>"
                                                           for s in parts.skipped) + "</ul>")
    p.append("<h2 id='gradcam'>Grad-CAM</h2>" + _cam_text(parts.cam, markdown=False))
    p.append("<h2 id='methods'>Methods</h2>" + "".join(f"<p>{fmt.inline_html(x)}</p>"
                                                       for x in parts.methods))
    p.append("<h2 id='tables'>Tables</h2>")
    p.append(_html_details("The sweep", fmt.facts_html(_sweep_facts(data))))
    for title, df in _collapsed_tables(data, parts):
        p.append(_html_details(title, fmt.html_table(df)))
    if not inc.empty:
        p.append(_html_details(f"Trials without a result ({len(inc)})", fmt.html_table(inc)))
    problems = _problems(data, parts)
    p.append(_html_details(f"Records skipped or inconsistent ({len(problems)})",
                           fmt.html_table(problems)))
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>Sweep report: {fmt.e(data.name)}</title><style>{CSS}</style></head><body>"
            + "\n".join(p) + "</body></html>\n")


# --- writing --------------------------------------------------------------------------------------
def write_report(data, tables: dict[str, pd.DataFrame], out_dir: str, *, bootstrap: int = 0,
                 figures: bool = True, gradcam: bool = True, gradcam_images: list[str] | None = None,
                 device: str = "cpu") -> tuple[list[str], list[str]]:
    """Write the report's tables, figures, ``report.md`` and ``report.html`` into ``out_dir``;
    returns (files written relative to ``out_dir``, figures skipped with their reason)."""
    parts = compute_parts(data, tables, figures=figures, gradcam=gradcam and figures,
                          gradcam_images=gradcam_images, device=device, bootstrap=bootstrap)
    files: list[str] = []
    for name, df in parts.own_tables().items():
        storage.write_bytes(storage.join(out_dir, f"{name}.csv"), df.to_csv(index=False).encode())
        files.append(f"{name}.csv")
    for name, png in parts.figures.items():
        storage.write_bytes(storage.join(out_dir, "figures", name), png)
        files.append(f"figures/{name}")
    if parts.cam is not None and parts.cam.png:
        storage.write_bytes(storage.join(out_dir, "figures", "gradcam.png"), parts.cam.png)
        files.append("figures/gradcam.png")
    storage.write_bytes(storage.join(out_dir, "report.md"), build_markdown(data, parts).encode())
    storage.write_bytes(storage.join(out_dir, "report.html"), build_html(data, parts).encode())
    files += ["report.md", "report.html"]
    skipped = list(parts.skipped)
    if parts.cam is not None and not parts.cam.png:
        skipped.append(f"gradcam.png: {parts.cam.note}")
    return files, skipped
