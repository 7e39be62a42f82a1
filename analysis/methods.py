"""The report's methods paragraph and its configuration table, generated from the records.

Every sentence is filled from a record: the store's manifest (dataset, images per split, label
policy), ``sweep.json`` (grid, base configuration, command, git commit, software versions) and a
finished trial's ``config.json`` (the training recipe the trainer actually resolved). A value a
record does not hold is left out of the sentence rather than guessed.
"""
from __future__ import annotations

from typing import Any

import pandas as pd

from common import storage
from common.sweep_folder import SweepFolder

#: Fields of the trial config that are the grid itself or where things live, not the recipe.
NOT_RECIPE = {"store", "model", "resolution", "seed", "task", "weights_dir", "cache_dir", "device",
              "workers"}


RECIPES = {"fastai": "the thesis's fastai v2 recipe (recipe 'fastai')",
           "literal": "the thesis's text without fastai (recipe 'literal')"}


def trial_config(location: str, trial_ids: list[str]) -> dict[str, Any]:
    """The resolved TrainConfig of the first readable finished trial ({} when none is)."""
    folder = SweepFolder(location)
    for tid in trial_ids:
        try:
            doc = folder.trial(tid).read_config()
        except Exception:   # unreadable records are the problems table's business
            continue
        if isinstance(doc, dict):
            cfg = doc.get("config", doc)
            if isinstance(cfg, dict):
                return cfg
    return {}


def _join(items: list[str]) -> str:
    items = [str(i) for i in items]
    if len(items) <= 2:
        return " and ".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _n(x: Any) -> str:
    return f"{int(x):,}" if isinstance(x, (int, float)) else str(x)


def _dataset_sentence(manifest: dict | None) -> str:
    if not manifest:
        return "The store's manifest could not be read, so the dataset is not described here."
    dataset = str(manifest.get("dataset", "unknown"))
    what = ("the synthetic phantom (generated images with findings planted at known spatial "
            "scales; not chest radiographs)" if dataset == "phantom" else dataset)
    counts = manifest.get("counts") if isinstance(manifest.get("counts"), dict) else {}
    parts = [f"Images came from {what}"]
    per_split = counts.get("per_split") if isinstance(counts.get("per_split"), dict) else {}
    if per_split:
        split_text = _join([f"{_n(c.get('stored', 0))} {s}" for s, c in per_split.items()
                            if isinstance(c, dict)])
        parts.append(f": {_n(counts.get('stored', 0))} images stored ({split_text})")
    elif "stored" in counts:
        parts.append(f": {_n(counts['stored'])} images stored")
    if counts.get("rejected"):
        parts.append(f", {_n(counts['rejected'])} rows rejected at the build")
    text = "".join(parts) + "."
    policy = manifest.get("policy")
    if isinstance(policy, dict) and policy:
        groups: dict[str, list[str]] = {}
        for task, rule in policy.items():
            groups.setdefault(str(rule), []).append(str(task))
        text += (" Uncertain labels were mapped per task (" + "; ".join(
            f"{rule}: {_join(tasks)}" for rule, tasks in groups.items()) + ").")
    res = manifest.get("resolutions")
    if res:
        resize = manifest.get("resize") or {}
        how = f" ({resize.get('filter')} filter, whole image squashed to a square)" \
            if isinstance(resize, dict) and resize.get("filter") else ""
        text += f" Every image was resized once to {_join([f'{r} px' for r in res])}{how}."
    return text


def _task_mode_sentence(modes: list[str], tasks: list[str]) -> str:
    n = len(tasks)
    if modes == ["multi"]:
        return (f"Every trial trained one multi-task model with {n} outputs ({_join(tasks)}), a "
                "sigmoid per output and the loss masked where a label is excluded; this differs "
                "from the thesis, which trained one binary model per task.")
    if modes == ["single"]:
        return ("Every trial trained one single-task binary model for one task, as the thesis did "
                f"({n} tasks, one model each).")
    return ("The sweep mixes multi-task trials (one model with an output per task) and single-task "
            "trials (one binary model per task); their results are reported separately.")


def _recipe_sentence(cfg: dict[str, Any]) -> str:
    if not cfg:
        return "No finished trial's configuration could be read, so the recipe is not described."
    s = []
    weights = cfg.get("weights")
    if weights is not None:
        s.append("Bodies started from ImageNet weights" if weights == "imagenet" else
                 "Bodies started from random weights" if weights == "none" else
                 f"Bodies started from the weights file {weights}")
    if "epochs_frozen" in cfg and "epochs_unfrozen" in cfg:
        stage = (f"{cfg['epochs_frozen']} epoch(s) with the body frozen (one-cycle, max LR "
                 f"{cfg.get('lr_frozen')}) then " if cfg["epochs_frozen"] else "")
        s.append(f"training ran {stage}{cfg['epochs_unfrozen']} epoch(s) of the whole network "
                 f"(one-cycle, max LR {cfg.get('lr_body')} body / {cfg.get('lr_head')} head)")
    if "batch_studies" in cfg:
        s.append(f"batches of {cfg['batch_studies']} studies")
    if "weight_decay" in cfg:
        s.append(f"AdamW with weight decay {cfg['weight_decay']}"
                 + (f" and betas {tuple(cfg['betas'])}" if cfg.get("betas") else ""))
    if "augment" in cfg:
        style = f" ({cfg['aug_style']} style)" if cfg.get("aug_style") else ""
        s.append(f"augmentation on{style}" if cfg["augment"] else "no augmentation")
    recipe = RECIPES.get(str(cfg.get("recipe")), f"recipe '{cfg.get('recipe')}'") \
        if cfg.get("recipe") else ""
    details = [f"{label} {cfg[key]}" for key, label in (("lr_schedule", "LR schedule"),
                                                         ("lr_groups", "LR groups"))
               if cfg.get(key)]
    if recipe or details:
        s.append(", ".join(x for x in [recipe] + details if x))
    limits = [f"{k} {cfg[k]}" for k in ("max_train_studies", "max_valid_studies") if cfg.get(k)]
    if limits:
        s.append("subsets: " + ", ".join(limits))
    return (s[0] + ("; " + "; ".join(s[1:]) if len(s) > 1 else "") + ".") if s else ""


def _grid_sentence(conf: pd.DataFrame, n_trials: int) -> str:
    models = sorted(conf["model"].unique())
    res = sorted(int(r) for r in conf["resolution"].unique())
    return (f"The grid crossed {_join(models)} with {_join([f'{r} px' for r in res])} "
            f"({n_trials} trials in the grid).")


def _evaluation_sentence(trials: pd.DataFrame, bootstrap: int = 0) -> str:
    studies = ""
    if not trials.empty and {"n_pos", "n_neg"} <= set(trials.columns):
        n = (trials["n_pos"] + trials["n_neg"])
        n = n[n > 0]
        if not n.empty:
            lo, hi = int(n.min()), int(n.max())
            studies = f" ({lo} validation studies per task)" if lo == hi else \
                f" ({lo}-{hi} validation studies per task)"
    return ("Each trial was scored after every epoch on the validation split at the study level"
            f"{studies}; a task's result is its best epoch's AUROC, with a DeLong 95% confidence "
            "interval. Configurations are compared with paired DeLong tests on the shared studies "
            "(the mean over seeds as a linear contrast of correlated AUROCs), and families of "
            "tests are Holm-corrected. The best configuration is chosen on the same validation "
            "split, so its comparisons are exploratory."
            + (f" A stratified percentile bootstrap interval ({bootstrap} resamples) is given next "
               "to each DeLong interval in trials.csv." if bootstrap else ""))


def _software_sentence(sweep: dict | None) -> str:
    sweep = sweep or {}
    s = []
    versions = sweep.get("versions")
    if isinstance(versions, dict) and versions:
        s.append("Software: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())) + ".")
    if sweep.get("git_commit"):
        s.append(f"Code: git commit {sweep['git_commit']}.")
    command = sweep.get("command") or (" ".join(map(str, sweep["argv"])) if sweep.get("argv") else "")
    if command:
        s.append(f"Command: `{command}`.")
    return " ".join(s) if s else "The sweep record names no software versions or git commit."


def methods_paragraphs(data, sweep: dict[str, Any], conf: pd.DataFrame, cfg: dict[str, Any]
                       ) -> list[str]:
    """The methods section as plain-text paragraphs (inline `code` marks only): ``data`` the
    loaded sweep, ``sweep`` its sweep.json as a dict, ``conf`` effects.configurations, ``cfg`` a
    finished trial's resolved config."""
    if not conf.empty:
        modes, tasks = sorted(conf["task_mode"].unique()), list(dict.fromkeys(conf["task"]))
    else:   # nothing finished yet: what the grid will train
        modes = sorted({g.get("task_mode") for g in data.grid if g.get("task_mode")})
        tasks = list((data.manifest or {}).get("tasks") or [])
    grid = _grid_sentence(conf, len(data.grid)) if not conf.empty else ""
    return [_dataset_sentence(data.manifest),
            " ".join(x for x in (_task_mode_sentence(modes, tasks) if modes else "", grid,
                                 _recipe_sentence(cfg)) if x),
            _evaluation_sentence(data.trials, int(getattr(data, "bootstrap", 0) or 0)),
            _software_sentence(sweep)]


def configuration_table(sweep: dict | None, cfg: dict[str, Any]) -> pd.DataFrame:
    """The training configuration every trial shares, one row per setting (sweep.json's base
    configuration, else a finished trial's config minus its grid point)."""
    base = (sweep or {}).get("base_config")
    source = base if isinstance(base, dict) and base else \
        {k: v for k, v in cfg.items() if k not in NOT_RECIPE}
    rows = [{"setting": k, "value": ", ".join(map(str, v)) if isinstance(v, (list, tuple)) else
             storage.display(v) if k == "store" and isinstance(v, str) else str(v)}
            for k, v in sorted(source.items())]
    return pd.DataFrame(rows, columns=["setting", "value"])
