"""``--dry-run``: the grid, the GPU packing and the GPU-hours of a sweep; starts nothing.

Without a store the plan is for CheXpert's size (``common.schema.CHEXPERT_*``), so a study can be
priced before a store is built; trial ids then lack their store hash and are shown without it.
"""
from __future__ import annotations

from common import storage
from common.schema import CHEXPERT_TRAIN_IMAGES, CHEXPERT_VALID_IMAGES
from orchestrator import estimate as est
from orchestrator import packing
from orchestrator.sweep_config import SweepConfig


def store_images(store) -> tuple[int, int, str]:
    """(train images, valid images, what they are) of the store, or CheXpert's without one."""
    if store is None:
        return CHEXPERT_TRAIN_IMAGES, CHEXPERT_VALID_IMAGES, "CheXpert v1.0's size (no store given)"
    counts = store.manifest.get("counts", {}).get("per_split", {})
    train = int(counts.get("train", {}).get("stored", 0))
    valid = int(counts.get("valid", {}).get("stored", 0))
    return train, valid, f"store: {train:,} / {valid:,}"


def shares_of(sweep: SweepConfig, trials, gpu_table) -> tuple[dict[str, float], str]:
    """Trial id -> GPU share, and the packing plan's text ('' without auto packing)."""
    from orchestrator.ray_run import gpu_shares, resolve_gpu_memory
    requested = sweep.gpu_share()
    if requested != "auto":
        return {t.trial_id: float(requested) for t in trials}, ""
    gb, where = resolve_gpu_memory(sweep.gpu_memory_gb)
    text = packing.describe([(t.params.model, t.params.resolution) for t in trials], gb, gpu_table)
    return (gpu_shares(trials, "auto", gb, gpu_table),
            text + f"\n  (GPU memory: {where}; on a Ray without GPUs the trials run on CPUs)\n")


def _display_id(trial, with_store: bool) -> str:
    return trial.trial_id if with_store else trial.trial_id.rsplit("-", 1)[0] + "-<store hash>"


def report(sweep: SweepConfig, trials, plan, store, base, gpu_table, rates) -> str:
    train_images, valid_images, basis_images = store_images(store)
    train_n, valid_n = est.epoch_images(train_images, valid_images, base.max_train_studies,
                                        base.max_valid_studies)
    share, packing_text = shares_of(sweep, trials, gpu_table)
    lines = []
    where = (f"sweep {sweep.name} at {sweep.folder.display()}" if sweep.storage and sweep.name
             else "sweep (no --storage/--name yet)")
    lines.append(f"{where}; " + (f"store {storage.display(sweep.store)} (manifest "
                                 f"{store.manifest_hash[:12]})" if store else
                                 "no store: planned for CheXpert's size; build one with "
                                 "python -m preprocessing build"))
    if packing_text:
        lines.append(packing_text)
    groups = [(t.params.model, t.params.resolution) for t in trials]
    left = [t for t in trials if t.trial_id in set(plan.to_run)]
    e_all = est.estimate(groups, base.total_epochs, train_n, valid_n,
                         [share[t.trial_id] for t in trials], rates)
    e_left = est.estimate([(t.params.model, t.params.resolution) for t in left], base.total_epochs,
                          train_n, valid_n, [share[t.trial_id] for t in left], rates)
    lines += [f"{len(trials)} trials: {len(plan.finished)} finished, {len(plan.to_run)} to run "
              f"({len(plan.resumed)} of them resume from storage)",
              f"per trial: {base.total_epochs} epochs x {train_n:,} train + {valid_n:,} valid images"
              f" ({basis_images})", "",
              f"{'group':<30}{'trials':>6}  {'img/s (H100)':>12}  {'GPU share':>9}  "
              f"{'est. GPU-h':>10}  img/s from"]
    for (model, res), g in sorted(e_all.per_group.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        frac = packing.format_fraction(g["gpu_share"]) if g["gpu_share"] > 0 else "0 (CPU)"
        lines.append(f"{model + ' @ ' + str(res) + ' px':<30}{g['trials']:>6}  "
                     f"{g['images_per_s']:>12,.0f}  {frac:>9}  {g['gpu_hours']:>10.2f}  {g['source']}")
    sources = [g["source"] for g in e_all.per_group.values()]
    n_measured = sum(1 for s in sources if est.is_measured(s))
    n_table = sum(1 for s in sources if s == "table")
    basis = (f"{n_measured} of {len(sources)} groups at their measured img/s, {n_table} from the "
             f"FLOPs table, {len(sources) - n_measured - n_table} from FLOPs counted for the model; "
             f"docs/sweep.md")
    lines += ["", f"estimated GPU-hours: {e_all.gpu_hours:.1f} for the whole grid, "
              f"{e_left.gpu_hours:.1f} still to run (an ESTIMATE: {basis}; full GPU speed, no "
              f"start-up)"]
    tasks = len(base.tasks)
    if sweep.task_mode == "multi" and tasks > 1:
        single = est.estimate(groups * tasks, base.total_epochs, train_n, valid_n,
                              [share[t.trial_id] for t in trials] * tasks, rates)
        lines.append(f"with --task-mode single (one model per task): {len(trials) * tasks} trials, "
                     f"{single.gpu_hours:.1f} GPU-hours")
    lines += ["", "trials:"]
    fin = set(plan.finished)
    for t in trials:
        lines.append(f"  {'finished' if t.trial_id in fin else 'to run  '}  "
                     f"{_display_id(t, store is not None)}")
    return "\n".join(lines)
