"""The thesis grid's 25 (model, resolution) groups, measured once each and resumed across calls.

A group is measured at the protocol batch in the mode its trials run in by default
(trainer/graphs.py and trainer/compile.py ``auto``). Each finished measurement is written at once
as its own small JSON document (``<label>.json``, the same shape as a gpu_check report, so
``orchestrator.packing.load_measurements`` reads it) into the results folder, and a measurement
whose file is already there is not repeated. A device session of a few minutes therefore spends
each call on groups not yet measured; a call killed at its time limit loses only the group it was
in. On the device machine the folder is also copied to ``$OUT/groups/`` (what comes back);
docs/gpu.md says how to carry those files into the next call.

Order: first every group in a mode known to work (CUDA graphs at <= 320 px, eager above), so that
one call measures all 25; then the 400-480 px groups compiled (trainer/compile.py, inductor's
warm-up takes a minute or more per model), each next to its eager figure.
"""
from __future__ import annotations

import json
import os
import re

import torch

from bench.gpu.configs import Config
from bench.gpu.measure import clean, log, write_json

THESIS_RESOLUTIONS = (160, 240, 320, 400, 480)
THESIS_MODELS = ("resnet50", "resnet152", "densenet121", "densenet161", "efficientnet")
#: The group whose step is also fed by the real loader (the thesis's middle resolution).
LOADER_GROUP = ("resnet50", 320)


def thesis_groups(device: torch.device) -> list[Config]:
    """The 25 groups in a mode that works (graphs where the trainer uses them by default), then
    the groups where compiling should pay (trainer/compile.py), compiled."""
    from trainer.compile import COMPILE_MIN_RESOLUTION
    from trainer.graphs import want_graphs
    from trainer.models import resolve_model_name
    first, compiled = [], []
    for res in THESIS_RESOLUTIONS:
        for name in THESIS_MODELS:
            model = resolve_model_name(name, res)
            graphs = want_graphs("auto", device, res)
            first.append(Config(model, res, graphs=graphs, loader=(name, res) == LOADER_GROUP))
            if device.type == "cuda" and res >= COMPILE_MIN_RESOLUTION:   # where compiling should pay
                compiled.append(Config(model, res, graphs=graphs, compile=True, loader=False))
    # the most expensive groups (the largest images) compile first
    return first + sorted(compiled, key=lambda c: -c.resolution)


def file_name(cfg: Config) -> str:
    """``densenet161@480+compile.json``: the label, safe as a file name."""
    return re.sub(r"[^A-Za-z0-9@._+-]", "+", cfg.label) + ".json"


class ResultFolder:
    """One JSON document per finished unit (a group, or a section such as ``equivalence``)."""

    def __init__(self, path: str, mirror: str | None = None):
        self.path, self.mirror = path, mirror

    def load(self, name: str) -> dict | None:
        """The stored document, or None when absent or unreadable (a torn write is re-measured)."""
        try:
            with open(os.path.join(self.path, name)) as f:
                doc = json.load(f)
        except (OSError, ValueError):
            return None
        return doc if isinstance(doc, dict) else None

    def save(self, name: str, doc: dict) -> None:
        for folder in filter(None, (self.path, self.mirror)):
            write_json(clean(doc), os.path.join(folder, name))


def is_measured(doc: dict | None) -> bool:
    """A stored group counts as done when its synthetic step has a rate; errors and budget skips
    are measured again on the next call."""
    if not doc:
        return False
    recs = (doc.get("configs") or {}).get("results") or []
    return bool(recs) and isinstance(recs[0].get("synthetic"), dict) \
        and "images_per_s" in recs[0]["synthetic"]


def stored_rate(results: ResultFolder, cfg: Config) -> float | None:
    """The synthetic images/s stored for ``cfg``, if measured."""
    doc = results.load(file_name(cfg))
    return doc["configs"]["results"][0]["synthetic"]["images_per_s"] if is_measured(doc) else None


def run_groups(groups: list[Config], results: ResultFolder, header: dict, measure) -> dict:
    """Measure every group not yet in ``results`` with ``measure(cfg) -> record``; save each at
    once as ``{**header, "configs": {"results": [record]}}``. Returns the section's summary."""
    measured, reused, failed = [], [], []
    for cfg in groups:
        name = file_name(cfg)
        if is_measured(results.load(name)):
            reused.append(cfg.label)
            continue
        rec = measure(cfg)
        syn = rec.get("synthetic")
        if isinstance(syn, str):          # skipped (budget, no CUDA): the next call measures it
            failed.append(f"{cfg.label}: {syn}")
            continue
        results.save(name, {**header, "configs": {"results": [rec]}})
        if "images_per_s" in syn:
            measured.append(cfg.label)
        else:                             # saved to show the error; measured again next call
            failed.append(f"{cfg.label}: {syn.get('error')}")
        log(f"groups: {cfg.label} done ({len(measured)} measured in this call)")
    return {"folder": results.path, "groups": len(groups), "measured_now": measured,
            "already_measured": reused, "not_measured": failed,
            "done": len(measured) + len(reused)}


def group_table(folder: str) -> list[dict]:
    """One row per stored group document: the figures docs/benchmarks.md tabulates."""
    rows = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if not name.endswith(".json"):
            continue
        doc = ResultFolder(folder).load(name)
        if not is_measured(doc):
            continue
        rec = doc["configs"]["results"][0]
        syn, lo = rec["synthetic"], rec.get("loader")
        rows.append({"label": rec["label"], "model": rec["model"], "resolution": rec["resolution"],
                     "cuda_graphs": rec.get("cuda_graphs", False), "compile": rec.get("compile", False),
                     "images_per_s": syn["images_per_s"], "warmup_s": syn.get("warmup_s"),
                     "peak_memory_reserved_gib": (syn.get("peak_memory_reserved_bytes") or 0) / 2**30,
                     "busy_share": syn.get("busy_share"),
                     "loader_share_of_synthetic": lo.get("share_of_synthetic") if isinstance(lo, dict) else None})
    return rows


def markdown_table(rows: list[dict]) -> str:
    """``group_table`` rows as the Markdown table of docs/benchmarks.md."""
    def num(x, fmt):
        return "-" if x is None else format(x, fmt)
    lines = ["| group | graphs | compile | img/s | warm-up s | busy | peak reserved GiB | loader / synthetic |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in sorted(rows, key=lambda r: (r["resolution"], r["model"], r["compile"])):
        lines.append(f"| {r['model']} @ {r['resolution']} | {'yes' if r['cuda_graphs'] else 'no'} | "
                     f"{'yes' if r['compile'] else 'no'} | {num(r['images_per_s'], ',.0f')} | "
                     f"{num(r['warmup_s'], '.0f')} | {num(r['busy_share'], '.2f')} | "
                     f"{num(r['peak_memory_reserved_gib'], '.1f')} | "
                     f"{num(r['loader_share_of_synthetic'], '.1%')} |")
    return "\n".join(lines)

